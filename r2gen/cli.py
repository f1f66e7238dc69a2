"""The `r2gen` command: generate, info, check-data, check-metrics, check-params, exp-report, sample-data.

User mistakes print one line (``error: ...``) and exit with status 2; ``--verbose`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import traceback
from pathlib import Path

import r2gen
from r2gen import layout
from r2gen.errors import R2GenError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MAX_EXP_SHOW_BYTES = 256 << 20  # a grid of hundreds of experiments is a few MB
MAX_SAMPLE_STUDIES = 100_000  # sample-data: 100k studies at 128 px is already gigabytes of PNGs
MAX_SAMPLE_SIZE = 2048  # sample-data px: the top of data.image_size's range (r2gen.config.RANGES)


def build_parser() -> argparse.ArgumentParser:
    """The `r2gen` argument parser: one subcommand per task, each bound to its ``cmd_*`` function."""
    parser = argparse.ArgumentParser(prog="r2gen", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"r2gen-precision {r2gen.__version__}")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write reports for new images with a trained model file")
    g.add_argument("--checkpoint", required=True, type=Path, help="model file, e.g. models/release/model.pt")
    g.add_argument("images", nargs="*", type=Path, help="the views of ONE study (IU X-Ray: frontal lateral)")
    g.add_argument("--study", action="append", type=Path, default=[],
                   help="a folder holding one study's views (0.png, 1.png, ...); repeatable")
    g.add_argument("--num-beams", type=_positive_int, default=3, help="beam size; 1 is greedy decoding")
    g.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="longest report in tokens, EOS included (default: the model's tokenizer max_seq_length)")
    g.add_argument("--block-trigrams", action="store_true",
                   help="with --num-beams 1: the public greedy's trigram penalty (evaluate.block_trigrams)")
    g.add_argument("--batch-size", type=_positive_int, default=8,
                   help="studies decoded at a time (bounds memory with many --study folders)")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--format", choices=["text", "jsonl"], default="text")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="what a model file holds: config, precision, backend, metrics, versions")
    i.add_argument("checkpoint", type=Path)
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("check-data", help="validate a dataset folder like `prepare` does, print per-split counts")
    c.add_argument("root", type=Path)
    c.add_argument("--dataset", choices=["iu_xray", "mimic_cxr"], default="iu_xray")
    c.add_argument("--on-invalid", choices=["error", "drop"], default="error")
    c.set_defaults(func=cmd_check_data)

    m = sub.add_parser("check-metrics", help="gate: compare workspace metrics with a baseline revision")
    m.add_argument("--base", default="HEAD", help="git revision holding the baseline metrics (default HEAD)")
    m.add_argument("--gate", type=Path, default=Path(layout.GATE), help="tolerances per metric")
    m.add_argument("--md", type=Path, nargs="?", const=Path(layout.METRICS_DIFF), default=None, metavar="PATH",
                   help=f"also write the verdict as a markdown PR comment (default {layout.METRICS_DIFF}) with the "
                        "loss-curve diff figure beside it; the terminal output is unchanged")
    m.set_defaults(func=cmd_check_metrics)

    e = sub.add_parser("exp-report", help="multi-seed comparison of a DVC experiment grid (README: Seeds, batch sizes)")
    e.add_argument("--rev", default=None, help="read the experiments of this baseline commit (default: HEAD's)")
    e.add_argument("--input", type=Path, default=None,
                   help="a saved `dvc exp show --json` instead of running it (histories read from git if present)")
    e.add_argument("--params", type=Path, default=Path(layout.PARAMS), help="holds exp_report (the TTQ target)")
    e.add_argument("--out", type=Path, default=Path(layout.EXPERIMENTS), help="output folder")
    e.set_defaults(func=cmd_exp_report)

    s = sub.add_parser("sample-data", help="write a synthetic chest X-ray dataset in R2Gen's layout")
    s.add_argument("out", type=Path)
    s.add_argument("--studies", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layout", choices=["iu_xray", "mimic_cxr"], default="iu_xray")
    s.add_argument("--image-size", type=int, default=128)
    s.set_defaults(func=cmd_sample_data)

    k = sub.add_parser("check-params", help="validate params.yaml as every stage reads it (`make repro` runs it before DVC)")
    k.add_argument("path", type=Path, nargs="?", default=Path("params.yaml"))
    k.set_defaults(func=cmd_check_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _tolerant_stdout()
    try:
        return args.func(args) or 0
    except R2GenError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`r2gen info m.pt | head`): stop quietly like other Unix tools, and
        # point stdout at /dev/null so that the interpreter's final flush does not fail again.
        _silence_stdout()
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE
    except StdoutError as exc:
        _silence_stdout()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Files are written through a temporary sibling and a rename: an interrupt leaves the old ones.
        print(f"error: interrupted (Ctrl-C) during `r2gen {args.command}`; no output file was left half-written",
              file=sys.stderr)
        return 130


class StdoutError(Exception):
    """Standard output could not be written (``> /dev/full``, a closed terminal): one line on stderr."""


def emit(text: str) -> None:
    """Print one line of a command's output to stdout, flushed; a write error is a StdoutError."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise StdoutError(f"cannot write to standard output: {exc.strerror or exc}; "
                          "redirect it to a file on a disk with free space (or pipe it to a reader)") from None


