"""Real-scale planner: the real configs' counts, and the analytic FLOPs checked against torch's counter."""

import json

import pytest
from helpers import run_cli
import torch
from torch.utils.flop_counter import FlopCounterMode

from bridgecore.planning.planner import dit_step_flops, plan, vlm_forward_flops


@pytest.fixture(scope="module")
def report():
    return plan(1024, 1024)


@pytest.mark.parametrize("name, expected", [("qwen3_vl", 8.77e9), ("qwen25_vl", 8.29e9),
                                            ("transformer", 20.43e9), ("vae", 127e6)])
def test_parameter_counts_of_the_real_models(report, name, expected):
    assert report["models"][name]["parameters"] == pytest.approx(expected, rel=0.005)
    assert report["models"][name]["bytes_bf16"] == 2 * report["models"][name]["parameters"]


def test_token_counts_at_1024(report):
    assert report["tokens"]["qwen25_vision"] == 1369  # 28 px tokens
    assert report["tokens"]["qwen3_vision"] == 1024  # 32 px tokens
    assert report["tokens"]["dit_image_tokens"] == 2 * 64 * 64  # target + condition latents


def test_int8_memory_is_about_half(report):
    for name in ("qwen3_vl", "qwen25_vl", "transformer"):
        model = report["models"][name]
        assert 0.45 < model["bytes_int8"] / model["bytes_bf16"] < 0.6


def _measured(fn):
    # The math SDPA backend decomposes attention into matmuls the counter sees (the CPU flash kernel has no formula).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def _vlm_inputs(processor, text, image):
    return processor(text=[text], images=[image], return_tensors="pt")


def test_analytic_vlm_flops_match_torch_counter(extractor):
    from helpers import make_image

    from bridgecore.model.edit_prompt import resize_for_condition

    for handle, prompt in ((extractor._qwen3.get(), None), (None, "make it blue")):
        if handle is not None:
            model, processor = handle.model, handle.processor
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                tokenize=False, add_generation_prompt=True)
        else:
            encoder = extractor.qwen25_encoder
            model, processor = encoder.text_encoder, encoder.processor
            text = encoder.format_prompt(prompt, 1)
        image = resize_for_condition(make_image(300, 200), 128 * 128)
        inputs = _vlm_inputs(processor, text, image)
        measured = _measured(lambda: model.model(**inputs))
        grid = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
        analytic = vlm_forward_flops(model, inputs["input_ids"].shape[1], grid)
        assert analytic["total"] == measured, (type(model).__name__, analytic, measured)


def test_analytic_dit_flops_match_torch_counter(tiny_zoo):
    from diffusers import QwenImageTransformer2DModel

    dit = QwenImageTransformer2DModel.from_pretrained(tiny_zoo["qwen-image-edit"], subfolder="transformer")
    height, width, text_len = 4, 6, 11  # packed latent grid (2x2 patches of latents)
    image_tokens = 2 * height * width
    inputs = dict(
        hidden_states=torch.randn(1, image_tokens, dit.config.in_channels),
        encoder_hidden_states=torch.randn(1, text_len, dit.config.joint_attention_dim),
        encoder_hidden_states_mask=torch.ones(1, text_len, dtype=torch.long),
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, height, width), (1, height, width)]],
        return_dict=False,
    )
    assert dit_step_flops(dit, image_tokens, text_len) == _measured(lambda: dit(**inputs))


