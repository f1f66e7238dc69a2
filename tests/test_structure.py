"""The shape of the code, read from the sources: one precision list everywhere, an r2gen import graph without
cycles or imports of stages/tests/benchmarks, and no function longer than a screenful or two.
"""

from __future__ import annotations

import ast
import dataclasses
import re

import pytest
import yaml
from code_deps import LIBRARY, Modules, cycles, describe_cycle, imports_into, library_graph, python_files
from helpers import REPO

from r2gen.config import PRECISIONS, TrainConfig

MAX_FUNCTION_LINES = 80


# ---------------------------------------------------------------------------------------------- precisions
def _foreach_outputs(dvc: dict) -> dict[str, re.Pattern]:
    """Per ``${item}`` output of a foreach stage (``metrics/train/${item}.json``): a pattern whose group ``p`` is the item."""
    patterns = {}
    for stage in dvc["stages"].values():
        if "foreach" not in stage:
            continue
        for out in stage["do"].get("outs", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            if "${item}" in path:
                body = re.escape(path).replace(re.escape("${item}"), "(?P<p>[^/]+)")
                patterns[path] = re.compile(f"^{body}(/.*)?$")
    return patterns


def _precisions_named(paths: list[str], patterns: dict[str, re.Pattern], other_outputs: set[str]) -> dict[str, list[str]]:
    """Per foreach output that some of ``paths`` are or are under: the items they name, in order."""
    found: dict[str, list[str]] = {}
    for path in paths:
        if path in other_outputs:  # metrics/eval/baseline.json: a single stage's output, not a precision
            continue
        for template, pattern in patterns.items():
            match = pattern.match(path)
            if match and match["p"] not in found.setdefault(template, []):
                found[template].append(match["p"])
    return found


def precision_lists() -> dict[str, list[str]]:
    """Every place that lists the precisions, by a name that says where."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    gate = yaml.safe_load((REPO / "metrics_gate.yaml").read_text())
    lists = {
        "r2gen.config.PRECISIONS": list(PRECISIONS),
        "TrainConfig fields": [f.name for f in dataclasses.fields(TrainConfig) if f.name != "common"],
        "params.yaml train sections": [k for k in params["train"] if k != "common"],
        "metrics_gate.yaml precisions": list(gate["precisions"]),
    }
    lists.update({f"dvc.yaml {key}: foreach": list(stage["foreach"]) for key, stage in dvc["stages"].items()
                  if "foreach" in stage})
    patterns = _foreach_outputs(dvc)
    single = {next(iter(o)) if isinstance(o, dict) else o for s in dvc["stages"].values() if "foreach" not in s
              for o in s.get("outs", [])}
    consumers = {f"dvc.yaml {key}: deps": [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]
                 for key, stage in dvc["stages"].items() if "foreach" not in stage}
    consumers["dvc.yaml metrics"] = list(dvc.get("metrics", []))
    for plot in dvc.get("plots", []):
        if isinstance(plot, str) and any(plot.startswith(f"{o.rstrip('/')}/") for o in single):
            continue  # an image plot inside one stage's output (reports/figures/*.png): no precision list
        (title, spec), = plot.items() if isinstance(plot, dict) else ((plot, {}),)
        y = (spec or {}).get("y", {})
        consumers[f"dvc.yaml plot {title!r}"] = list(y) if isinstance(y, (dict, list)) else [y]
    for where, paths in consumers.items():
        named = _precisions_named(paths, patterns, single)
        if not named and not where.endswith(": deps"):
            raise AssertionError(f"{where} names no per-precision output ({', '.join(patterns)}): read it differently")
        lists.update({f"{where} ({template})": items for template, items in named.items()})
    return lists


def test_every_precision_list_is_the_same():
    lists = precision_lists()
    assert any(where.startswith("dvc.yaml report: deps") for where in lists)
    differ = {where: names for where, names in lists.items() if names != list(PRECISIONS)}
    assert not differ, (f"r2gen.config.PRECISIONS is {list(PRECISIONS)}, but:\n"
                        + "\n".join(f"  {where}: {names}" for where, names in differ.items()))


# ---------------------------------------------------------------------------------------------- imports
MODULES = Modules(REPO)
GRAPH = library_graph(MODULES)


def test_r2gen_imports_nothing_from_stages_tests_or_benchmarks():
    bad = [f"{i.source}:{i.line} imports {i.module}" for i in imports_into(MODULES)]
    assert not bad, "r2gen is the library; stages, tests and benchmarks use it, never the reverse:\n  " + "\n  ".join(bad)


def test_cycles_and_imports_of_tests_are_found_through_function_local_imports(tmp_path):
    files = {
        "r2gen/__init__.py": "",
        "r2gen/a.py": "from r2gen import b\n",
        "r2gen/b.py": "def f():\n    from r2gen.a import name\n    import helpers\n",
        "r2gen/c.py": "import r2gen.a\nfrom benchmarks.run import main\n",
        "benchmarks/__init__.py": "",
        "benchmarks/run.py": "",
        "tests/helpers.py": "",
    }
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    modules = Modules(tmp_path)
    graph = library_graph(modules)
    assert cycles(graph) == [["r2gen.a", "r2gen.b"]]
    assert describe_cycle(graph, modules, ["r2gen.a", "r2gen.b"]) == (
        "cycle r2gen.a <-> r2gen.b:\n  r2gen/a.py:1 imports r2gen.b\n  r2gen/b.py:2 imports r2gen.a")
    assert [(i.source, i.line, i.module) for i in imports_into(modules)] == [
        ("r2gen/b.py", 3, "helpers"), ("r2gen/c.py", 2, "benchmarks.run")]
    assert "r2gen.decoding" in GRAPH["r2gen.model.r2gen"] and "r2gen.model.r2gen" not in GRAPH["r2gen.decoding"]


def test_r2gen_has_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "\n".join(describe_cycle(GRAPH, MODULES, c) for c in found)


# ---------------------------------------------------------------------------------------------- functions
def long_functions(path: str) -> list[str]:
    """``path:line name (N lines)`` for each function or method of more than MAX_FUNCTION_LINES, decorators excluded."""
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"), filename=path)
    return [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


@pytest.mark.parametrize("path", python_files(REPO, LIBRARY))
def test_no_function_is_longer_than_80_lines(path):
    offenders = long_functions(path)
    assert not offenders, f"split these (at most {MAX_FUNCTION_LINES} lines each):\n  " + "\n  ".join(offenders)