def _tolerant_stdout() -> None:
    """Characters the terminal's encoding cannot show (a report word, a non-UTF-8 folder name on a
    strict ASCII or UTF-8 stdout) are printed as backslash escapes instead of ending the command."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (OSError, ValueError):  # a closed or exotic stream: leave it as it is
                pass


def _silence_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests capture it)
        pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from r2gen import precision as prec
    from r2gen.checkpoint import build_model, load_model_file
    from r2gen.data.images import load_view
    from r2gen.tokenizer import Tokenizer

    studies = [_images_study(args.images)] if args.images else []
    studies += [_folder_study(folder) for folder in args.study]
    if not studies:
        raise R2GenError("no images given; pass the views of a study (IMAGE [IMAGE]) or --study DIR")

    ckpt = load_model_file(args.checkpoint)
    tokenizer = Tokenizer.load_dict(ckpt["tokenizer"], source=str(args.checkpoint))
    views, size = ckpt["data"]["views"], ckpt["data"]["image_size"]
    for name, paths in studies:  # all counts checked before any image is decoded
        if len(paths) != views:
            raise R2GenError(
                f"study {name}: {len(paths)} image(s) given but this model ({ckpt['data']['dataset']}) reads "
                f"{views} view(s) per study{' (frontal, then lateral)' if views == 2 else ''}"
            )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise R2GenError("--device cuda was given but no CUDA device is usable here; use --device cpu")
    device = torch.device(args.device)
    prec.set_fp32_numerics(device)  # as the evaluate stage: fp32 means IEEE fp32 (no TF32 convs on CUDA)
    model = build_model(ckpt, args.checkpoint).to(device)
    positions = model.embed.pe.shape[0]  # the decoder's positional table bounds the report length
    max_tokens = args.max_new_tokens if args.max_new_tokens is not None else tokenizer.max_seq_length
    if max_tokens > positions:
        raise R2GenError(f"--max-new-tokens {max_tokens} is over this model's limit of {positions} tokens")
    if args.block_trigrams and args.num_beams != 1:
        raise R2GenError(f"--block-trigrams applies to greedy decoding only (--num-beams 1), got --num-beams {args.num_beams}")

    for start in range(0, len(studies), args.batch_size):
        chunk = studies[start : start + args.batch_size]
        # load_view returns read-only arrays; np.stack copies them into one writable block.
        images = torch.from_numpy(np.stack([[load_view(p, size) for p in paths] for _, paths in chunk]))  # (B, V, S, S)
        ids = model.generate(images.to(device), num_beams=args.num_beams, max_new_tokens=max_tokens,
                             block_trigrams=args.block_trigrams)
        for (name, paths), report in zip(chunk, tokenizer.batch_decode(ids.cpu())):
            if args.format == "jsonl":
                emit(json.dumps({"study": name, "images": [str(p) for p in paths], "report": report}))
            else:
                emit(f"{name}: {report}")
    return 0


def _images_study(paths: list[Path]) -> tuple[str, list[Path]]:
    """The views given on the command line, named after the folder of the first one."""
    for path in paths:
        if path.is_dir():
            raise R2GenError(f"{path} is a folder; pass it as --study {path}, or pass its image files")
    from r2gen.data.datasets import shown

    return shown(os.path.basename(os.path.dirname(os.path.abspath(paths[0]))) or "images"), paths


def _folder_study(folder: Path) -> tuple[str, list[Path]]:
    """The views in a study folder, frontal first when the names tell (:func:`order_views`), else in name order."""
    from r2gen.data.datasets import shown
    if not folder.is_dir():
        raise R2GenError(f"study folder not found: {folder}; pass a folder holding the study's images")
    try:
        views = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise R2GenError(f"cannot list study folder {folder}: {exc.strerror}; check its permissions") from None
    if not views:
        raise R2GenError(f"study folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    # Like a dataset's images folder, a study folder is not a way to read files elsewhere.
    inside = Path(os.path.realpath(folder))
    for view in views:
        real = Path(os.path.realpath(view))
        if not real.is_relative_to(inside):
            raise R2GenError(f"image {view} is a symlink to {real}, outside {folder}; copy the file into the folder")
    ordered, known = order_views(views)
    if not known:
        print(f"warning: cannot tell the frontal from the lateral view in {shown(folder)} by file name "
              f"({', '.join(shown(v.name) for v in views)}); using name order, frontal first "
              "(name them 0.png/1.png, or PA/AP/frontal and LAT/lateral)", file=sys.stderr)
    return shown(folder.name), ordered


_FRONTAL = {"0", "pa", "ap", "frontal", "front", "f"}
_LATERAL = {"1", "lat", "lateral", "ll", "rl", "side", "l"}


def order_views(paths: list[Path]) -> tuple[list[Path], bool]:
    """``paths`` with the frontal view first, and whether the file names told which is which.

    A name tells when one word of its stem (split at non-alphanumerics, case ignored) is a frontal
    (0, PA, AP, frontal) or lateral (1, LAT, lateral, LL, RL) name and none of the other kind. One
    view needs no order; with two, exactly one frontal and one lateral must be found.
    """
    if len(paths) != 2:
        return paths, True
    kinds = []
    for path in paths:
        words = set(re.split(r"[^a-z0-9]+", path.stem.lower()))
        frontal, lateral = bool(words & _FRONTAL), bool(words & _LATERAL)
        kinds.append("frontal" if frontal and not lateral else "lateral" if lateral and not frontal else None)
    if sorted(map(str, kinds)) != ["frontal", "lateral"]:
        return paths, False
    return sorted(paths, key=lambda p: kinds[paths.index(p)] != "frontal"), True


def cmd_info(args: argparse.Namespace) -> int:
    from r2gen.checkpoint import build_model, load_model_file

    ckpt = load_model_file(args.checkpoint)
    # Built, not summed over the state dict: that also holds buffers (BatchNorm statistics).
    parameters = sum(p.numel() for p in build_model(ckpt, args.checkpoint).parameters())
    train = ckpt["info"].get("train", {})
    out = {
        "file": str(args.checkpoint),
        "format": ckpt["format"],
        "written_by": ckpt["version"],
        "precision": train.get("precision"),
        "backend": train.get("backend"),
        "data": ckpt["data"],
        "vocab_size": ckpt["vocab_size"],
        "model_config": ckpt["model_config"],
        "parameters": parameters,
        "training": train,
    }
    emit(json.dumps(_finite(out), indent=2, allow_nan=False))
    return 0


def _finite(obj):
    """``obj`` with NaN/Inf floats as null: the output stays valid JSON for jq and friends."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def cmd_check_data(args: argparse.Namespace) -> int:
    from r2gen.config import DataConfig
    from r2gen.data.datasets import shown, validate_dataset

    result = validate_dataset(DataConfig(dataset=args.dataset, root=str(args.root), on_invalid=args.on_invalid))
    for split, n in result.counts.items():
        emit(f"{split}: {n} {'study' if n == 1 else 'studies'}")
    for split, sid, reason in result.dropped:
        emit(f"dropped {split}/{shown(sid)}: {reason}")  # reason: escaped where it is made
    emit(f"ok: {shown(args.root)} is a valid {args.dataset} dataset ({sum(result.counts.values())} studies)")
    return 0


