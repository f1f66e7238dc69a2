"""The benchmark harness: its JSON has every figure, runs are isolated and interleaved, FLOPs are right."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks import run
from benchmarks.measure import PROFILES, LoadMonitor, Profile, count_flops, matmul_peak
from r2gen.config import ModelConfig
from r2gen.model.r2gen import R2Gen
from r2gen.model.visual import VisualExtractor, build_resnet_trunk

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = run.main(["--profile", "tiny", "--no-isolate", "--out", str(out), "--work-dir", str(out / "data")])
    assert code == 0
    return json.loads((out / "tiny.json").read_text())


def test_tiny_benchmark_json_has_every_figure(tiny_doc):
    assert tiny_doc["command"].startswith("python -m benchmarks.run --profile tiny")
    assert tiny_doc["matmul_peak_gflops"]["float32"]["median"] > 0
    assert tiny_doc["matmul_peak_gflops"]["bfloat16"]["median"] > 0
    assert tiny_doc["machine"]["cpu_support"]["capability"]
    assert tiny_doc["data"]["prepare_seconds"] > 0
    for precision in ("fp32", "bf16"):
        e = tiny_doc["results"]["ours"][precision]
        for key in ("train_samples_per_s", "train_peak_memory_bytes", "generate_reports_per_s",
                    "generate_early_exit_reports_per_s"):
            assert e[key]["n"] == 3 and 0 < e[key]["min"] <= e[key]["median"] <= e[key]["max"], key
        assert e["train_gflops_per_sample"] > 0 and e["generate_gflops_per_report"] > 0
        assert e["train_achieved_gflops"] == pytest.approx(
            e["train_gflops_per_sample"] * e["train_samples_per_s"]["median"])
        assert 0 < e["train_fraction_of_fp32_matmul_peak"] < 5
        assert e["parameters"] > 0
    assert set(tiny_doc["ratios"]["bf16/fp32"]) >= {"train_samples_per_s", "generate_reports_per_s",
                                                    "train_peak_memory_bytes"}
    assert tiny_doc["reference_skipped"] == "no --reference-src given"


def test_every_run_records_the_machine_load(tiny_doc):
    timed = [r for r in tiny_doc["runs"] if r["phase"] != "matmul"]
    assert timed
    for r in timed:
        assert len(r["loadavg_before"]) == 3 and len(r["loadavg_after"]) == 3
        assert r["other_cores"] >= 0 and r["wall_seconds"] > 0 and r["own_cpu_seconds"] >= 0


def test_precisions_are_interleaved_round_by_round(tiny_doc):
    order = [(r["repeat"], r["precision"]) for r in tiny_doc["runs"] if r["phase"] == "train"]
    assert order == [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")]


def test_table_shows_each_precision_and_the_ratio(tiny_doc):
    text = run.table(tiny_doc)
    assert "| ours | fp32 |" in text and "| ours | bf16 |" in text
    assert "bf16/fp32: train" in text


def test_a_worker_process_measures_its_own_peak_memory(tmp_path):
    profile = PROFILES["tiny"]
    data = run.prepare_data(profile, tmp_path)
    spec = {"profile": profile.to_dict(), "threads": 1, "device": "cpu", "seed": 1, "data": data,
            "label": "ours", "impl": "ours", "src": None, "phase": "train", "precision": "fp32"}
    record = run.run_worker(spec, isolate=True)
    assert record["isolated"] is True
    assert record["samples_per_s"] > 0 and len(record["step_seconds"]) == profile.train_steps
    assert record["peak_memory_kind"] == "peak RSS of the process"
    assert 50 * 2**20 < record["peak_memory_bytes"] < 8 * 2**30


def test_flop_counter_counts_a_linear_exactly():
    layer = torch.nn.Linear(48, 24)
    flops, _ = count_flops(lambda: layer(torch.randn(5, 48)))
    assert flops == 2 * 5 * 48 * 24


def test_flop_counter_gives_the_analytic_count_of_a_resnet_trunk():
    trunk = build_resnet_trunk("resnet10", width=8).eval()
    expected = []

    def conv_flops(module, inputs, output):
        kh, kw = module.kernel_size
        expected.append(2 * output.numel() * module.in_channels // module.groups * kh * kw)

    for m in trunk.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_flops)
    with torch.no_grad():
        flops, _ = count_flops(lambda: trunk(torch.randn(2, 3, 32, 32)))
    assert flops == sum(expected)


def test_flop_counter_gives_a_plausible_training_step_for_a_tiny_model():
    cfg = ModelConfig(visual_extractor="resnet10", visual_width=8, d_model=32, d_ff=32, num_heads=4,
                      num_layers=1, rm_num_heads=4, rm_d_model=32)
    torch.manual_seed(0)
    model = R2Gen(cfg, vocab_size=20)
    images = torch.randint(0, 256, (2, 2, 32, 32), dtype=torch.uint8)
    labels = torch.randint(1, 20, (2, 10))
    labels[:, 0] = 0
    forward, _ = count_flops(lambda: model(images, labels))
    step, _ = count_flops(lambda: model(images, labels).loss.backward())
    # backward costs about twice the forward (the first conv needs no input gradient)
    assert 2.5 * forward < step < 3.05 * forward
    # the visual trunk is most of it: 2 views x 2 studies at 32 px
    trunk, _ = count_flops(lambda: model.visual.trunk(torch.randn(4, 3, 32, 32)))
    assert trunk < forward < 3 * trunk


def test_matmul_peak_shrinks_the_problem_when_a_dtype_is_slow():
    result = matmul_peak(torch.float32, n=512, repeats=3, max_seconds=1e-6)
    assert result["n"] < 512 and result["gflops"] > 0 and len(result["runs"]) == 3


def test_load_monitor_reports_wall_and_cpu_time():
    with LoadMonitor() as load:
        sum(i * i for i in range(200_000))
    assert load.record["wall_seconds"] > 0 and load.record["own_cpu_seconds"] > 0
    assert load.record["other_cores"] is None or load.record["other_cores"] >= 0


def test_reference_src_that_is_not_a_checkout_is_a_one_line_error(tmp_path, capsys):
    code = run.main(["--profile", "tiny", "--no-isolate", "--reference-src", str(tmp_path),
                     "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: --reference-src {tmp_path}: not a checkout of the public R2Gen code")
    assert "\n" not in err


def test_impl_must_be_a_checkout_of_this_project(tmp_path, capsys):
    code = run.main(["--profile", "tiny", "--no-isolate", "--impl", f"old={tmp_path}",
                     "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "data")])
    assert code == 2
    assert "no r2gen/model/r2gen.py there" in capsys.readouterr().err


def test_a_variant_times_ours_with_other_model_options_in_the_same_run(tmp_path):
    doc = run.run_benchmark(PROFILES["tiny"], ["fp32"], repeats=1, variants=["rc:visual_recompute=5"],
                            phases=["train"], work_dir=tmp_path, isolate=False, log=lambda line: None)
    assert [i["label"] for i in doc["implementations"]] == ["ours", "rc"]
    assert doc["implementations"][1]["model"] == {"visual_recompute": 5}
    assert doc["results"]["rc"]["fp32"]["train_samples_per_s"]["median"] > 0
    assert doc["ratios"]["rc/ours"]["train_peak_memory_bytes"] > 0
    # the counter sees every executed op: the variant's step includes its re-run convolutions
    assert doc["flops"]["rc"]["train_per_sample"] > doc["flops"]["ours"]["train_per_sample"]


def test_ratios_put_variants_against_ours_and_the_reference():
    def entry(train, mem):
        return {"train_samples_per_s": {"median": train}, "train_peak_memory_bytes": {"median": mem}}

    results = {"ours": {"fp32": entry(1.0, 8.0)}, "lowmem": {"fp32": entry(0.8, 4.0)},
               "reference": {"fp32": entry(0.5, 10.0)}}
    r = run.ratios(results, ["fp32"])
    assert r["ours/reference"]["train_samples_per_s"] == 2.0
    assert r["lowmem/ours"]["train_peak_memory_bytes"] == 0.5
    assert r["lowmem/reference"]["train_samples_per_s"] == pytest.approx(1.6)
    assert r["lowmem/reference"]["train_peak_memory_bytes"] == pytest.approx(0.4)
    assert r["lowmem/reference"]["generate_reports_per_s"] is None


@pytest.mark.parametrize("item,message", [
    ("rc", "expected LABEL:KEY=VALUE"),
    ("ours:visual_recompute=5", "expected LABEL:KEY=VALUE"),
    ("rc:visual_recompte=5", "visual_recompte is not a model option; choose from"),
    ("rc:visual_recompute=9", "model.visual_recompute must be 0 (off) to 5"),
])
def test_a_bad_variant_is_a_one_line_error(tmp_path, capsys, item, message):
    code = run.main(["--profile", "tiny", "--no-isolate", "--variant", item,
                     "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err


def test_reference_is_skipped_for_a_profile_it_cannot_run():
    impls, skipped = run.implementations(None, [], PROFILES["sample"])
    assert [i["label"] for i in impls] == ["ours"] and skipped == "no --reference-src given"
    assert not PROFILES["sample"].reference_ok and PROFILES["paper"].reference_ok


REFERENCE_SRC = os.environ.get("R2GEN_REFERENCE_SRC")


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_SRC, reason="set R2GEN_REFERENCE_SRC to a checkout of cuhksz-nlp/R2Gen")
def test_public_code_runs_side_by_side_with_the_same_flops(tmp_path):
    # The paper's Transformer shrunk, on a ResNet18 at 224 px (what the public code hard-wires).
    profile = Profile("mini", model=dict(visual_extractor="resnet18", d_model=32, d_ff=32, num_heads=4,
                                         num_layers=1, rm_num_heads=4, rm_d_model=32),
                      studies=12, batch_size=2, max_len=5, warmup_steps=1, train_steps=1, matmul_n=256)
    doc = run.run_benchmark(profile, ["fp32"], repeats=1, reference_src=REFERENCE_SRC, work_dir=tmp_path,
                            log=lambda line: None)
    assert doc["results"]["reference"]["fp32"]["parameters"] == doc["results"]["ours"]["fp32"]["parameters"]
    ours, ref = doc["flops"]["ours"], doc["flops"]["reference"]
    assert ours["train_per_sample"] == pytest.approx(ref["train_per_sample"], rel=0.01)
    # the public search recomputes the whole prefix at every step
    assert ref["generate_per_report"] >= ours["generate_per_report"]
    assert doc["ratios"]["ours/reference"]["generate_reports_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_precisions_run_and_report_their_ratio_over_fp32(tmp_path):
    code = run.main(["--profile", "tiny", "--device", "cuda", "--precisions", "fp32,fp16,bf16", "--repeats", "1",
                     "--out", str(tmp_path), "--work-dir", str(tmp_path / "data")])
    assert code == 0
    doc = json.loads((Path(tmp_path) / "tiny.json").read_text())
    assert doc["machine"]["gpu"]
    assert set(doc["ratios"]) == {"fp16/fp32", "bf16/fp32"}
    assert doc["results"]["ours"]["fp16"]["peak_memory_kind"] == "torch.cuda.max_memory_allocated"


# ---------------------------------------------------------------------------------------------
# The optimisations the benchmark measures must not change the function.

@pytest.mark.parametrize("name,recompute", [("resnet10", 3), ("resnet10", 5), ("resnet50", 2)])
def test_recomputed_visual_stages_give_identical_gradients_and_running_stats(name, recompute):
    torch.manual_seed(0)
    stored = VisualExtractor(name, width=8)
    recomputed = VisualExtractor(name, width=8, recompute=recompute)
    recomputed.load_state_dict(stored.state_dict())
    images = torch.randint(0, 256, (3, 2, 32, 32), dtype=torch.uint8)
    for model in (stored, recomputed):
        for _ in range(2):  # two steps: the running statistics are updated once per forward
            patches, pooled = model(images)
            (patches.square().mean() + pooled.sum()).backward()
    for (name, a), b in zip(stored.named_parameters(), recomputed.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(stored.named_buffers(), recomputed.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("recompute,reruns", [(0, []), (2, ["stem", "layer1"]), (5, ["stem", "layer1", "layer4"])])
def test_recompute_reruns_exactly_the_chosen_stages_in_the_backward(recompute, reruns):
    """Peak memory is the benchmark's to measure; here: which stages' blocks run twice per step."""
    model = VisualExtractor("resnet10", width=8, recompute=recompute)
    trunk = model.trunk
    probes = {"stem": trunk[0], "layer1": trunk[4][0].conv1, "layer4": trunk[7][0].conv1}
    calls = dict.fromkeys(probes, 0)
    for name, module in probes.items():
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    patches, pooled = model(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert set(calls.values()) == {1}
    pooled.sum().backward()
    assert {name for name, n in calls.items() if n == 2} == set(reruns)
    assert all(n in (1, 2) for n in calls.values())
