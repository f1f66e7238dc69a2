"""Benchmark: our R2Gen vs the public R2Gen code, on the same machine, data, config and thread count.

    python -m benchmarks.run --profile sample                     # minutes on a CPU (make bench)
    python -m benchmarks.run --profile paper --reference-src ~/src/R2Gen
    python -m benchmarks.run --profile paper --impl before=/tmp/r2gen-old   # another checkout of ours
    python -m benchmarks.run --profile paper --variant lowmem:visual_recompute=5  # a model option of ours

Protocol:
- Data: a synthetic IU X-Ray dataset (``r2gen.data.synthetic``, PNGs at ``profile.source_size``)
  made once under ``--work-dir``. Our side reads it through the prepared uint8 cache, as the
  pipeline does (built once, its time reported as ``prepare_seconds``); the public code decodes
  the PNGs in its training loop, as it does.
- Every measurement runs in a fresh process (``benchmarks.worker``) at ``--threads`` threads, so
  its peak RSS is its own. Rounds are interleaved: each of ``--repeats`` rounds measures the
  matmul peak, then every implementation x precision (fp32, bf16, fp32, bf16, ...), training then
  generation. Figures are medians over rounds; every run is kept in the JSON with the machine's
  load average before/after and ``other_cores`` (CPU time of other processes per wall second).
- Training: ``warmup_steps`` untimed steps, then ``train_steps`` timed steps of ``batch_size``
  studies (a step's time includes loading its batch). Generation: a one-study warm-up, then
  ``gen_batches`` batches with beam ``num_beams`` to ``max_len`` tokens. ``generate`` runs the full
  ``max_len`` steps like the public code (no early exit; the cost does not depend on what the
  untrained model writes); ours is also timed with its early exit (``generate_early_exit``).
- Rates per wall second are the headline; rates per CPU second of the measuring process
  (``*_per_cpu_s``) are recorded too: on a shared machine a busy neighbour steals wall time from a
  1-thread run (see ``other_cores``), much less its CPU time.
- FLOPs (matmuls, convolutions, attention) are counted once per implementation with
  ``torch.utils.flop_counter``; achieved GFLOP/s = FLOPs per sample x samples/s.

Writes ``<out>/<profile>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from benchmarks import reference
from benchmarks.measure import PROFILES, Profile, loadavg, thread_env
from r2gen.config import PRECISIONS, DataConfig, ModelConfig
from r2gen.data.images import load_prepared, prepare_dataset
from r2gen.data.synthetic import generate_sample
from r2gen.errors import R2GenError
from r2gen.io import write_json
from r2gen.precision import cpu_support
from r2gen.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SEED = 9223  # R2Gen's run_iu_xray.sh seed
# CPUs without native bf16 run bf16 GEMMs ~100x slower than fp32: opt-in for the big profiles.
DEFAULT_PRECISIONS = {"tiny": "fp32,bf16", "sample": "fp32,bf16", "paper": "fp32", "resnet18": "fp32"}


# ------------------------------------------------------------------------------------------ data
def prepare_data(profile: Profile, work_dir: Path) -> dict:
    """The synthetic dataset, its prepared cache and tokenizer for ``profile`` (made once, then reused)."""
    root = work_dir / f"iu_xray-{profile.studies}-{profile.source_size}px"
    if not (root / "annotation.json").is_file():
        generate_sample(root, studies=profile.studies, seed=0, image_size=profile.source_size)
    prepared = work_dir / f"{root.name}-prepared-{profile.image_size}px"
    if not (prepared / "summary.json").is_file():
        prepare_dataset(DataConfig(dataset="iu_xray", root=str(root), image_size=profile.image_size), prepared)
    tokenizer = work_dir / f"{root.name}-tokenizer-{profile.max_len}.json"
    if not tokenizer.is_file():
        reports = load_prepared(prepared, "train").reports
        Tokenizer.build(reports, "iu_xray", threshold=3, max_seq_length=profile.max_len).save(tokenizer)
    summary = json.loads((prepared / "summary.json").read_text(encoding="utf-8"))
    return {"root": str(root), "prepared": str(prepared), "tokenizer": str(tokenizer),
            "prepare_seconds": summary.get("seconds"), "counts": summary.get("counts")}


# ------------------------------------------------------------------------------------------ runs
def run_worker(spec: dict, isolate: bool) -> dict:
    """One measurement: in a fresh process (``isolate``), or in this one (tests; peak memory is shared)."""
    if not isolate:
        from benchmarks.worker import run_spec

        return {**run_spec(spec), "isolated": False}
    with tempfile.TemporaryDirectory(prefix="r2gen-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        env = {**os.environ, **thread_env(spec["threads"])}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec_path), str(out_path)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            why = (f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
                   if proc.returncode < 0 else f"exit status {proc.returncode}")
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"benchmark worker {spec['impl']}/{spec['phase']}/{spec.get('precision')} {why}:\n{tail}")
        return {**json.loads(out_path.read_text(encoding="utf-8")), "isolated": True}


def _value(text: str):
    """A --variant value: int, float, true/false/null, or the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_variant(item: str, profile: Profile) -> dict:
    """``LABEL:KEY=VALUE[,KEY=VALUE]`` -> an implementation entry of ours with those model options."""
    label, sep, assignments = item.partition(":")
    pairs = [a.partition("=") for a in assignments.split(",")] if assignments else []
    if not sep or not label or label in ("ours", "reference") or not pairs or any(not k or not e for k, e, _ in pairs):
        raise R2GenError(f"--variant {item!r}: expected LABEL:KEY=VALUE[,KEY=VALUE] with model options, "
                         "e.g. lowmem:visual_recompute=5")
    overrides = {k: _value(v) for k, _, v in pairs}
    unknown = sorted(set(overrides) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise R2GenError(f"--variant {item!r}: {', '.join(unknown)} is not a model option; "
                         f"choose from {', '.join(f.name for f in fields(ModelConfig))}")
    ModelConfig(**{**profile.model, **overrides})  # ConfigError (an R2GenError) names a bad value
    return {"label": label, "impl": "ours", "src": None, "model": overrides}


def implementations(reference_src: str | None, impls: list[str], profile: Profile,
                    variants: list[str] = ()) -> tuple[list[dict], str | None]:
    """[{label, impl, src[, model]}] to measure, and why the public code is not among them (or None)."""
    out = [{"label": "ours", "impl": "ours", "src": None}]
    for item in impls:
        label, sep, path = item.partition("=")
        if not sep or not label or label in ("ours", "reference"):
            raise R2GenError(f"--impl {item!r}: expected LABEL=PATH (a checkout of this project), e.g. before=/tmp/old")
        if not (Path(path) / "r2gen" / "model" / "r2gen.py").is_file():
            raise R2GenError(f"--impl {label}={path}: no r2gen/model/r2gen.py there; point it at a checkout of this project")
        out.append({"label": label, "impl": "ours", "src": str(Path(path).resolve())})
    out += [parse_variant(item, profile) for item in variants]
    labels = [impl["label"] for impl in out]
    if len(set(labels)) < len(labels):
        raise R2GenError(f"--impl/--variant labels must differ, got {', '.join(labels[1:])}")
    skipped = None
    if reference_src is None:
        skipped = "no --reference-src given"
    elif missing := reference.missing_files(reference_src):
        raise R2GenError(f"--reference-src {reference_src}: not a checkout of the public R2Gen code "
                         f"(missing {', '.join(missing)}); git clone https://github.com/cuhksz-nlp/R2Gen and point at it")
    elif not profile.reference_ok:
        skipped = (f"profile {profile.name} uses {profile.model.get('visual_extractor')} at "
                   f"{profile.image_size} px; the public code needs a torchvision ResNet at 224 px")
    else:
        out.append({"label": "reference", "impl": "reference", "src": str(Path(reference_src).resolve())})
    return out, skipped


PHASES = ("train", "generate")


def run_benchmark(profile: Profile, precisions: list[str], *, repeats: int = 3, threads: int = 1,
                  device: str = "cpu", reference_src: str | None = None, impls: list[str] = (),
                  variants: list[str] = (), phases: list[str] = PHASES, work_dir: Path = Path("bench-results/data"),
                  isolate: bool = True, log=print) -> dict:
    """Measure ``profile`` and return the results document (see the module docstring)."""
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise R2GenError(f"--precisions {','.join(precisions)}: each must be one of {', '.join(PRECISIONS)}")
    if not phases or any(p not in PHASES for p in phases):
        raise R2GenError(f"--phases {','.join(phases)}: each must be one of {', '.join(PHASES)}")
    if repeats < 1 or threads < 1:
        raise R2GenError("--repeats and --threads must be at least 1")
    impl_list, reference_skipped = implementations(reference_src, list(impls), profile, list(variants))
    data = prepare_data(profile, Path(work_dir))
    base = {"profile": profile.to_dict(), "threads": threads, "device": device, "seed": SEED, "data": data,
            "phases": list(phases)}

    def measure(impl: dict, phase: str, **extra) -> dict:
        spec = {**base, **impl, "phase": phase, **extra}
        started = time.time()
        record = run_worker(spec, isolate)
        log(f"  {impl['label']:>10} {extra.get('precision', ''):>5} {phase:<19} {_headline(record)} "
            f"({time.time() - started:.0f} s, other cores {_fmt(record.get('other_cores'), '.2f')})")
        return {**{k: v for k, v in spec.items() if k in ("label", "phase", "precision", "repeat", "early_exit")},
                **record}

    log(f"benchmark {profile.name}: {len(impl_list)} implementation(s) x {','.join(precisions)}, "
        f"{repeats} round(s), {threads} thread(s), {device}")
    flops = {impl["label"]: measure(impl, "flops", precision="fp32") for impl in impl_list}
    dtypes = ["float32"] + (["bfloat16"] if "bf16" in precisions or "fp8" in precisions else [])
    runs = []
    for repeat in range(repeats):
        log(f"round {repeat + 1}/{repeats}")
        runs.append({"label": "machine", "phase": "matmul", "repeat": repeat,
                     **run_worker({**base, "impl": "matmul", "phase": "matmul", "dtypes": dtypes}, isolate)})
        for impl in impl_list:
            for precision in precisions if impl["impl"] == "ours" else ["fp32"]:
                if "train" in phases:
                    runs.append(measure(impl, "train", precision=precision, repeat=repeat))
                if "generate" not in phases:
                    continue
                runs.append(measure(impl, "generate", precision=precision, repeat=repeat, early_exit=False))
                if impl["impl"] == "ours":
                    runs.append(measure(impl, "generate_early_exit", precision=precision, repeat=repeat,
                                        early_exit=True))
    return summarize(profile, precisions, threads, device, data, impl_list, reference_skipped, flops, runs)


def _headline(record: dict) -> str:
    if "samples_per_s" in record:
        return f"{record['samples_per_s']:.3f} samples/s, peak {record['peak_memory_bytes'] / 2**30:.2f} GiB"
    if "reports_per_s" in record:
        return f"{record['reports_per_s']:.3f} reports/s, mean length {record['mean_length']:.1f}"
    if "train_per_sample" in record or "generate_per_report" in record:
        parts = []
        if "train_per_sample" in record:
            parts.append(f"{record['train_per_sample'] / 1e9:.2f} GFLOP/sample (train)")
        if "generate_per_report" in record:
            parts.append(f"{record['generate_per_report'] / 1e9:.2f} GFLOP/report (generate)")
        return ", ".join(parts)
    return ""


# ------------------------------------------------------------------------------------------ results
def _median_of(runs: list[dict], key: str) -> dict | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(profile, precisions, threads, device, data, impl_list, reference_skipped, flops, runs) -> dict:
    """Medians, achieved GFLOP/s, and the ratios the issue asks for."""
    matmul = {dtype: _median_of([r[dtype] for r in runs if r["phase"] == "matmul"], "gflops")
              for dtype in ("float32", "bfloat16") if any(dtype in r for r in runs if r["phase"] == "matmul")}
    peak_fp32 = matmul["float32"]["median"]
    results: dict = {}
    for impl in impl_list:
        label = impl["label"]
        per_impl = results.setdefault(label, {})
        for precision in precisions if impl["impl"] == "ours" else ["fp32"]:
            mine = [r for r in runs if r["label"] == label and r.get("precision") == precision]
            train = [r for r in mine if r["phase"] == "train"]
            entry = {
                "train_samples_per_s": _median_of(train, "samples_per_s"),
                "train_samples_per_cpu_s": _median_of(train, "samples_per_cpu_s"),
                "train_peak_memory_bytes": _median_of(train, "peak_memory_bytes"),
                "generate_reports_per_s": _median_of([r for r in mine if r["phase"] == "generate"], "reports_per_s"),
                "generate_reports_per_cpu_s": _median_of([r for r in mine if r["phase"] == "generate"],
                                                         "reports_per_cpu_s"),
                "generate_peak_memory_bytes": _median_of([r for r in mine if r["phase"] == "generate"],
                                                         "peak_memory_bytes"),
                "generate_mean_length": _median_of([r for r in mine if r["phase"] == "generate"], "mean_length"),
            }
            early = [r for r in mine if r["phase"] == "generate_early_exit"]
            if early:
                entry["generate_early_exit_reports_per_s"] = _median_of(early, "reports_per_s")
                entry["generate_early_exit_mean_length"] = _median_of(early, "mean_length")
            f = flops[label]
            train_rate, gen_rate = entry["train_samples_per_s"], entry["generate_reports_per_s"]
            entry["train_gflops_per_sample"] = train_rate and f["train_per_sample"] / 1e9
            entry["generate_gflops_per_report"] = gen_rate and f["generate_per_report"] / 1e9
            entry["train_achieved_gflops"] = train_rate and entry["train_gflops_per_sample"] * train_rate["median"]
            entry["generate_achieved_gflops"] = gen_rate and entry["generate_gflops_per_report"] * gen_rate["median"]
            entry["train_fraction_of_fp32_matmul_peak"] = train_rate and entry["train_achieved_gflops"] / peak_fp32
            entry["parameters"] = train[0]["parameters"] if train else None
            entry["peak_memory_kind"] = mine[0]["peak_memory_kind"]
            entry["backend"] = mine[0]["backend"]
            per_impl[precision] = entry
    return {
        "profile": profile.to_dict(),
        "precisions": precisions,
        "threads": threads,
        "device": device,
        "machine": machine_info(device),
        "isolated": all(r.get("isolated", False) for r in runs),
        "data": data,
        "reference_skipped": reference_skipped,
        "implementations": impl_list,
        "matmul_peak_gflops": matmul,
        "flops": {label: f for label, f in flops.items()},
        "results": results,
        "ratios": ratios(results, precisions),
        "runs": runs,
    }


def ratios(results: dict, precisions: list[str]) -> dict:
    """ours/reference (fp32), other checkouts and variants over ours and over the reference (fp32),
    and each precision over fp32 (ours)."""
    def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
        if not a or not b or a.get(key) is None or b.get(key) is None:
            return None
        return a[key]["median"] / b[key]["median"]

    keys = ("train_samples_per_s", "generate_reports_per_s", "train_peak_memory_bytes",
            "train_samples_per_cpu_s", "generate_reports_per_cpu_s")
    out: dict = {}
    ours = results["ours"].get("fp32")
    for label, per_impl in results.items():
        if label == "ours":
            continue
        name = "ours/reference" if label == "reference" else f"{label}/ours"
        a, b = (ours, per_impl.get("fp32")) if label == "reference" else (per_impl.get("fp32"), ours)
        out[name] = {k: ratio(a, b, k) for k in keys}
        if label != "reference" and "reference" in results:  # a variant against the targets
            out[f"{label}/reference"] = {k: ratio(per_impl.get("fp32"), results["reference"].get("fp32"), k)
                                         for k in keys}
    for precision in precisions:
        if precision != "fp32" and "fp32" in precisions:
            out[f"{precision}/fp32"] = {k: ratio(results["ours"][precision], ours, k)
                                        for k in keys + ("generate_early_exit_reports_per_s",)}
    return out


def machine_info(device: str) -> dict:
    import torch

    info = {
        "cpu": _cpu_name(),
        "cpu_support": cpu_support(),
        "logical_cpus": os.cpu_count(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "loadavg_at_end": loadavg(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------ table
def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def table(doc: dict) -> str:
    """The results as a markdown table, one row per implementation x precision, then the ratios."""
    m = doc["machine"]
    peak = doc["matmul_peak_gflops"]
    head = (f"profile {doc['profile']['name']} | {doc['threads']} thread(s) | {m['cpu']} "
            f"({m['cpu_support']['capability']}, native bf16: {m['cpu_support']['bf16']}) | matmul peak "
            + ", ".join(f"{d} {v['median']:.1f} GFLOP/s" for d, v in peak.items()))
    rows = ["| impl | precision | train samples/s | train peak memory | train GFLOP/s (% of fp32 matmul peak) "
            "| generation reports/s | reports/s with early exit | params |",
            "|---|---|---|---|---|---|---|---|"]
    for label, per_impl in doc["results"].items():
        for precision, e in per_impl.items():
            t, g = e["train_samples_per_s"], e["generate_reports_per_s"]
            early = e.get("generate_early_exit_reports_per_s")
            train = (f"{t['median']:.3g} ({t['min']:.3g}-{t['max']:.3g}) "
                     f"| {e['train_peak_memory_bytes']['median'] / 2**30:.2f} GiB "
                     f"| {e['train_achieved_gflops']:.3g} ({100 * e['train_fraction_of_fp32_matmul_peak']:.0f} %)"
                     if t else "- | - | -")
            params = f"{e['parameters'] / 1e6:.1f} M" if e["parameters"] else "-"
            rows.append(f"| {label} | {precision} | {train} | {_fmt(g and g['median'])} "
                        f"| {_fmt(early and early['median'])} | {params} |")
    lines = [head, "", *rows, ""]
    for name, r in doc["ratios"].items():
        lines.append(f"{name}: train {_fmt(r['train_samples_per_s'], '.2f')}x, generation "
                     f"{_fmt(r['generate_reports_per_s'], '.2f')}x, train peak memory "
                     f"{_fmt(r['train_peak_memory_bytes'], '.2f')}x (per CPU second: train "
                     f"{_fmt(r['train_samples_per_cpu_s'], '.2f')}x, generation "
                     f"{_fmt(r['generate_reports_per_cpu_s'], '.2f')}x)")
    if doc["reference_skipped"]:
        lines.append(f"reference not measured: {doc['reference_skipped']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="sample", choices=list(PROFILES))
    parser.add_argument("--precisions", help="comma-separated; default fp32,bf16 (sample), fp32 (paper, resnet18)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; figures are medians (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, pinned (default 1)")
    parser.add_argument("--phases", default="train,generate", help="what to time (default train,generate)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reference-src", help="a checkout of github.com/cuhksz-nlp/R2Gen to time side by side")
    parser.add_argument("--impl", action="append", default=[], metavar="LABEL=PATH",
                        help="another checkout of this project to time side by side (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                        help="ours with these model options, e.g. lowmem:visual_recompute=5 (repeatable)")
    parser.add_argument("--out", default="bench-results", help="folder for <profile>.json (default bench-results)")
    parser.add_argument("--work-dir", default="bench-results/data", help="synthetic data and caches")
    parser.add_argument("--no-isolate", action="store_true", help="run in this process (peak memory is shared)")
    args = parser.parse_args(argv)

    profile = PROFILES[args.profile]
    precisions = (args.precisions or DEFAULT_PRECISIONS[profile.name]).split(",")
    try:
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise R2GenError("--device cuda but no CUDA device is usable; run with --device cpu")
        doc = run_benchmark(profile, precisions, repeats=args.repeats, threads=args.threads, device=args.device,
                            reference_src=args.reference_src, impls=args.impl, variants=args.variant,
                            phases=args.phases.split(","), work_dir=Path(args.work_dir),
                            isolate=not args.no_isolate, log=lambda line: print(line, file=sys.stderr, flush=True))
    except R2GenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc = {"command": shlex.join(["python", "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
           **doc}
    out = Path(args.out) / f"{profile.name}.json"
    write_json(out, doc)
    print(table(doc))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
