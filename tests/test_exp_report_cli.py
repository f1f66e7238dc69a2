"""`r2gen exp-report` as a user runs it: a saved `dvc exp show --json`, histories read from the experiments'
git commits, the time-to-quality target from params.yaml, and one-line errors on bad input.

The grid is tests/fixtures/experiments/exp_show.json (3 seeds x {equal, max}, planted effects); its
dvclive histories are committed here to a scratch git repository, one commit per experiment, as
`dvc exp run` commits them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from r2gen.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "experiments"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env={**os.environ, **GIT_ENV}, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture()
def grid_repo(tmp_path, monkeypatch) -> Path:
    """A git repo with one commit per fixture experiment holding its dvclive epoch histories, the
    saved exp show JSON pointing at those commits, and a params.yaml asking for a 1.10 x target."""
    repo = tmp_path / "grid"
    repo.mkdir()
    git(repo, "init", "-q")
    rows = json.loads((FIXTURE / "exp_show.json").read_text())
    stored = json.loads((FIXTURE / "histories.json").read_text())
    for exp in rows[1]["experiments"]:
        head = exp["revs"][0]
        if head["rev"] not in stored:
            continue  # queued/failed experiments have no history
        for p, files in stored[head["rev"]].items():
            epoch = repo / "dvclive" / "train" / p / "plots" / "metrics" / "epoch"
            epoch.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (epoch / f"{name}.tsv").write_text(text)
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", exp.get("name") or "exp")
        head["rev"] = git(repo, "rev-parse", "HEAD")
    (repo / "exps.json").write_text(json.dumps(rows))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["exp_report"]["ttq_relative"] = 1.10
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(repo)
    return repo


def test_exp_report_reads_the_grid_and_its_histories_and_writes_the_report(grid_repo, capsys):
    assert main(["exp-report", "--input", "exps.json"]) == 0
    out = capsys.readouterr().out
    assert "6 experiments in 2 group(s); left out: grid-8: queued; grid-7: failed" in out
    assert "does not survive at equal batch" in out  # the planted max-batch loss gap
    report = (grid_repo / "reports/experiments/experiments_report.md").read_text()
    assert "1.1 × fp32's mean final val_loss" in report  # the target of params.yaml, not the default
    numbers = json.loads((grid_repo / "reports/experiments/experiments.json").read_text())
    reached = [p for g in numbers["groups"] for p, c in g["time_to_quality"].items() if c["reached"]]
    assert reached, "time to quality came from the committed histories"
    assert sorted(p.name for p in (grid_repo / "reports/experiments/figures").iterdir()) == \
        ["seed_quality.png", "seed_throughput.png", "time_to_quality.png"]


def test_without_the_histories_time_to_quality_is_said_to_be_unavailable(grid_repo, capsys):
    rows = json.loads((FIXTURE / "exp_show.json").read_text())  # revs that are not commits of this repo
    (grid_repo / "exps.json").write_text(json.dumps(rows))
    assert main(["exp-report", "--input", "exps.json", "--out", "out"]) == 0
    report = (grid_repo / "out/experiments_report.md").read_text()
    assert "no fp32 val_loss history to base the target on" in report


@pytest.mark.parametrize("content,message", [
    ("not json", "cannot read exps.json as JSON"),
    ('{"rev": "workspace"}', "dvc exp show --json"),
    ("[]", "no finished experiments"),
])
def test_bad_input_is_a_one_line_error(grid_repo, capsys, content, message):
    (grid_repo / "exps.json").write_text(content)
    assert main(["exp-report", "--input", "exps.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (grid_repo / "reports").exists()  # nothing half-written


def test_a_params_typo_names_the_key(grid_repo, capsys):
    (grid_repo / "params.yaml").write_text("exp_report:\n  ttq_relativ: 1.1\n")
    assert main(["exp-report", "--input", "exps.json"]) == 2
    assert "did you mean 'ttq_relative'" in capsys.readouterr().err
