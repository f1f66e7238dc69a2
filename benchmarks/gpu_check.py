"""The one-call device check: ``make gpu-check`` (README, "GPU check").

    python -m benchmarks.gpu_check --device cuda --out reports/gpu      # the paper profile, ~5-8 min on an H200
    python -m benchmarks.gpu_check --device cpu --out /tmp/gpu-check    # the same code at a tiny size (numerics only)

1. Environment: which modules import (one line naming the missing ones and what to carry), the
   machine (device, compute capability, torch/CUDA/cuDNN, Transformer Engine and torchao versions).
2. Benchmark (:mod:`benchmarks.gpu_bench`): fp32, fp16, bf16, fp8 (backend ``auto``) on R2Gen at
   the chosen size, random init, synthetic input: ``warmup`` untimed then ``steps`` timed training
   steps at the equal batch, then the largest batch that fits and a few timed steps there.
   samples/s, ratio vs fp32, peak allocated/reserved memory, loss after the steps vs fp32, MFU
   against the datasheet peak of that precision (:mod:`r2gen.flops`; fp32 against the FP32 peak:
   TF32 is off) and against a measured GEMM rate; ``torch.profiler`` top operators per precision.
3. End to end (:mod:`benchmarks.gpu_e2e`): every stage of dvc.yaml on the sample data, one epoch, on
   the same device.

Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (``--out`` default: ``$OUT`` when set,
else ``reports/gpu`` on cuda and ``bench-results/gpu-check-cpu`` on cpu). A CPU run is labelled "numerics only: not a GPU measurement" everywhere;
every part says whether it ran, and why not.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
# What each part imports beyond the standard library; wheels for the "e2e" ones: make gpu-wheels.
NEEDED = {"benchmark": ("torch", "torchvision", "numpy", "yaml"),
          "e2e": ("dvclive", "pycocoevalcap", "pandas", "matplotlib", "PIL", "tqdm")}
OPTIONAL = ("transformer_engine", "torchao")


def import_check() -> dict:
    """Which needed and optional modules import here; one line that names what to carry."""
    found = {}
    for name in [n for names in NEEDED.values() for n in names] + list(OPTIONAL):
        if importlib.util.find_spec(name) is None:
            found[name] = None
            continue
        try:
            module = importlib.import_module(name)
            found[name] = str(getattr(module, "__version__", "present"))
        except Exception as exc:  # noqa: BLE001 - e.g. TE's CUDA libraries do not match: absent, with why
            found[name] = None
            found[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    missing = {part: [n for n in names if found.get(n) is None] for part, names in NEEDED.items()}
    line = "imports: all present" if not any(missing.values()) else "imports missing: " + "; ".join(
        f"{part}: {', '.join(names)}" for part, names in missing.items() if names) + \
        " (carry .gpu-wheels built by `make gpu-wheels`; README, GPU check)"
    return {"modules": found, "missing": missing, "line": line}


def machine(device: torch.device) -> dict:
    from r2gen import flops
    from r2gen.precision import probe_hardware

    hw = probe_hardware(device)
    peak = flops.device_peak(hw.device_name) if device.type == "cuda" else None
    return {"device": str(device), "device_name": hw.device_name,
            "compute_capability": ".".join(map(str, hw.capability)) if hw.capability else None,
            "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(), "host": platform.node(),
            "transformer_engine": hw.te_version, "transformer_engine_error": hw.te_error,
            "datasheet_peak_tflops": peak.tflops if peak else None,
            "datasheet_peak_source": peak.source if peak else ("no datasheet entry for this device"
                                                               if device.type == "cuda" else "CPU: no peak table")}


def equal_batch(size, precision: str, device: torch.device, seed: int) -> dict:
    """One precision at the equal batch: timed steps, then a profile of a few more."""
    from benchmarks import gpu_bench, gpu_profile

    runner = gpu_bench.Runner(size, precision, device, seed)
    row = {"precision": precision, "plan": runner.plan.describe(),
           "fp8_layers": {k: runner.conversion[k] for k in ("linear_converted", "linear_total")}}
    row["equal"] = runner.timed(size.batch, size.warmup, size.steps)
    row["profile"] = gpu_profile.profile_steps(runner, size.batch, size.profile_steps)
    return row


def largest_batch(size, precision: str, device: torch.device, seed: int) -> dict:
    """One precision, a fresh model: the largest batch that fits, and a few timed steps there."""
    from benchmarks import gpu_bench

    runner = gpu_bench.Runner(size, precision, device, seed)
    search = gpu_bench.largest_batch(runner)
    return {"ran": True, "search": search, **runner.timed(search["batch"], 1, size.max_steps)}


def _guarded(errors: dict, key: str, device: torch.device, fn, *args):
    """``fn(*args)``, or None with the error recorded: one precision failing must not hide the others' figures."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        errors[key + "_traceback"] = traceback.format_exc()[-2000:]
        return None
    finally:
        gc.collect()  # the runner's model, optimizer and pool, before the next precision measures its memory
        if device.type == "cuda":
            torch.cuda.empty_cache()


