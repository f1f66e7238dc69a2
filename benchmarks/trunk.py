"""The visual trunk alone: where a training step's time goes, and what layout, folding and compiling buy.

    python -m benchmarks.trunk                                  # ResNet101, 8 images at 224 px, 1 thread
    python -m benchmarks.trunk --compile --out bench-results/trunk.json

The ResNet is ~90 % of a paper-profile training step's FLOPs, so its speed bounds the whole step's.
Measured in one process, in interleaved rounds (medians), at a pinned thread count:
- training step (train mode, forward + backward of ``mean()``): NCHW (torchvision's layout, the
  public code's) vs channels-last (ours), and with ``--compile`` channels-last under
  ``torch.compile`` (its compile time reported apart);
- eval forward: the modules (BatchNorm as its own pass) vs our eval path (BatchNorm folded into the
  convolutions, ``r2gen.model.visual.folded_trunk_forward``), with their largest difference;
- the time shares of one channels-last training step by operator kind (torch.profiler): convolution,
  batch norm, ReLU, the rest. ``conv_only_ceiling`` is the speed-up if everything but the
  convolutions took no time at all: the most any fusion of the memory-bound operators could give.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

from benchmarks.measure import count_flops, matmul_peak, seconds, set_threads
from r2gen.io import write_json
from r2gen.model.visual import build_resnet_trunk, folded_trunk_forward

# aten operator name fragments: oneDNN (mkldnn_convolution, convolution_backward) and ATen's own
# im2col kernels (_slow_conv2d_forward/backward), which the CPU dispatcher picks for some layers.
KINDS = {"convolution": ("conv",), "batch_norm": ("batch_norm",), "relu": ("relu", "threshold")}


def op_shares(trunk: torch.nn.Module, x: torch.Tensor) -> dict:
    """Self-time shares of one training step by operator kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trunk(x).mean().backward()
    totals = dict.fromkeys([*KINDS, "other"], 0.0)
    others: dict[str, float] = {}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        kind = next((k for k, words in KINDS.items() if any(w in event.key for w in words)), "other")
        totals[kind] += event.self_cpu_time_total
        if kind == "other":
            others[event.key] = event.self_cpu_time_total
    total = sum(totals.values())
    shares = {k: v / total for k, v in totals.items()}
    top = sorted(others.items(), key=lambda kv: -kv[1])[:5]
    return {"shares": shares, "conv_only_ceiling": 1 / shares["convolution"],
            "largest_other": {k: v / total for k, v in top}}


def measure(name: str = "resnet101", batch: int = 8, size: int = 224, width: int = 64, rounds: int = 3,
            compile_: bool = False) -> dict:
    torch.manual_seed(0)
    nchw = build_resnet_trunk(name, width).train()
    cl = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    train = {"nchw": lambda: nchw(x).mean().backward(), "channels_last": lambda: cl(x_cl).mean().backward()}
    out: dict = {"name": name, "batch": batch, "size": size, "width": width, "rounds": rounds,
                 "threads": torch.get_num_threads()}
    if compile_:
        compiled = torch.compile(copy.deepcopy(cl))
        out["compile_seconds"] = seconds(lambda: compiled(x_cl).mean().backward())
        train["compiled"] = lambda: compiled(x_cl).mean().backward()
    flops = {"train": count_flops(train["channels_last"])[0]}
    with torch.no_grad():
        flops["eval"] = count_flops(lambda: cl(x_cl))[0]
    evaluation = {"modules": lambda: cl(x_cl), "folded": lambda: folded_trunk_forward(cl, x_cl)}
    times: dict = {f"train_{k}": [] for k in train} | {f"eval_{k}": [] for k in evaluation}
    for fn in train.values():
        fn()  # warm-up: oneDNN primitive creation, page faults
    cl.eval()
    with torch.no_grad():
        expected = evaluation["modules"]()
        diff = ((expected - evaluation["folded"]()).abs().max() / expected.abs().max()).item()
        for _ in range(rounds):
            for k, fn in evaluation.items():
                times[f"eval_{k}"].append(seconds(fn))
    cl.train()
    for _ in range(rounds):
        for k, fn in train.items():
            times[f"train_{k}"].append(seconds(fn))
    medians = {k: statistics.median(v) for k, v in times.items()}
    out["seconds"] = {k: {"median": medians[k], "runs": v} for k, v in times.items()}
    out["gflops"] = {k: flops[k.split("_")[0]] / medians[k] / 1e9 for k in medians}
    out["ratios"] = {"channels_last/nchw (train)": medians["train_nchw"] / medians["train_channels_last"],
                     "folded/modules (eval)": medians["eval_modules"] / medians["eval_folded"]}
    if compile_:
        out["ratios"]["compiled/channels_last (train)"] = medians["train_channels_last"] / medians["train_compiled"]
    out["eval_max_relative_difference"] = diff  # largest |difference| / largest |value|
    out["train_step_profile"] = op_shares(cl, x_cl)
    out["matmul_peak_float32"] = matmul_peak(torch.float32, 2048 if size >= 128 else 256)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trunk", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="resnet101")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile on a CPU)")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    r = measure(args.name, args.batch, args.size, args.width, args.rounds, args.compile)
    print(f"{r['name']} x{r['batch']} at {r['size']} px, {r['threads']} thread(s), median of {r['rounds']}; "
          f"fp32 matmul peak {r['matmul_peak_float32']['gflops']:.1f} GFLOP/s")
    for k, v in r["seconds"].items():
        print(f"  {k:<20} {v['median']:8.3f} s  {r['gflops'][k]:6.1f} GFLOP/s")
    for k, v in r["ratios"].items():
        print(f"  {k}: {v:.2f}x")
    if "compile_seconds" in r:
        print(f"  torch.compile took {r['compile_seconds']:.0f} s (first step included)")
    shares = r["train_step_profile"]["shares"]
    print("  training step time: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
          + f"; convolutions alone would be {r['train_step_profile']['conv_only_ceiling']:.2f}x faster")
    print("  largest of the rest: " + ", ".join(f"{k} {v:.0%}" for k, v in r["train_step_profile"]["largest_other"].items()))
    print(f"  eval: folded vs modules differ by at most {r['eval_max_relative_difference']:.2g} of the largest value")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out), r)
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
