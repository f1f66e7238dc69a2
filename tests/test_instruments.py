"""Instruments of issue 16: full-reference scoring, the gradient-norm and loss-scale history, their plots
and report section, and the gate's markdown diff for pull requests (``r2gen check-metrics --md``)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from helpers import REPO, sh
from r2gen import precision as prec
from r2gen.cli import main
from r2gen.compare.figures import HISTORY_FIGURES, PRECISION_FIGURES
from r2gen.compare.runs import load_run
from r2gen.compare.single import build_report, render_markdown
from r2gen.config import PRECISIONS, EvaluateConfig, Params
from r2gen.errors import ConfigError
from r2gen.evaluation import references, score
from r2gen.gate import evaluate, load_rules, render_markdown as gate_markdown
from r2gen.tokenizer import Tokenizer
from r2gen.training.step import grad_norm, train_step

FIXTURE = Path(__file__).parent / "fixtures" / "report"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------- (a) references
REPORT = ("The heart is normal in size. The lungs are clear. There is a small left pleural effusion. "
          "No pneumothorax is seen.")


def test_full_references_score_a_truncated_report_pair_differently():
    """A report longer than max_seq_length: scored against its truncated form, the hypothesis that writes
    exactly that truncated form is perfect; against the full report it misses the effusion sentence."""
    tok = Tokenizer.build([REPORT] * 3, "iu_xray", threshold=1, max_seq_length=12)
    truncated, full = references(tok, [REPORT]), references(tok, [REPORT], "full")
    assert truncated == ["the heart is normal in size . the lungs are clear"]  # BOS + 10 words + '.', cut at 12
    assert full == [tok.clean(REPORT)] and full[0].endswith("no pneumothorax is seen .")
    hyp = truncated  # a model that wrote the truncated reference word for word
    vs_truncated, vs_full = score(truncated, hyp, meteor=False), score(full, hyp, meteor=False)
    assert vs_truncated["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert vs_full["BLEU_4"] < 0.5  # the brevity penalty of a hypothesis half the reference's length
    assert vs_full["ROUGE_L"] < vs_truncated["ROUGE_L"]
    # The effusion is only in the full reference: the hypothesis that omits it loses recall there only.
    assert vs_truncated["CE_recall"] == 1.0 and vs_full["CE_recall"] < 1.0


def test_references_is_a_checked_choice_defaulting_to_r2gens():
    assert Params.from_dict({}).evaluate.references == "truncated"
    assert yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]["references"] == "truncated"
    with pytest.raises(ConfigError, match="evaluate.references.*truncated, full"):
        EvaluateConfig(references="whole")


def test_the_report_says_which_references_were_scored(tmp_path):
    work = shutil.copytree(FIXTURE, tmp_path / "run")
    run = load_run(work / "metrics", work / "dvclive" / "train", PRECISIONS)
    md = render_markdown(run, "bf16")
    assert "### Report quality on the test split (32 studies) against truncated references" in md
    assert "**References**: scored against R2Gen's" in md
    for name in ("fp32", "baseline"):  # one file scored differently: the report says they do not compare
        path = work / "metrics" / "eval" / f"{name}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "references": "full"}))
    md = render_markdown(load_run(work / "metrics", work / "dvclive" / "train", PRECISIONS), "bf16")
    assert "scored against different references" in md and "fp32: full" in md and "baseline: full" in md


# ---------------------------------------------------------------------------------------- (c) gradient norm
class Affine(torch.nn.Module):
    """y = w·x + b with a squared-error loss: gradients by hand are 2/N Σ r x and 2/N Σ r."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
            self.lin.bias.fill_(0.25)

    def forward(self, images, labels):
        pred = self.lin(images.float()).squeeze(-1).float()  # (B,)
        return SimpleNamespace(loss=((pred - labels.float()) ** 2).mean())


X, T = [[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]], [1.0, 2.0]


def hand_norm() -> float:
    w, b = [0.5, -1.0, 2.0], 0.25
    r = [sum(wi * xi for wi, xi in zip(w, x)) + b - t for x, t in zip(X, T)]  # residuals 3.75, -4.75
    dw = [2 / len(X) * sum(ri * x[j] for ri, x in zip(r, X)) for j in range(3)]
    db = 2 / len(X) * sum(r)
    return math.sqrt(sum(g * g for g in dw) + db * db)  # sqrt(278.625)


@pytest.mark.parametrize("precision,init_scale", [("fp32", None), ("fp16", 2.0**8)])
def test_the_step_reports_the_pre_clip_norm_of_the_unscaled_gradients(precision, init_scale):
    plan = prec.resolve(precision)
    model = Affine()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = plan.grad_scaler() if init_scale is None else torch.amp.GradScaler("cpu", init_scale=init_scale)
    result = train_step(model, torch.tensor(X), torch.tensor(T), optimizer, scaler, plan, clip_value=0.01)
    assert hand_norm() == pytest.approx(16.69206, rel=1e-6)
    # Not the clipped gradients (their norm is at most 0.01 * 2), not the scaled ones (256x under fp16).
    assert result.grad_norm == pytest.approx(hand_norm(), rel=1e-3 if precision == "fp16" else 1e-6)
    assert result.finite_grad_norm == result.grad_norm and result.stepped
    assert float(grad_norm(model.parameters())) <= 0.01 * 2 + 1e-9  # what clipping left behind