def derive(rows: dict, flops_per_sample: float | None, peaks: dict | None, measured: dict) -> None:
    """Ratios vs fp32, loss vs fp32 and MFU, in place."""
    from r2gen import flops

    base = rows.get("fp32", {})
    for p, row in rows.items():
        if "equal" not in row:
            continue
        for mode in ("equal", "max"):
            run = row.get(mode, {})
            if "samples_per_s" not in run:
                continue
            ref = base.get(mode, {}).get("samples_per_s")
            run["ratio_vs_fp32"] = run["samples_per_s"] / ref if ref else None
            sps = run["samples_per_s"] * flops_per_sample if flops_per_sample else None
            run["model_tflops"] = sps / 1e12 if sps else None
            if not row["plan"].get("speed_comparable", True):  # emulated fp8 (or fp16/bf16 on a CPU): not that speed
                run["mfu_datasheet"] = run["mfu_measured_gemm"] = None
                run["mfu_note"] = f"n/a: {row['plan'].get('note') or 'speed not comparable'}"
                continue
            peak = (peaks or {}).get(p)
            run["mfu_datasheet"] = flops.mfu(flops_per_sample or 0, run["samples_per_s"], peak)
            run["mfu_measured_gemm"] = flops.mfu(flops_per_sample or 0, run["samples_per_s"],
                                                 measured.get(p, {}).get("tflops"))
        ref_loss = base.get("equal", {}).get("final_loss")
        row["equal"]["loss_minus_fp32"] = row["equal"]["final_loss"] - ref_loss if ref_loss is not None else None


def benchmark(size, device: torch.device, seed: int, deadline: float, info: dict) -> dict:
    from benchmarks import gpu_bench

    part = {"ran": True, "size": size.name, "size_spec": size.__dict__, "rows": {}, "errors": {}}
    part["flops_per_sample"] = gpu_bench.model_flops_per_sample(size, device, seed)
    part["flops_note"] = ("training step (forward + backward) of the fp32 model, torch.utils.flop_counter: matmuls, "
                          "convolutions, attention; the same model FLOPs are used for every precision")
    part["matmul_tflops"] = gpu_bench.matmul_peaks(size, device)
    rows, errors = part["rows"], part["errors"]
    for p in PRECISIONS:  # every precision at the equal batch first: the largest batch only as time allows
        if time.monotonic() > deadline:
            errors[p] = "not run: out of the check's time budget"
        elif (row := _guarded(errors, p, device, equal_batch, size, p, device, seed)) is not None:
            rows[p] = row
    for p in rows:
        if time.monotonic() > deadline:
            rows[p]["max"] = {"ran": False, "why": "out of the check's time budget"}
        else:
            rows[p]["max"] = _guarded(errors, f"{p} (largest batch)", device, largest_batch, size, p, device, seed) \
                or {"ran": False, "why": errors.get(f"{p} (largest batch)")}
    derive(part["rows"], part["flops_per_sample"], info["datasheet_peak_tflops"], part["matmul_tflops"])
    return part


def default_out(device: str) -> Path:
    """$OUT (the device tool's folder) when set, else reports/gpu for a GPU run; a CPU run never writes there."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return Path("reports/gpu") if device == "cuda" else Path("bench-results/gpu-check-cpu")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=("paper", "tiny"), default=None, help="default: paper on cuda, tiny on cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT when set, else reports/gpu (cuda) or bench-results/gpu-check-cpu (cpu)")
    parser.add_argument("--seed", type=int, default=9223)
    parser.add_argument("--budget-seconds", type=float, default=420.0,
                        help="whole check; parts that would start after it are skipped and say so (default 420)")
    parser.add_argument("--e2e-epochs", type=int, default=1)
    parser.add_argument("--skip-e2e", action="store_true", help="benchmark only (recorded as skipped on request)")
    return parser.parse_args(argv)


def run_check(args: argparse.Namespace) -> dict:
    from benchmarks import gpu_bench, gpu_e2e

    start = time.monotonic()
    deadline = start + args.budget_seconds
    imports = import_check()
    print(imports["line"], flush=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: --device cuda but torch {torch.__version__} sees no CUDA device (built with CUDA "
              f"{torch.version.cuda}); run `make gpu-check DEVICE=cpu` for the CPU check", file=sys.stderr)
        raise SystemExit(2)
    size = gpu_bench.SIZES[args.size or ("paper" if device.type == "cuda" else "tiny")]
    label = ("GPU measurement" if device.type == "cuda"
             else "numerics only: not a GPU measurement (CPU run of the same script at a tiny size)")
    record = {"label": label, "imports": imports, "machine": machine(device), "started": time.time()}
    record["machine"]["torchao"] = imports["modules"].get("torchao")  # None: absent
    if imports["missing"]["benchmark"]:
        record["benchmark"] = {"ran": False, "why": "missing modules: " + ", ".join(imports["missing"]["benchmark"])}
    else:
        # The pipeline gets what the benchmark leaves, at least 35% of the budget.
        record["benchmark"] = benchmark(size, device, args.seed, start + 0.65 * args.budget_seconds,
                                        record["machine"])
    print(f"benchmark done after {time.monotonic() - start:.0f} s", flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the stages are other processes on the same GPU
    if args.skip_e2e:
        record["e2e"] = {"ran": False, "why": "--skip-e2e given"}
    else:
        record["e2e"] = gpu_e2e.run_pipeline(args.device, args.e2e_epochs, size.name == "tiny", deadline, args.out)
    record["seconds"] = time.monotonic() - start
    return record


def main(argv: list[str] | None = None) -> int:
    from benchmarks.gpu_table import render

    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out = args.out or default_out(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    record = run_check(args)
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    table = render(record)
    (args.out / "gpu_check.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} ({record['seconds']:.0f} s)")
    bench_ok = record["benchmark"].get("ran") and not record["benchmark"].get("errors")
    return 0 if bench_ok and record["e2e"].get("complete", args.skip_e2e) else 1


if __name__ == "__main__":
    raise SystemExit(main())
