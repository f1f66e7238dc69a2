"""dvc.yaml's code deps are complete: every file a stage's command runs (its script, stages/_common.py and
every r2gen module reached through any import, read with ``ast``) is covered by one of the stage's deps,
and no code dep is stale. Otherwise a change to, say, ``Tokenizer.decode`` would not rerun `evaluate`,
and the committed metrics would silently describe old code.

Fix a failure with ``python tests/code_deps.py --write`` (rewrites the code deps of dvc.yaml), then
``dvc status`` shows which stages the change reruns.
"""

from __future__ import annotations

import dataclasses
import difflib
import textwrap
from pathlib import Path

import pytest
from code_deps import Modules, code_deps, covered, definitions, load_stages, required, rewrite
from helpers import REPO

FIX = "run `python tests/code_deps.py --write` (README, Pipeline: code deps)"
MODULES = Modules(REPO)
STAGES = load_stages(REPO)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_depends_on_all_the_code_it_runs(stage):
    deps = code_deps(stage)
    missing = sorted(p for p in required(MODULES, stage) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage.name} runs code its deps do not cover: {', '.join(missing)}; {FIX}"


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_no_stage_depends_on_code_it_does_not_run(stage):
    needed = required(MODULES, stage)
    stale = [d for d in code_deps(stage) if not any(covered(p, (d,)) for p in needed)]
    assert not stale, (f"dvc.yaml stage {stage.name} lists code deps it never runs (or that do not exist; each "
                       f"change to them reruns it for nothing): {', '.join(stale)}; {FIX}")


def test_removing_any_code_dep_of_evaluate_is_caught():
    stage = next(s for s in STAGES if s.definition == "evaluate")
    needed = required(MODULES, stage)
    for dep in code_deps(stage):
        fewer = dataclasses.replace(stage, deps=tuple(d for d in stage.deps if d != dep))
        assert any(not covered(p, code_deps(fewer)) for p in needed), dep


def test_evaluate_depends_on_what_it_uses_of_the_tokenizer_training_precision_and_checkpoints():
    """The issue's example: evaluate decodes with the tokenizer, batches and computes the loss with training's
    code, runs the precision policy and loads checkpoints."""
    stage = next(s for s in STAGES if s.definition == "evaluate")
    needed = required(MODULES, stage)
    for path in ("r2gen/tokenizer.py", "r2gen/precision.py", "r2gen/checkpoint.py", "r2gen/decoding.py",
                 "stages/_common.py", "r2gen/__init__.py"):
        assert path in needed, path


def test_dvc_yaml_code_deps_are_what_the_tool_writes():
    text = (REPO / "dvc.yaml").read_text()
    written = rewrite(text, definitions(MODULES, STAGES))
    diff = "".join(difflib.unified_diff(text.splitlines(True), written.splitlines(True), "dvc.yaml", "written"))
    assert written == text, f"{FIX}; it would change:\n{diff}"


def test_writing_restores_a_removed_dep_and_keeps_every_other_line():
    text = (REPO / "dvc.yaml").read_text()
    lines = text.splitlines(keepends=True)
    evaluate = lines.index("  evaluate:\n")
    tokenizer = next(i for i in range(evaluate, len(lines)) if lines[i].strip() == "- r2gen/tokenizer.py")
    damaged = "".join(lines[:tokenizer] + lines[tokenizer + 1:]).replace("stages/_common.py", "r2gen/gone.py")
    assert rewrite(damaged, definitions(MODULES, STAGES)) == text


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(body))


def test_the_scan_follows_every_form_of_import_and_resolves_foreach(tmp_path):
    write_tree(tmp_path, {
        "r2gen/__init__.py": "",
        "r2gen/a.py": """
            def f():
                from r2gen.sub import mod  # function-local, a submodule named in `from ... import`
                return mod
            """,
        "r2gen/b.py": "X = 1\n",
        "r2gen/c.py": "from r2gen.sub.helper import name\n",
        "r2gen/sub/__init__.py": "",
        "r2gen/sub/mod.py": "from . import helper\nfrom .deep.leaf import y\n",
        "r2gen/sub/helper.py": "name = 1\n",
        "r2gen/sub/deep/__init__.py": "",
        "r2gen/sub/deep/leaf.py": "y = 2\n",
        "r2gen/unused.py": "import r2gen.b\n",
        "stages/_common.py": "import r2gen.b\n",
        "stages/one.py": "from _common import run\nfrom r2gen import a\n",
        "stages/two.py": "import yaml\nfrom r2gen.c import name\n",
        "params.yaml": "root: data/x\n",
        "dvc.yaml": """
            stages:
              one:
                cmd: python stages/one.py ${root}
                deps:
                  - stages/one.py
                  - r2gen
                  - ${root}
              two:
                foreach: [fp32, fp8]
                do:
                  cmd: python stages/two.py ${item}
                  deps:
                    - stages/two.py
                    - models/${item}
            """,
    })
    modules = Modules(tmp_path)
    stages = {s.name: s for s in load_stages(tmp_path)}
    assert set(stages) == {"one", "two@fp32", "two@fp8"}
    assert stages["one"].deps[-1] == "data/x" and stages["two@fp8"].deps[-1] == "models/fp8"
    assert required(modules, stages["one"]) == {
        "stages/one.py", "stages/_common.py", "r2gen/__init__.py", "r2gen/a.py", "r2gen/b.py",
        "r2gen/sub/__init__.py", "r2gen/sub/mod.py", "r2gen/sub/helper.py", "r2gen/sub/deep/__init__.py",
        "r2gen/sub/deep/leaf.py"}
    assert required(modules, stages["two@fp32"]) == {
        "stages/two.py", "r2gen/__init__.py", "r2gen/c.py", "r2gen/sub/__init__.py", "r2gen/sub/helper.py"}
    # One dep per module; a package whose every module runs is listed as its directory.
    wanted = definitions(modules, list(stages.values()))
    assert wanted["one"] == ["stages/one.py", "stages/_common.py", "r2gen/__init__.py", "r2gen/a.py", "r2gen/b.py",
                             "r2gen/sub"]
    assert wanted["two"] == ["stages/two.py", "r2gen/__init__.py", "r2gen/c.py", "r2gen/sub/__init__.py",
                             "r2gen/sub/helper.py"]
    assert covered("r2gen/sub/deep/leaf.py", ("r2gen/sub",)) and not covered("r2gen/subx.py", ("r2gen/sub",))
    assert rewrite((tmp_path / "dvc.yaml").read_text(), wanted).count("- r2gen/sub\n") == 1