def test_an_overflowed_fp16_step_has_no_finite_norm_and_is_skipped():
    plan = prec.resolve("fp16")
    model = Affine()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # 3.75 x 65536 overflows the fp16 backward
    result = train_step(model, torch.tensor(X), torch.tensor(T), torch.optim.SGD(model.parameters(), lr=0.1),
                        scaler, plan, clip_value=0.1)
    assert result.skipped and not math.isfinite(result.grad_norm) and result.finite_grad_norm is None


def test_log_step_writes_grad_norm_where_finite_and_the_skipped_steps_so_far():
    from r2gen.training.recipe import _log_step
    from r2gen.training.step import StepResult

    rows = []
    history = SimpleNamespace(log_step=rows.append)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    run = SimpleNamespace(parts=SimpleNamespace(scaler=scaler, optimizer=SimpleNamespace(param_groups=[{}, {"lr": 1e-3}])),
                          state=SimpleNamespace(step=1, skipped_steps=0), spec=SimpleNamespace(common=SimpleNamespace(log_every=100)),
                          device=torch.device("cpu"))
    _log_step(run, StepResult(2.0, 4, True, False, 3.5), 0.01, history)
    run.state.skipped_steps = 1
    _log_step(run, StepResult(2.0, 4, True, True, math.inf), 0.01, history)
    assert rows == [{"train/loss": 2.0, "train/lr": 1e-3, "train/loss_scale": 4.0, "train/grad_norm": 3.5,
                     "train/skipped_steps": 0},
                    {"train/loss": 2.0, "train/lr": 1e-3, "train/loss_scale": 4.0, "train/skipped_steps": 1}]


def test_dvc_yaml_declares_the_new_histories_and_the_report_figures_as_plots():
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    specs = {next(iter(p)): next(iter(p.values())) for p in plots if isinstance(p, dict)}
    images = [p for p in plots if isinstance(p, str)]
    for metric in ("grad_norm", "loss_scale", "skipped_steps"):
        (spec,) = [s for s in specs.values() if metric in next(iter(s["y"].values()))]
        assert spec["x"] == "step"
        assert spec["y"] == {f"dvclive/train/{p}/plots/metrics/train/{metric}.tsv": metric for p in PRECISIONS}
    assert images == [f"reports/figures/{name}" for name in {**PRECISION_FIGURES, **HISTORY_FIGURES}]


def write_history(run_dir: Path, metric: str, values: list[float]) -> None:
    path = run_dir / "plots" / "metrics" / "train" / f"{metric}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step\t" + metric + "\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))


def test_the_report_draws_gradient_and_loss_scale_figures_when_histories_exist(tmp_path):
    work = shutil.copytree(FIXTURE, tmp_path / "run")  # histories from before these metrics: none
    live = work / "dvclive" / "train"
    old = build_report(load_run(work / "metrics", live, PRECISIONS), "bf16", tmp_path / "old")
    md = (tmp_path / "old" / "precision_report.md").read_text()
    assert "not logged (history from before train/grad_norm" in md and "grad_norm.png: not drawn" in md
    assert not (tmp_path / "old" / "figures" / "grad_norm.png").exists() and old["precision"] == "bf16"

    for i, p in enumerate(PRECISIONS):
        write_history(live / p, "grad_norm", [1.0 + i, 3.0 + i, 2.0 + i])
        write_history(live / p, "loss_scale", [2.0**16, 2.0**15, 2.0**15] if p == "fp16" else [1.0] * 3)
        write_history(live / p, "skipped_steps", [1, 1, 1] if p == "fp16" else [0] * 3)
    build_report(load_run(work / "metrics", live, PRECISIONS), "bf16", tmp_path / "new")
    md = (tmp_path / "new" / "precision_report.md").read_text()
    for name in ("grad_norm.png", "loss_scale.png"):  # fp8_layers.png: tests/test_report.py
        assert f"](figures/{name})" in md
        assert (tmp_path / "new" / "figures" / name).read_bytes().startswith(PNG_SIGNATURE)
    steps = json.loads((work / "metrics" / "train" / "fp16.json").read_text())["steps"]
    # median, max, last of the norms; 3 finite norms logged; the scale's min and last; skipped steps (summary)
    assert f"| fp16 (numerics only) | 3.0000 | 4.0000 | 3.0000 | 3 of {steps} | 32768 | 32768 |" in md
    assert f"| bf16 | 4.0000 | 5.0000 | 4.0000 | 3 of {steps} | off | off | off |" in md


# ---------------------------------------------------------------------------------------- (b) the PR diff
BLEU = {"key": "BLEU_4", "file": "m/{precision}.json", "better": "higher", "tolerance": 0.02}


