"""Job cost planner against the public anchors; `vision-bridge plan --images` as JSON; memory per mode."""

import json

import torch

import pytest
from helpers import run_cli

from bridgecore.planning.job_cost import (
    ANCHOR_H200_EDIT_SECONDS,
    ANCHOR_SGLANG_STEP_SECONDS,
    DEFAULT_EFFICIENCY,
    implied_efficiency,
    plan_job_cost,
)
from bridgecore.planning.planner import plan


@pytest.fixture(scope="module")
def report():
    return plan(1024, 1024)


def test_h200_anchor_implies_an_efficiency_the_planner_expresses(report):
    # Qwen-Image-Edit (no Qwen3-VL): one Qwen2.5-VL extraction + 50 DiT steps, guidance 1.0.
    flops = report["flops"]
    edit_flops = flops["qwen25_extraction"]["total"] + 50 * flops["dit_step"]
    anchor = implied_efficiency(ANCHOR_H200_EDIT_SECONDS, edit_flops, "h200")
    assert 0.5 < anchor < 0.6  # ~0.56 of the 989 TFLOP/s peak: a compute-bound DiT
    assert abs(DEFAULT_EFFICIENCY - anchor) < 0.05
    job = plan_job_cost(1000, 1024, 50, "h200", efficiency=anchor)
    # the planner's edit adds the (tiny) bridge; its Qwen2.5-VL extraction is part of `extract`
    qwen25_seconds = flops["qwen25_extraction"]["total"] / (anchor * 989.4e12)
    assert job["seconds_per_image"]["edit"] + qwen25_seconds == pytest.approx(ANCHOR_H200_EDIT_SECONDS, rel=0.01)
    # the floor at 100% of peak: ~10 s per image
    floor = plan_job_cost(1, 1024, 50, "h200", efficiency=1.0)["seconds_per_image"]["edit"]
    assert 9.5 < floor < 10.5


def test_sglang_step_anchor_is_expressible(report):
    step = report["flops"]["dit_step"]
    with_cfg = implied_efficiency(ANCHOR_SGLANG_STEP_SECONDS, 2 * step, "h100")  # Edit-2511 runs true CFG
    without = implied_efficiency(ANCHOR_SGLANG_STEP_SECONDS, step, "h100")
    assert 0 < without < with_cfg <= 1
    job = plan_job_cost(1, 1024, 1, "h100", cfg=True, efficiency=with_cfg)
    assert job["seconds_per_image"]["edit"] == pytest.approx(ANCHOR_SGLANG_STEP_SECONDS, rel=0.01)


def test_hours_scale_with_images_steps_cfg_and_gpu():
    base = plan_job_cost(1000, 1024, 50, "h100")
    assert plan_job_cost(2000, 1024, 50, "h100")["edit_gpu_hours"] == pytest.approx(2 * base["edit_gpu_hours"])
    assert plan_job_cost(1000, 1024, 8, "h100")["edit_gpu_hours"] < base["edit_gpu_hours"] / 5
    cfg = plan_job_cost(1000, 1024, 50, "h100", cfg=True)
    assert cfg["edit_gpu_hours"] == pytest.approx(2 * base["edit_gpu_hours"], rel=1e-6)
    # true CFG's negative branch is Qwen2.5-VL's embeddings alone (never bridged): one more Qwen2.5 embedding per
    # image in the caches and one more Qwen2.5 extraction, not a second Qwen3-VL pass (it was priced as twice all)
    assert cfg["cache_storage_gb"] - base["cache_storage_gb"] == pytest.approx(base["fused_storage_gb"])
    assert base["extract_gpu_hours"] < cfg["extract_gpu_hours"] < 1.6 * base["extract_gpu_hours"]
    assert plan_job_cost(1000, 1024, 50, "a100")["edit_gpu_hours"] == pytest.approx(
        base["edit_gpu_hours"] * 989.4 / 312, rel=1e-6)
    keys = [k for k in base if k.endswith("_gpu_hours")]
    assert set(keys) == {"extract_gpu_hours", "edit_gpu_hours", "rewrite_gpu_hours", "train_gpu_hours", "total_gpu_hours"}
    assert base["total_gpu_hours"] == pytest.approx(sum(base[k] for k in keys if k != "total_gpu_hours"))
    trained = plan_job_cost(1000, 1024, 50, "h100", train_steps=100, train_batch_size=2)
    assert trained["train_gpu_hours"] == pytest.approx(100 * 2 * 3 * base["edit_gpu_hours"] / 1000 / 50, rel=1e-3)