def cmd_check_metrics(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    from r2gen.gate import evaluate, load_rules, stated_reasons, summary_line
    from r2gen.io import read_yaml

    raw = read_yaml(args.gate, what="gate file", fix="run from the repository root or pass --gate FILE")
    precisions, rules = load_rules(raw, str(args.gate))
    dvc = shutil.which("dvc")
    if dvc is None:
        raise R2GenError("dvc not found on PATH; activate the project's venv (source .venv/bin/activate)")
    proc = subprocess.run([dvc, "metrics", "diff", args.base, "--all", "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        last = next((ln.strip() for ln in reversed(proc.stderr.splitlines()) if ln.strip()), f"exit {proc.returncode}")
        raise R2GenError(f"`dvc metrics diff {args.base}` failed: {last[:300]}; check that {args.base} is a "
                         "revision of this repository and that `dvc metrics diff` works here")
    try:
        diff = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        raise R2GenError(f"`dvc metrics diff` printed no JSON: {proc.stdout[:200]!r}") from None
    checks = evaluate(diff, precisions, rules, stated_reasons(rules, precisions))
    for check in checks:
        emit(check.line())
    emit(summary_line(checks, args.base))
    if args.md is not None:
        _write_metrics_md(args.md, checks, args.base, precisions)
    return 1 if any(not c.ok for c in checks) else 0


def _write_metrics_md(path: Path, checks: list, base: str, precisions: list[str]) -> None:
    """``check-metrics --md``: the gate's table and the loss-curve diff (baseline from git, workspace files)."""
    import subprocess

    from r2gen.compare.loss_diff import load_losses, loss_diff_markdown
    from r2gen.gate import render_markdown
    from r2gen.io import write_text

    def from_base(rel: str) -> str | None:
        proc = subprocess.run(["git", "show", f"{base}:{rel}"], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else None

    def from_workspace(rel: str) -> str | None:
        return Path(rel).read_text(encoding="utf-8") if Path(rel).is_file() else None

    figure = layout.metrics_diff_figure(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.unlink(missing_ok=True)  # a figure of an earlier run must not pass for this one
        losses = loss_diff_markdown(load_losses(from_base, precisions), load_losses(from_workspace, precisions),
                                    precisions, base, figure)
        write_text(path, render_markdown(checks, base, losses))
    except OSError as exc:
        raise R2GenError(f"cannot write the metrics diff {path}: {exc.strerror or exc}; "
                         "pass --md PATH in a writable folder") from None
    emit(f"markdown: {path}" + (f" (figure {figure})" if figure.exists() else ""))


def cmd_exp_report(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    from r2gen.compare.analysis import analyse
    from r2gen.compare.dvclive import load_history
    from r2gen.compare.exp_show import parse_exp_show
    from r2gen.compare.grid import build_report
    from r2gen.compare.grid_findings import conclusions
    from r2gen.compare.ttq import QualityTarget
    from r2gen.config import Params
    from r2gen.io import read_yaml

    params = Params.from_dict(read_yaml(args.params, what="params file", fix="run from the repository root or pass --params"),
                              str(args.params))
    cfg = params.exp_report
    target = QualityTarget(cfg.ttq_metric, cfg.ttq_relative, cfg.ttq_absolute)
    if args.input is not None:
        fix = "save it with `dvc exp show --json > FILE`"
        if not args.input.is_file():  # a folder, a FIFO (reading it could block) or nothing
            raise R2GenError(f"--input {args.input} is not a file; {fix}")
        if args.input.stat().st_size > MAX_EXP_SHOW_BYTES:
            raise R2GenError(f"--input {args.input} is over {MAX_EXP_SHOW_BYTES >> 20} MB, not a `dvc exp show --json`; {fix}")
        try:
            rows = json.loads(args.input.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:150] if str(exc) else type(exc).__name__
            raise R2GenError(f"cannot read {args.input} as JSON ({detail}); {fix}") from None
    else:
        dvc = shutil.which("dvc")
        if dvc is None:
            raise R2GenError("dvc not found on PATH; activate the project's venv (source .venv/bin/activate)")
        cmd = [dvc, "exp", "show", "--json"] + (["--rev", args.rev] if args.rev else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise R2GenError(f"`{' '.join(cmd[1:])}` failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        try:
            rows = json.loads(proc.stdout or "[]")
        except ValueError:
            raise R2GenError(f"`dvc exp show --json` printed no JSON: {proc.stdout[:200]!r}") from None
    experiments, skipped = parse_exp_show(rows)

    def git_reader(rev: str):
        def read(path: str) -> str | None:  # a file of the experiment's commit, None when absent
            out = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
            return out.stdout if out.returncode == 0 else None
        return read

    histories = {(e.rev, p): load_history(git_reader(e.rev), layout.live_run(p).as_posix(), target.metric)
                 for e in experiments for p in e.train}
    analysis = analyse(experiments, histories, target, skipped=skipped)
    build_report(analysis, args.out)
    for line in conclusions(analysis):
        emit(f"- {line}")
    emit(f"{len(experiments)} experiments in {len(analysis.groups)} group(s)"
          + (f"; left out: {'; '.join(skipped)}" if skipped else "")
          + f"\nwrote {args.out / layout.EXPERIMENTS_REPORT}, {layout.EXPERIMENTS_JSON} and {layout.FIGURES}/")
    return 0


def cmd_sample_data(args: argparse.Namespace) -> int:
    from r2gen.data.synthetic import generate_sample

    # Lower bounds are generate_sample's (with their reasons); these stop a typo from filling the disk.
    for flag, value, most in (("--studies", args.studies, MAX_SAMPLE_STUDIES), ("--image-size", args.image_size, MAX_SAMPLE_SIZE),
                              ("--seed", args.seed, 2**32 - 1)):
        if value > most:
            shown = value if len(str(value)) < 30 else f"{str(value)[:20]}... ({len(str(value))} digits)"
            raise R2GenError(f"sample-data {flag} {shown} is too large: use at most {most:,}")
    summary = generate_sample(args.out, args.studies, args.seed, layout=args.layout, image_size=args.image_size)
    emit(json.dumps(summary, indent=2))
    return 0


def cmd_check_params(args: argparse.Namespace) -> int:
    """Every section and every precision's train spec, with the loader the stages use.

    DVC parses params.yaml itself before any stage runs, with none of our checks: a YAML alias bomb
    costs it about a minute and ends in DVC's own "unexpected error". This check refuses such a file
    (and any other invalid value) in under a second, so `make repro` runs it first.
    """
    from r2gen.config import PRECISIONS, Params, TrainSpec
    from r2gen.data.datasets import shown
    from r2gen.errors import ConfigError
    from r2gen.io import read_yaml

    raw = read_yaml(args.path, what="params file", error=ConfigError,
                    fix="run from the repository root (where params.yaml is) or name the file")
    params = Params.from_dict(raw, source=str(args.path))
    for precision in PRECISIONS:
        TrainSpec.of(params, precision)
    emit(f"{shown(str(args.path))}: valid (precision {params.precision}; train sections for "
         f"{', '.join(PRECISIONS)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