def test_markdown_renders_a_passing_and_a_failing_gate():
    precisions, rules = load_rules({"precisions": ["fp32", "fp16"], "metrics": [BLEU]})
    diff = {"m/fp32.json": {"BLEU_4": {"old": 0.30, "new": 0.31}}, "m/fp16.json": {"BLEU_4": {"old": 0.30, "new": 0.25}}}
    failing = gate_markdown(evaluate(diff, precisions, rules), "HEAD")
    lines = failing.splitlines()
    assert lines[0] == "### ❌ Metrics gate failed (baseline `HEAD`)"
    assert "1/2 metrics within tolerance of HEAD; 1 FAILED." in lines
    header = lines.index("| metric | precision | baseline | workspace | change | verdict |")
    assert lines[header + 2] == "| `BLEU_4` | fp16 | 0.3 | 0.25 | -0.05 (-16.7%) | **FAIL** (tolerance -0.02): worse by 0.05 |"
    assert lines[header + 3] == "| `BLEU_4` | fp32 | 0.3 | 0.31 | +0.01 (+3.3%) | ok (tolerance -0.02) |"
    diff["m/fp16.json"]["BLEU_4"]["new"] = 0.29
    passing = gate_markdown(evaluate(diff, precisions, rules), "HEAD", "#### loss section")
    assert passing.startswith("### ✅ Metrics gate passed") and passing.rstrip().endswith("#### loss section")
    assert "**FAIL**" not in passing


def test_a_metric_the_baseline_lacks_is_skipped_with_the_reason_not_failed():
    precisions, rules = load_rules({"precisions": ["fp32"], "metrics": [BLEU]})
    (check,) = evaluate({"m/fp32.json": {"BLEU_4": {"old": None, "new": 0.3}}}, precisions, rules)
    assert check.ok and check.skipped and "no value in the baseline" in check.note
    (gone,) = evaluate({"m/fp32.json": {"BLEU_4": {"old": 0.3, "new": None}}}, precisions, rules)
    assert not gone.ok  # the reverse, a value the workspace lost, still fails
    assert "| skip (tolerance -0.02): not compared" in gate_markdown([check], "main")


def git_repo(root: Path) -> None:
    """A git+DVC repository with metrics and loss histories committed (the baseline)."""
    root.mkdir()
    sh(["git", "init", "-q"], root)
    sh(["dvc", "init", "-q"], root)
    (root / "dvc.yaml").write_text("metrics:\n  - m/fp32.json\n  - m/fp16.json\n")
    (root / "gate.yaml").write_text(yaml.safe_dump({"precisions": ["fp32", "fp16"], "metrics": [BLEU]}))
    for p in ("fp32", "fp16"):
        (root / "m").mkdir(exist_ok=True)
        (root / f"m/{p}.json").write_text(json.dumps({"BLEU_4": 0.3}))
        write_history(root / "dvclive" / "train" / p, "loss", [3.0, 2.5, 2.0, 1.8])
    sh(["git", "add", "."], root)
    sh(["git", "commit", "-qm", "baseline"], root)


@pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc is not on PATH (activate the project's venv)")
def test_check_metrics_md_writes_the_pr_comment_and_keeps_exit_codes(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    git_repo(repo)
    monkeypatch.chdir(repo)
    write_history(repo / "dvclive" / "train" / "fp16", "loss", [3.0, 2.6, 2.2, 2.1])  # a changed fp16 curve
    assert main(["check-metrics", "--gate", "gate.yaml", "--md", "out/comment.md"]) == 0
    out = capsys.readouterr().out
    assert "2/2 metrics within tolerance of HEAD" in out and "ok   fp32 BLEU_4" in out  # terminal lines unchanged
    md = (repo / "out" / "comment.md").read_text()
    assert md.startswith("### ✅ Metrics gate passed (baseline `HEAD`)")
    rows = {ln.split(" | ")[0]: ln for ln in md.splitlines() if ln.startswith("| fp")}
    assert rows["| fp32"].endswith("| identical history | 4 / 4 |")  # fp32's curve unchanged
    assert rows["| fp16"].split(" | ")[3].startswith("+0.")  # fp16's ends higher than the baseline's
    assert "![Training loss per step: baseline (dashed) vs workspace (solid)](./comment_loss.png)" in md
    assert (repo / "out" / "comment_loss.png").read_bytes().startswith(PNG_SIGNATURE)

    (repo / "m/fp16.json").write_text(json.dumps({"BLEU_4": 0.2}))  # a regression: exit 1, table says FAIL
    assert main(["check-metrics", "--gate", "gate.yaml", "--md"]) == 1
    assert "FAIL fp16 BLEU_4" in capsys.readouterr().out
    md = (repo / "metrics_diff.md").read_text()
    assert md.startswith("### ❌ Metrics gate failed") and "| `BLEU_4` | fp16 | 0.3 | 0.2 |" in md
    assert (repo / "metrics_diff_loss.png").is_file()