def test_training_is_priced_at_the_rate_a_training_run_measured(tmp_path):
    """A run on 2 GPUs that trained 4 samples/s costs 0.5 s per sample per GPU: 100 steps of 8 samples are 400 GPU-s,
    and 4 GPUs divide the wall clock, not the GPU-hours."""
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"samples_per_s": 4.0, "world_size": 2}))
    job = plan_job_cost(0, 1024, 50, "h100", train_steps=100, train_batch_size=8, gpus=4, train_measured=metrics)
    assert job["train_seconds_per_sample"] == 0.5 and job["train_gpu_hours"] == pytest.approx(400 / 3600)
    assert job["train_wall_clock_hours"] == pytest.approx(100 / 3600) and "measured" in job["train_source"]
    metrics.write_text("{}")
    with pytest.raises(ValueError, match="no samples_per_s"):
        plan_job_cost(0, 1024, 50, "h100", train_steps=1, train_measured=metrics)


def test_storage_follows_the_token_counts(report):
    job = plan_job_cost(1, 1024, 50, "h100")
    t = report["tokens"]
    levels, taps, qwen25 = 3 * t["qwen3_sequence"] * 4096, 3 * t["qwen3_vision"] * 4096, t["qwen25_prompt_embeds"] * 3584
    assert job["cache_storage_gb"] == pytest.approx(2 * (levels + qwen25) / 1e9)  # bf16, no DeepStack taps (default)
    taps_kept = plan_job_cost(1, 1024, 50, "h100", cache_deepstack=True)
    assert taps_kept["cache_storage_gb"] == pytest.approx(2 * (levels + taps + qwen25) / 1e9)
    fp8 = plan_job_cost(1, 1024, 50, "h100", cache_dtype="fp8")  # Qwen3-VL's: a byte a value, a scale a token
    scales = 4 * 3 * t["qwen3_sequence"]
    assert fp8["cache_storage_gb"] == pytest.approx((levels + scales + 2 * qwen25) / 1e9)  # the DiT's own: bf16
    smaller = plan_job_cost(1, 1024, 50, "h100", cache_dtype="fp8", qwen3_area=512 * 512)  # Qwen3-VL sees 512^2
    assert smaller["cache_mb_per_image"] < 15 < fp8["cache_mb_per_image"]  # the target, met only with both
    assert smaller["extract_gpu_hours"] < fp8["extract_gpu_hours"]
    int8 = plan_job_cost(1, 1024, 50, "h100", cache_dtype="int8", qwen3_area=512 * 512)  # a scale a token and 128
    assert smaller["cache_mb_per_image"] < int8["cache_mb_per_image"] < 15  # channels, a mean a channel: +3% of Qwen3's
    assert job["cost_usd"] is None
    assert plan_job_cost(10, 1024, 50, "h100", price_per_gpu_hour=2.0)["cost_usd"] == pytest.approx(
        2.0 * plan_job_cost(10, 1024, 50, "h100")["total_gpu_hours"])


def test_measured_efficiencies_are_used(tmp_path):
    bench = {"device": "NVIDIA H100 80GB HBM3", "gpu_key": "h100", "condition_pixels": 1024 * 1024,
             "stages": {"dit_step": {"mfu": 0.4}, "qwen25_extract": {"mfu": 0.2}, "qwen3_extract": {"mfu": 0.3},
                        "vae_decode": {"seconds": 0.5}, "vae_encode": {"seconds": 0.25}}}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(bench))
    job = plan_job_cost(100, 1024, 50, "h100", measured=path)
    assert job["efficiency"] == {"extract": pytest.approx(0.25), "edit": 0.4}
    by_flops = plan_job_cost(100, 1024, 50, "h100", efficiency=0.4)["seconds_per_image"]["edit"]
    assert job["seconds_per_image"]["edit"] == pytest.approx(by_flops + 0.75)
    path.write_text(json.dumps({"stages": {}}))
    with pytest.raises(ValueError, match="no measured"):
        plan_job_cost(100, 1024, 50, "h100", measured=path)


