"""The code each DVC stage runs, read from the sources (``ast``, nothing executed), against its deps in dvc.yaml.

A stage's code is its script (``python stages/<name>.py`` in its cmd), the stage modules it imports
(``from _common import ...``: stages/_common.py) and every ``r2gen`` module reached from them, through
any import: at the top of a file or inside a function, ``import r2gen.a.b``, ``from r2gen.a import b``
(b a submodule or a name), ``from . import b``. Importing ``r2gen.a.b`` also runs the ``__init__.py``
of ``r2gen`` and ``r2gen.a``, so those are part of the code too. Not seen: imports built from strings
(``importlib.import_module(name)``); this project has none.

tests/test_dvc_deps.py and tests/test_structure.py use this module; it is also the tool that writes the
code deps of dvc.yaml:

    python tests/code_deps.py            # per stage: the code deps it needs, missing and superfluous ones
    python tests/code_deps.py --write    # rewrite the code deps (stages/..., r2gen/...) of every stage in dvc.yaml

Granularity: one dep per module file, except that a package directory whose every module the stage
runs is listed as the directory (README, "Pipeline": how code deps are declared).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "r2gen"
STAGES_DIR = "stages"
SCRIPT = re.compile(r"\bpython3?\s+(?:-\S+\s+)*(\S+\.py)\b")
CODE_PREFIXES = (f"{LIBRARY}/", f"{STAGES_DIR}/")


# ---------------------------------------------------------------------------------------------- imports
@dataclass(frozen=True)
class Import:
    """One import statement's target: ``module`` imported by ``source`` (a file) at ``line``."""

    source: str  # repository-relative posix path of the importing file
    line: int
    module: str  # dotted name as written, resolved for relative imports


