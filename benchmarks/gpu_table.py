"""The markdown of ``make gpu-check``: one table per batch mode, the profile's top operators, the pipeline's verdicts."""

from __future__ import annotations


def _f(value, spec: str = ".3g", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def header(record: dict) -> list[str]:
    m = record["machine"]
    lines = [f"# gpu-check: {m['device_name']}", "", f"**{record['label']}**", "",
             f"- device {m['device']}, compute capability {m['compute_capability'] or 'n/a'}, torch {m['torch']}, "
             f"CUDA {m['cuda'] or 'none'}, cuDNN {m['cudnn'] or 'none'}, Python {m['python']}",
             f"- transformer_engine {m['transformer_engine'] or 'absent'}"
             + (f" ({m['transformer_engine_error']})" if not m['transformer_engine'] else "")
             + f"; torchao {record['imports']['modules'].get('torchao') or 'absent'}",
             f"- {record['imports']['line']}",
             f"- peak TFLOP/s: {m['datasheet_peak_source']}", f"- whole check: {record.get('seconds', 0):.0f} s"]
    return lines


def bench_tables(bench: dict) -> list[str]:
    if not bench.get("ran"):
        return ["## Benchmark", "", f"not run: {bench.get('why')}"]
    size = bench["size_spec"]
    out = ["## Training step, per precision", "",
           f"Size `{bench['size']}`: {size['model'] or 'paper model (resnet101, d_model 512, 3 layers, 8 heads)'}, "
           f"{size['image_size']} px x {size['views']} views, {size['max_len']} tokens, random init, synthetic input. "
           f"Model FLOPs per study and training step: {_f(bench['flops_per_sample'] / 1e9, '.2f')} GFLOP "
           f"({bench['flops_note']}). MFU = model FLOP/s over the dense datasheet peak of the precision "
           "(fp32: FP32 non-tensor, TF32 off; fp8: FP8 tensor peak, though only the converted Linears run in FP8) "
           "and over this device's measured GEMM rate.", ""]
    mm = bench["matmul_tflops"]
    out += ["Measured GEMM TFLOP/s: " + ", ".join(
        f"{p} {_f(v.get('tflops'), '.1f')}" + ("" if "tflops" in v else f" ({v.get('error')})") for p, v in mm.items()), ""]
    for mode, title in (("equal", "equal batch"), ("max", "largest batch that fits")):
        out += [f"### {title}", "",
                "| precision | backend | batch | samples/s | vs fp32 | step ms | peak alloc GiB | peak reserved GiB "
                "| loss after N | loss - fp32 | MFU datasheet | MFU measured GEMM |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p, row in bench["rows"].items():
            run = row.get(mode, {})
            if "samples_per_s" not in run:
                out.append(f"| {p} | {row['plan']['backend']} | not run: {run.get('why', 'n/a')} |")
                continue
            out.append(f"| {p} | {row['plan']['backend']} | {run['batch']} | {_f(run['samples_per_s'], '.1f')} "
                       f"| {_f(run.get('ratio_vs_fp32'), '.2f')} | {_f(run['step_ms'], '.1f')} "
                       f"| {_gib(run['peak_allocated_bytes'])} | {_gib(run['peak_reserved_bytes'])} "
                       f"| {_f(run['final_loss'], '.4f')} | {_f(run.get('loss_minus_fp32'), '+.4f')} "
                       f"| {_pct(run.get('mfu_datasheet'))} | {_pct(run.get('mfu_measured_gemm'))} |")
        out.append("")
    out += ["Backends: " + "; ".join(f"{p}: {r['plan']['backend']} ({r['plan']['backend_reason']}; fp8 layers "
                                     f"{r['fp8_layers']['linear_converted']}/{r['fp8_layers']['linear_total']})"
                                     for p, r in bench["rows"].items()), ""]
    out += [f"- {p} failed: {e}" for p, e in bench["errors"].items() if not p.endswith("_traceback")]
    return out


def profile_tables(bench: dict, top: int = 8) -> list[str]:
    out = []
    for p, row in bench.get("rows", {}).items():
        prof = row.get("profile")
        if not prof:
            continue
        out += ["", f"### Where the time goes: {p} ({prof['clock']}, batch {prof['batch']}, "
                f"{_f(prof['total_ms_per_step'], '.1f')} ms per step)", "",
                "| operator | ms/step | share | calls/step |", "|---|---|---|---|"]
        out += [f"| `{o['name'][:70]}` | {_f(o['ms_per_step'], '.2f')} | {_pct(o['share'])} | {_f(o['calls_per_step'], '.0f')} |"
                for o in prof["top_operators"][:top]]
        if prof.get("top_kernels"):
            out += ["", "Top kernels: " + "; ".join(f"`{k['name'][:60]}` {_f(k['ms_per_step'], '.2f')} ms ({_pct(k['share'])})"
                                               for k in prof["top_kernels"][:5])]
        out += ["", "Forward passes by model part: " + ", ".join(
            f"{q['name']} {_f(q['ms_per_step'], '.2f')} ms ({_pct(q['share'])})" for q in prof["forward_parts"]), ""]
    return ["## Profile"] + out + [""] if out else []


def e2e_lines(e2e: dict) -> list[str]:
    out = ["## End to end: the pipeline's stages", ""]
    if not e2e.get("ran") and "stages" not in e2e:
        return out + [f"not run: {e2e.get('why')}"]
    out += [f"Device {e2e['device']}, {e2e['epochs']} epoch(s), data: {e2e['data']}; "
            f"complete: **{'yes' if e2e['complete'] else 'no'}**; report written: {e2e['report_written']}", "",
            "| stage | exit | seconds |", "|---|---|---|"]
    out += [f"| {s['stage']} | {s['rc']} | {s['seconds']:.1f} |" for s in e2e["stages"]]
    out += [f"| {s['stage']} | not run: {s['why']} | |" for s in e2e["skipped"]]
    if e2e.get("trained"):
        out += ["", "Trained: " + "; ".join(f"{p} on {t.get('device_name') or t.get('device')} ({t.get('backend')})"
                                            for p, t in e2e["trained"].items())]
    return out + [""]


def render(record: dict) -> str:
    lines = header(record) + [""] + bench_tables(record["benchmark"]) + profile_tables(record["benchmark"])
    return "\n".join(lines + e2e_lines(record["e2e"])) + "\n"