def test_measured_edit_efficiency_is_the_pipeline_loop_and_the_throughput_applies_only_to_its_settings(tmp_path):
    """A newer benchmark file: the edit's efficiency comes from the whole eager edit, bulk-edit's default (its DiT
    FLOPs over its time less the VAE), not the isolated step nor a compiled configuration the job may not use;
    extraction from bulk-edit's batch; the measured images per GPU-hour are reported for the settings it ran and
    refused, with the reason, for others."""
    from bridgecore.planning.job_cost import format_job_cost

    bench = {"device": "NVIDIA H200", "gpu_key": "h200", "condition_pixels": 1024 * 1024, "peak_bf16_tflops": 1000.0,
             "real_depth": True, "steps": 50, "exact_edit_config": "regional torch.compile",
             "stages": {"dit_step": {"mfu": 0.4}, "qwen25_extract": {"mfu": 0.1}, "qwen3_extract": {"mfu": 0.1},
                        "qwen25_extract_batch": {"mfu": 0.3}, "qwen3_extract_batch": {"mfu": 0.5},
                        "denoise_and_decode": {"seconds": 22.0, "tflop": 9900.0, "vae_encode_s": 0.5,
                                               "vae_decode_s": 1.5},
                        "denoise_and_decode_compiled": {"seconds": 20.0, "tflop": 9900.0},
                        "vae_decode": {"seconds": 0.05}, "vae_encode": {"seconds": 0.04}},
             "throughput": {"images_per_gpu_hour": 170.0, "seconds_per_image": 21.2, "config": "eager (bulk-edit's defaults)",
                            "steps": 50, "lightning_images_per_gpu_hour": 900.0, "lightning_steps": 8}}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(bench))
    job = plan_job_cost(100, 1024, 50, "h200", measured=path)
    assert job["efficiency"]["edit"] == pytest.approx(9900.0 / (22.0 - 2.0) / 1000.0)  # 0.495, not dit_step's 0.4
    assert job["efficiency"]["extract"] == pytest.approx(0.4)  # the batches' 0.3 and 0.5
    assert job["measured_throughput"]["applies"] and job["measured_throughput"]["images_per_gpu_hour"] == 170.0
    assert "170 images per GPU-hour" in format_job_cost(job) and "900 with a Lightning 8-step LoRA" in format_job_cost(job)
    other = plan_job_cost(100, 1024, 8, "h100", cfg=True, measured=path)["measured_throughput"]
    assert not other["applies"]
    assert other["why_not"] == "the benchmark's run differs (measured on NVIDIA H200, at 50 steps, without CFG)"
    # an older file (the shipped H200 one) has no throughput: the plan says so instead of staying silent
    del bench["throughput"]
    path.write_text(json.dumps(bench))
    old = plan_job_cost(100, 1024, 50, "h200", measured=path)
    assert "measured throughput not applied: the file has no throughput" in format_job_cost(old)


def test_bad_job_input_is_refused():
    with pytest.raises(ValueError, match="gpu must be one of"):
        plan_job_cost(10, gpu="tpu")
    with pytest.raises(ValueError, match="efficiency"):
        plan_job_cost(10, efficiency=1.5)


