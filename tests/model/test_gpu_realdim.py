"""The real-dimension GPU benchmark runs on a CPU at reduced depth (the same code path), and the real-width
model builder keeps the real widths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bridgecore.zoo.real_models import build_real_model, build_real_vlm
from bridgecore.planning.planner import build_meta_models

ROOT = Path(__file__).resolve().parents[2]


def test_reduced_depth_keeps_real_widths():
    meta = build_meta_models()
    dit = build_real_model("transformer", "meta", layers=2)
    assert len(dit.transformer_blocks) == 2
    real_block = {n: p.shape for n, p in meta["transformer"].transformer_blocks[0].named_parameters()}
    assert {n: p.shape for n, p in dit.transformer_blocks[0].named_parameters()} == real_block
    vlm = build_real_model("qwen3_vl", "meta", layers=1)
    assert vlm.config.text_config.hidden_size == meta["qwen3_vl"].config.text_config.hidden_size == 4096
    assert vlm.config.vision_config.deepstack_visual_indexes == [0] and len(vlm.model.language_model.layers) == 1


def test_weights_are_random_in_the_requested_dtype():
    model, processor = build_real_vlm("qwen25_vl", "cpu", torch.bfloat16, layers=1, vocab_size=1024)
    weight = model.model.language_model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.bfloat16 and 0.01 < weight.float().std() < 0.05  # std 0.02 init, not zeros
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert processor.image_processor.patch_size == 14 and processor.image_processor.merge_size == 2


@pytest.mark.slow
def test_bench_runs_on_cpu_at_reduced_depth(tmp_path):
    out = tmp_path / "realdim.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_realdim.py"), "--device", "cpu", "--layers", "1", "--max-tokens",
         "64", "--vocab-size", "4096", "--step-cache", "0.2", "--lightning-steps", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    stages = report["stages"]
    expected = {"qwen25_extract", "load_qwen25_vl", "qwen3_extract", "bridge", "dit_step", "dit_step_cfg",
                "denoise_and_decode", "qwen_image21_step"}
    assert expected <= set(stages)
    assert report["condition_size"] == [224, 224]  # 64 Qwen2.5-VL tokens (a small size keeps the VAE's share low)
    assert stages["qwen25_extract"]["vision_tokens"] == 64  # 224 / 28 = 8 tokens a side
    assert stages["qwen3_extract"]["vision_tokens"] == 64  # Qwen3-VL's processor scales up to its 256^2 minimum: 256 / 32 = 8
    assert stages["dit_step"]["image_tokens"] == 2 * 14 * 14  # target + condition, 224 / 16 = 14 a side
    # true CFG: the positive and the (shorter) negative prompt's forwards
    assert 1.9 * stages["dit_step"]["tflop"] < stages["dit_step_cfg"]["tflop"] < 2 * stages["dit_step"]["tflop"]
    assert all(row["seconds"] > 0 for row in stages.values())
    assert all(row.get("mfu") is None for row in stages.values())  # no datasheet peak for a CPU
    assert stages["denoise_and_decode"]["vae_decode_s"] > 0 and stages["denoise_and_decode"]["vae_encode_s"] > 0
    edit = report["edit"]
    assert 0 < edit["bridge_share"] < 1 and edit["enhanced_s"] > edit["baseline_s"]
    # the isolated step runs the pipeline's path (the all-ones mask dropped) and the two timings are compared
    assert stages["dit_step"]["text_mask"].startswith("none") and edit["steps_x_dit_step_over_edit"] > 0
    assert report["exact_edit_seconds"] == pytest.approx(edit["baseline_s"]) and report["device"] == "cpu"
    # the fast mode's step cache needs two DiT blocks: at one layer it is skipped, saying why (at real depth it is
    # timed against the exact edit; tests/model/test_speed.py checks the mechanism on the tiny DiT)
    assert "two transformer blocks" in report["skipped"]["step_cache[0.2]"]
    # bulk-edit's batch of extractions, and the throughput derived from the stage times
    assert stages["qwen25_extract_batch"]["batch"] == 4 and stages["qwen3_extract_batch"]["tflop"] == pytest.approx(
        4 * stages["qwen3_extract"]["tflop"])
    throughput = report["throughput"]
    assert throughput["images_per_gpu_hour"] == pytest.approx(3600 / throughput["seconds_per_image"])
    assert throughput["seconds_per_image"] > stages["denoise_and_decode"]["seconds"]
    assert throughput["lightning_steps"] == 2 and stages["lightning_edit"]["finite"]
    # true CFG batched: one batched forward per timed call, the same numbers up to bf16 rounding, a negative
    # prompt shorter than the positive one (padded and masked)
    batched = stages["dit_step_cfg_batched"]
    assert batched["batched_calls"] == 1 and batched["max_rel_diff_vs_sequential"] < 0.05
    assert stages["dit_step_cfg"]["negative_text_tokens"] < stages["dit_step"]["text_tokens"] == batched["padded_text_tokens"]
    # profiles: the top operators of a step, and no `.item()` between denoising steps (a host sync on a GPU)
    assert report["profile_dit_step"]["top"] and "addmm" in str(report["profile_dit_step"]["top"][:3])
    assert report["profile_edit"]["host_reads_per_step"] == 0
    # FP8 (weights mode on a CPU) against the exact edit on the same seed and weights
    fp8 = stages["fp8_edit[weights]"]
    assert stages["dit_step_fp8[weights]"]["layers_converted"] == 14 and 20 < fp8["psnr_vs_exact_db"] < 200
    assert "exact edit" in result.stdout and "images per hour of this CPU" in result.stdout
    assert "whole edit" in result.stdout and "qwen25_extract" in result.stdout