def test_plan_cli_json():
    result = run_cli("plan", "--image-size", "720", "1280", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["image_size"] == [720, 1280]
    assert report["flops"]["dit_step"] > report["flops"]["qwen3_extraction"]["total"] > 0


def test_bad_image_size_is_refused():
    with pytest.raises(ValueError, match="image size must be positive"):
        plan(0, 1024)


def test_bridge_is_reported_at_real_dims(report):
    bridge = report["bridge"]
    assert bridge["mode"] == "both" and 5e6 <= bridge["parameters"] <= 10e6  # the budget: <= 10M
    assert 0 < bridge["flops_vs_dit_step"] < 0.01
    designs = bridge["parameters_per_design"]
    assert designs["residual"] < designs["both K=1"] and designs["tokens K=1"] < designs["both K=1"]
    assert max(designs.values()) <= 10e6


def test_training_memory_grows_with_batch_and_resolution(report):
    rows = {(r["resolution"], r["batch_size"]): r["gib"] for r in report["training_memory"]}
    assert rows[(1024, 1)] > 2 * 20.43e9 / 2**30  # at least the frozen bf16 DiT
    assert rows[(1024, 8)] > rows[(1024, 4)] > rows[(1024, 1)] > rows[(512, 1)]


def test_qwen_image_21_sizes_match_the_published_ones(report):
    """Class defaults reproduce Qwen-Image-2.1's published sizes (DiT 7.1B, text encoder 8B, VAE 0.34B, 30.9 GB)."""
    native = report["qwen_image_21"]
    published = native["published"]
    for name in ("transformer", "vae"):
        assert abs(native["models"][name]["parameters"] / published[name] - 1) < 0.01, name
    assert 8.0e9 <= native["models"]["text_encoder"]["parameters"] < 9.0e9  # "8B": Qwen3-VL-8B, 8.77B with vision
    assert abs(native["checkpoint_bytes_bf16_without_lm_head"] / published["checkpoint_bytes"] - 1) < 0.02
    assert native["dit_step_flops"] > 0 and native["licence"].startswith("Qwen Research License")
    assert report["licences"]["Qwen-Image-Edit (2508), Edit-2509, Edit-2511"] == "Apache-2.0"


def test_plan_prints_the_licences():
    result = run_cli("plan")
    assert result.returncode == 0, result.stderr
    assert "Qwen-Image-2.1: Qwen Research License" in result.stdout and "Apache-2.0" in result.stdout
    assert "Qwen-Image-2.1 (native Qwen3-VL conditioning" in result.stdout


def test_analytic_generate_flops_match_torch_counter(extractor):
    """The rewrite arm's cost: a greedy `generate` (prefill + one-token forwards over the KV cache) counted
    exactly as torch's counter sees it on the tiny Qwen3-VL."""
    from helpers import make_image

    from bridgecore.model.edit_prompt import resize_for_condition
    from bridgecore.planning.planner import generate_flops
    from bridgecore.model.rewrite import rewrite_messages

    handle = extractor._qwen3.get()
    text = handle.processor.apply_chat_template(rewrite_messages("make it blue", 1, "Rewrite it."), tokenize=False,
                                                add_generation_prompt=True)
    inputs = _vlm_inputs(handle.processor, text, resize_for_condition(make_image(300, 200), 128 * 128))
    for new_tokens in (1, 5):
        measured = _measured(lambda: handle.model.generate(**inputs, max_new_tokens=new_tokens,
                                                           min_new_tokens=new_tokens, do_sample=False))
        grid = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
        analytic = generate_flops(handle.model, inputs["input_ids"].shape[1], grid, new_tokens)
        assert analytic["prefill"] + analytic["decode"] == measured, (new_tokens, analytic, measured)


def test_the_rewrite_arm_is_priced_at_real_dimensions(report):
    """Decoding 8B bf16 reads ~16 GB of weights per step: memory-bound, priced by bandwidth, not FLOPs."""
    from bridgecore.planning.job_cost import BANDWIDTH_EFFICIENCY, GPUS, plan_job_cost

    rewrite = report["rewrite"]
    assert 15e9 < rewrite["decode_weight_bytes"] < 18e9  # Qwen3-VL-8B's language model + LM head in bf16
    per_token = rewrite["decode"] / rewrite["new_tokens"]
    assert per_token == pytest.approx(rewrite["decode_weight_bytes"], rel=0.15)  # ~2 FLOP per weight per token
    plain = plan_job_cost(1000, 1024, 50, "h100")
    job = plan_job_cost(1000, 1024, 50, "h100", rewrite=True, rewrite_batch=1)
    assert job["edit_gpu_hours"] == plain["edit_gpu_hours"] and plain["rewrite_gpu_hours"] == 0
    assert job["total_gpu_hours"] == pytest.approx(plain["total_gpu_hours"] + job["rewrite_gpu_hours"])
    # batch 1: each of the 256 steps reads the weights once at the bandwidth (plus a small KV cache)
    floor = 256 * rewrite["decode_weight_bytes"] / (BANDWIDTH_EFFICIENCY * GPUS["h100"].memory_bandwidth)
    assert floor < job["seconds_per_image"]["rewrite"] < 1.5 * floor + 1
    batched = plan_job_cost(1000, 1024, 50, "h100", rewrite=True, rewrite_batch=8)
    assert batched["seconds_per_image"]["rewrite"] < job["seconds_per_image"]["rewrite"] / 3
    assert job["rewrite_storage_gb"] > 0 and "rewrite_storage_gb" not in plain