def test_plan_images_cli_json():
    result = run_cli("plan", "--images", "10000000", "--resolution", "1024", "--steps", "8", "--gpu", "h200",
                     "--price", "3.5", "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["images"] == 10_000_000 and job["gpu"] == "h200" and job["steps"] == 8
    assert job["total_gpu_hours"] > job["edit_gpu_hours"] > job["extract_gpu_hours"] > 0
    assert job["cost_usd"] == pytest.approx(3.5 * job["total_gpu_hours"])
    # a job's options without --images would be dropped silently: refused, naming them (model options still work)
    alone = run_cli("plan", "--train-steps", "1000", "--gpus", "8", "--rewrite-tokens", "128")
    assert alone.returncode == 2 and "--train-steps, --gpus price a job: add --images N" in alone.stderr, alone.stderr
    assert run_cli("plan", "--rewrite-tokens", "128", "--json").returncode == 0


def test_memory_modes_order(report):
    modes = report["inference_memory"]["modes"]
    assert modes["all_resident"]["peak_gib"] > modes["one_model_at_a_time"]["peak_gib"]
    assert modes["one_model_at_a_time"]["peak_gib"] > modes["one_model_at_a_time+dit_offload"]["peak_gib"]
    assert modes["one_model_at_a_time+dit_offload"]["peak_gib"] > modes["one_model_at_a_time+int8_vlms+dit_offload"]["peak_gib"]
    # the bf16 DiT alone (38 GiB) rules out 24 GB cards unless its blocks are offloaded
    assert "24gb" not in modes["one_model_at_a_time"]["fits"]
    assert "24gb" in modes["one_model_at_a_time+dit_offload"]["fits"]
    weights = sum(report["models"][n]["bytes_bf16"] for n in ("qwen3_vl", "qwen25_vl", "transformer", "vae"))
    assert modes["all_resident"]["peak_bytes"] > weights


@pytest.mark.parametrize("cache_dtype,deepstack", [("native", False), ("fp8", True), ("int8", False)])
def test_the_planner_prices_exactly_the_tensors_a_real_run_stores(tmp_path, tiny_zoo, monkeypatch, cache_dtype, deepstack):
    """A real tiny run with true CFG: the planner's per-image cache bytes, fed the token counts and widths this run
    produced, equal the feature tensors the caches and negatives stages committed — Qwen3-VL's levels (fp8 values
    and per-token scales), the DeepStack taps only when kept, Qwen2.5-VL's embeddings for both branches and never a
    second Qwen3-VL pass. (Small tensors — ids, masks, grids, positions — and headers are not priced.)"""
    import io
    import tarfile

    from safetensors.torch import load
    from helpers import make_inputs, run_all

    from bridgecore.batch.fingerprints import fingerprints
    from bridgecore.batch.settings import JobSettings
    from bridgecore.planning import job_cost

    settings = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=64 * 64, steps=2,
                           cfg=4.0, negative_prompt="blurry", cache_dtype=cache_dtype, cache_deepstack=deepstack)
    out = tmp_path / "out"
    assert run_all(make_inputs(tmp_path / "in", n=1), str(out), settings)["counts"]["done"] == 1
    prints = fingerprints("bulk-edit", settings)

    def payloads(stage):
        (tar,) = (out / stage / prints[stage] / "data").glob("*.tar")
        with tarfile.open(tar) as archive:
            return [load(archive.extractfile(m).read()) for m in archive.getmembers() if m.isfile()]

    (cache,), (negative,) = payloads("caches"), payloads("negatives")
    features = {name: t for name, t in cache.items() if name.startswith(("qwen3.early", "qwen3.mid", "qwen3.late",
                                                                           "qwen3.deepstack.", "qwen25.prompt_embeds"))
                and name != "qwen25.prompt_embeds_mask"}
    assert any(name.startswith("qwen3.deepstack.") for name in features) == deepstack
    assert all(t.dtype == torch.float8_e4m3fn for n, t in features.items() if n.startswith("qwen3.") and
               not n.endswith(".scale")) == (cache_dtype == "fp8")
    assert all(t.dtype == torch.int8 for n, t in features.items() if n.startswith("qwen3.") and
               not n.endswith((".scale", ".mean"))) == (cache_dtype == "int8")
    stored = sum(t.numel() * t.element_size() for t in features.values())
    stored += sum(t.numel() * t.element_size() for t in negative.values() if t.is_floating_point())
    qwen25 = cache["qwen25.prompt_embeds"]
    monkeypatch.setattr(job_cost, "CACHE_BYTES_PER_VALUE", qwen25.element_size())  # the tiny run computes in fp32
    deepstack_rows = [t.shape[0] for n, t in cache.items() if n.startswith("qwen3.deepstack.") and not n.endswith(".scale")]
    report = {"tokens": {"qwen3_sequence": cache["qwen3.early"].shape[0], "qwen3_vision": (deepstack_rows or [0])[0],
                         "qwen25_prompt_embeds": qwen25.shape[0]},
              "hidden_sizes": {"qwen3": cache["qwen3.early"].shape[1], "qwen25": qwen25.shape[1]},
              "condition_size": (64, 64)}
    assert negative["prompt_embeds"].shape[1] == qwen25.shape[1]
    priced = job_cost._storage_gb(report, 1, branches=2, cache_dtype=cache_dtype, cache_deepstack=deepstack)
    # the negative prompt is shorter than the instruction: price it at its own length
    priced_bytes = priced["cache_mb_per_image"] * 1e6 - (qwen25.shape[0] - negative["prompt_embeds"].shape[0]) * \
        qwen25.shape[1] * qwen25.element_size()
    assert priced_bytes == pytest.approx(stored, rel=1e-9)