def python_files(repo: Path, top: str) -> list[str]:
    """Repository-relative posix paths of the .py files under ``top`` (a directory), sorted."""
    return sorted(p.relative_to(repo).as_posix() for p in (repo / top).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: str) -> str:
    """``r2gen/a/b.py`` -> ``r2gen.a.b``; ``r2gen/a/__init__.py`` -> ``r2gen.a``."""
    parts = path[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class Modules:
    """The importable modules of a repository: dotted name <-> file, for the packages ``r2gen``,
    ``benchmarks`` and ``tests`` and for the stage scripts (top-level names on their own sys.path)."""

    def __init__(self, repo: Path = REPO, packages: tuple[str, ...] = (LIBRARY, "benchmarks", "tests")):
        self.repo = repo
        self._imports: dict[str, list[Import]] = {}
        self.files: dict[str, str] = {}  # dotted name -> path (a package: its __init__.py)
        self.packages: set[str] = set()  # dotted names of package directories, with or without __init__.py
        for top in packages:
            if not (repo / top).is_dir():
                continue
            for path in python_files(repo, top):
                self.files[module_name(path)] = path
                parts = path.split("/")[:-1]
                self.packages.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        # Stage scripts run as `python stages/x.py`: stages/ is sys.path[0], so `_common` is stages/_common.py.
        self.stage_modules = {Path(p).stem: p for p in python_files(repo, STAGES_DIR)} if (repo / STAGES_DIR).is_dir() else {}

    def is_module(self, name: str) -> bool:
        return name in self.files or name in self.packages

    def path_of(self, name: str, stage_context: bool = False) -> str | None:
        """The file that importing ``name`` runs (None: not ours, or a package without __init__.py)."""
        if stage_context and name in self.stage_modules:
            return self.stage_modules[name]
        return self.files.get(name)

    def imports(self, path: str) -> list[Import]:
        """Every import in ``path`` (any depth: function-local ones included), targets as dotted names.

        ``from p import x`` targets ``p.x`` when that is a module of ours, else ``p``.
        """
        if path not in self._imports:
            self._imports[path] = self._scan(path)
        return self._imports[path]

    def _scan(self, path: str) -> list[Import]:
        tree = ast.parse((self.repo / path).read_text(encoding="utf-8"), filename=path)
        name = module_name(path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        out = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [Import(path, node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    out.append(Import(path, node.lineno, sub if self.is_module(sub) else base))
        return sorted(out, key=lambda i: (i.line, i.module))


def parents(name: str) -> list[str]:
    """``a.b.c`` -> [``a``, ``a.b``]: the packages whose __init__ runs before ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(modules: Modules, script: str) -> set[str]:
    """Paths of every file of ours that ``python <script>`` runs: the script, stage modules, r2gen modules."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        in_stage = path.startswith(f"{STAGES_DIR}/")
        for imp in modules.imports(path):
            for name in [*parents(imp.module), imp.module]:
                target = modules.path_of(name, stage_context=in_stage)
                if target is not None and target.startswith(CODE_PREFIXES) and target not in seen:
                    todo.append(target)
    return seen


def library_graph(modules: Modules) -> dict[str, dict[str, int]]:
    """r2gen's import graph: module -> {imported module of ours: first line}, explicit targets only
    (an import of ``r2gen.a.b`` is an edge to ``r2gen.a.b``, not to the package ``r2gen.a``)."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.files.items():
        if name.split(".")[0] != LIBRARY:
            continue
        edges = graph.setdefault(name, {})
        for imp in modules.imports(path):
            if modules.is_module(imp.module):
                edges.setdefault(imp.module, imp.line)
    return graph


def imports_into(modules: Modules, tops: tuple[str, ...] = (STAGES_DIR, "tests", "benchmarks")) -> list[Import]:
    """Imports in r2gen of the code in ``tops`` (as a package, or by a bare name: ``_common``, ``conftest``)."""
    bare = {Path(p).stem for top in tops if (modules.repo / top).is_dir() for p in python_files(modules.repo, top)}
    return [imp for name, path in sorted(modules.files.items()) if name.split(".")[0] == LIBRARY
            for imp in modules.imports(path) if imp.module.split(".")[0] in {*tops, *bare}]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe_cycle(graph: dict[str, dict[str, int]], modules: Modules, component: list[str]) -> str:
    """The imports inside one cycle, one per line: ``r2gen/a.py:12 imports r2gen.b``."""
    members = set(component)
    lines = [f"{modules.files[a]}:{line} imports {b}" for a in component for b, line in sorted(graph[a].items())
             if b in members]
    return f"cycle {' <-> '.join(component)}:\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------------------------------------- dvc.yaml
def interpolate(value: str, context: dict) -> str:
    """``${a.b}`` replaced from ``context`` (params.yaml and the foreach item); unknown names left as is."""
    def lookup(match: re.Match) -> str:
        node = context
        for key in match.group(1).strip().split("."):
            if not isinstance(node, dict) or key not in node:
                return match.group(0)
            node = node[key]
        return str(node)
    return re.sub(r"\$\{([^}]+)\}", lookup, value)


@dataclass(frozen=True)
class Stage:
    """One resolved stage (``train@fp32`` for a foreach item): its cmd and deps, interpolated."""

    name: str  # as dvc names it
    definition: str  # the key in dvc.yaml (``train``)
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]

    @property
    def script(self) -> str:
        match = SCRIPT.search(self.cmd)
        if not match:
            raise ValueError(f"dvc.yaml stage {self.name}: no `python <script>.py` in its cmd {self.cmd!r}")
        return match.group(1).removeprefix("./")


def _paths(entries: list) -> tuple[str, ...]:
    """Deps/outs entries (``path`` or ``{path: options}``) as paths."""
    return tuple(next(iter(e)) if isinstance(e, dict) else e for e in entries or [])


def load_stages(repo: Path = REPO) -> list[Stage]:
    """Every stage of dvc.yaml, foreach stages once per item (``${item}`` and ``${key}`` substituted)."""
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    params_file = repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text()) if params_file.exists() else {}
    stages = []
    for key, definition in dvc["stages"].items():
        if "foreach" in definition:
            items = definition["foreach"]
            pairs = items.items() if isinstance(items, dict) else ((item, item) for item in items)
            body = definition["do"]
            for k, item in pairs:
                stages.append(_stage(f"{key}@{k}", key, body, {**params, "item": item, "key": k}))
        else:
            stages.append(_stage(key, key, definition, params))
    return stages


def _stage(name: str, key: str, body: dict, context: dict) -> Stage:
    cmd = body["cmd"] if isinstance(body["cmd"], str) else " && ".join(body["cmd"])
    deps = tuple(interpolate(d, context).rstrip("/").removeprefix("./") for d in _paths(body.get("deps")))
    outs = tuple(interpolate(o, context).rstrip("/").removeprefix("./") for o in _paths(body.get("outs")))
    return Stage(name, key, interpolate(cmd, context), deps, outs)


def covered(path: str, deps: tuple[str, ...]) -> bool:
    """A dep covers itself and, being a directory, every file under it."""
    return any(path == d or path.startswith(d + "/") for d in deps)


def code_deps(stage: Stage) -> tuple[str, ...]:
    return tuple(d for d in stage.deps if d.startswith(CODE_PREFIXES))


def required(modules: Modules, stage: Stage) -> set[str]:
    """The files of ours that the stage's command runs."""
    return closure(modules, stage.script)


def minimal_deps(modules: Modules, needed: set[str]) -> list[str]:
    """``needed`` as deps: each file, except a package directory whose every .py file is needed, which is
    listed as the directory (its __pycache__ is in .dvcignore). The stage script comes first."""
    deps = set(needed)
    directories = sorted({str(Path(p).parent.as_posix()) for p in needed if p.startswith(f"{LIBRARY}/")},
                         key=lambda d: d.count("/"))
    for directory in directories:  # outermost first: a collapsed parent covers its children
        if covered(directory, tuple(d for d in deps if not d.endswith(".py"))):
            continue  # inside a directory listed already
        files = python_files(modules.repo, directory)
        if files and all(f in needed for f in files):
            deps = {d for d in deps if not covered(d, (directory,))} | {directory}
    return sorted(deps, key=lambda d: (not d.startswith(f"{STAGES_DIR}/"), d == f"{STAGES_DIR}/_common.py", d))


def definitions(modules: Modules, stages: list[Stage]) -> dict[str, list[str]]:
    """Per dvc.yaml stage definition (foreach items merged): the code deps it should list."""
    needed: dict[str, set[str]] = {}
    for stage in stages:
        needed.setdefault(stage.definition, set()).update(required(modules, stage))
    return {key: minimal_deps(modules, files) for key, files in needed.items()}


def rewrite(text: str, wanted: dict[str, list[str]]) -> str:
    """dvc.yaml's text with each stage's code deps (``- r2gen/...``, ``- stages/...``) replaced by ``wanted``,
    first in its ``deps:`` list; comments, the other deps and everything else unchanged."""
    out: list[str] = []
    stage, item_indent = None, None  # the stage being read; the indent of its deps' items while in its deps
    for line in text.splitlines(keepends=True):
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if re.fullmatch(r"  [A-Za-z_][\w-]*:", line.rstrip()):
            stage, item_indent = stripped[:-1], None
        elif item_indent is not None and stripped and not stripped.startswith("#") and indent < item_indent:
            item_indent = None  # the deps list has ended
        if item_indent is not None and indent == item_indent and stripped.startswith("- "):
            if stripped[2:].split("#")[0].strip().startswith(CODE_PREFIXES):
                continue  # an old code dep: the new ones are in already
        out.append(line)
        if stripped == "deps:" and stage in wanted:
            item_indent = indent + 2
            out += [f"{' ' * item_indent}- {d}\n" for d in wanted[stage]]
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check or write the code deps of dvc.yaml's stages.")
    parser.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    parser.add_argument("--repo", type=Path, default=REPO)
    args = parser.parse_args(argv)
    modules = Modules(args.repo)
    stages = load_stages(args.repo)
    wanted = definitions(modules, stages)
    if args.write:
        path = args.repo / "dvc.yaml"
        path.write_text(rewrite(path.read_text(), wanted))
        print(f"wrote the code deps of {len(wanted)} stages to {path}")
        return 0
    status = 0
    for stage in stages:
        needed, deps = required(modules, stage), code_deps(stage)
        missing = sorted(p for p in needed if not covered(p, deps))
        extra = [d for d in deps if not any(covered(p, (d,)) for p in needed)]
        status |= bool(missing or extra)
        print(f"{stage.name}: {'ok' if not (missing or extra) else 'OUT OF DATE'}"
              + "".join(f"\n  missing {p}" for p in missing) + "".join(f"\n  superfluous {d}" for d in extra))
    for key, deps in wanted.items():
        print(f"\n{key} code deps:\n" + "".join(f"  - {d}\n" for d in deps), end="")
    return status


if __name__ == "__main__":
    sys.exit(main())
