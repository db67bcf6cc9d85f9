"""Real-scale planner: sizes, memory, token counts and FLOPs of the real models, with no weights.

The real `config.json` values ship in `real_configs/`; the models are instantiated on the `meta`
device (no memory, no download). FLOPs are an exact analytic count of the matrix multiplications
(every `nn.Linear` times the tokens that pass through it, the patch-embedding convolution, attention
score and value products,
counted in full as SDPA executes them); element-wise work and the VAE convolutions are not counted.
`tests/planning/test_planner.py` checks the count against `torch.utils.flop_counter` on the tiny models.

    vision-bridge plan --image-size 1024 1024 [--json]
"""

from __future__ import annotations

import functools

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import nn

from bridgecore.model.bridge import BridgeConfig
from bridgecore.model.edit_prompt import DEFAULT_CONDITION_AREA, EDIT_TEMPLATE

REAL_CONFIGS = {
    "qwen3_vl": "qwen3_vl_8b_instruct.json",
    "qwen25_vl": "qwen_image_edit_text_encoder.json",
    "transformer": "qwen_image_edit_transformer.json",
    "vae": "qwen_image_edit_vae.json",
}
REAL_DROP_IDX = 64  # system-prefix tokens of the real Qwen-Image-Edit tokenizer
# Template tokens around the image with the real tokenizer: the Edit template minus its system prefix
# ("<|vision_start|>", "<|vision_end|>", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n") and the
# Qwen3-VL chat header ("<|im_start|>", "user", "\n", vision start/end, "<|im_end|>", "\n", "<|im_start|>",
# "assistant", "\n").
QWEN25_TEMPLATE_TOKENS_AFTER_DROP = 7
QWEN3_TEMPLATE_TOKENS = 10
DEFAULT_INSTRUCTION_TOKENS = 20


def load_real_config(name: str) -> dict[str, Any]:
    """One of the shipped real configs, without our `_source` annotation."""
    text = resources.files("bridgecore.planning.real_configs").joinpath(REAL_CONFIGS[name]).read_text()
    config = json.loads(text)
    config.pop("_source", None)
    return config


def build_meta_models() -> dict[str, nn.Module]:
    """The four real models on the meta device (no memory); built once per process (a few seconds each time
    otherwise: the planner prices several variants of a job), a fresh dict each call."""
    return dict(_meta_models())


@functools.lru_cache(maxsize=1)
def _meta_models() -> dict[str, nn.Module]:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    def diffusers_config(name):
        config = load_real_config(name)
        config.pop("_class_name", None)
        return config

    with torch.device("meta"):
        return {
            "qwen3_vl": Qwen3VLForConditionalGeneration(Qwen3VLConfig(**load_real_config("qwen3_vl"))),
            "qwen25_vl": Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**load_real_config("qwen25_vl"))),
            "transformer": QwenImageTransformer2DModel.from_config(diffusers_config("transformer")),
            "vae": AutoencoderKLQwenImage.from_config(diffusers_config("vae")),
        }


# -- Qwen-Image-2.1, the native arm -----------------------------------------------------------------------

# Licences of the model families a user can pick (model cards, 2026-11).
LICENCES = {
    "Qwen-Image-Edit (2508), Edit-2509, Edit-2511": "Apache-2.0",
    "Qwen3-VL-8B-Instruct": "Apache-2.0",
    "Qwen-Image-2.1": "Qwen Research License (research use; commercial use needs Qwen's permission)",
}
# Published sizes of Qwen-Image-2.1 (release notes): DiT, text encoder, VAE parameters; bf16 checkpoint.
QWEN_IMAGE_21_PUBLISHED = {"transformer": 7.1e9, "text_encoder": 8e9, "vae": 0.34e9, "checkpoint_bytes": 30.9e9}
QWEN21_TEMPLATE_TOKENS = 34  # system message, <image1> tags and the assistant header (tiny-zoo tokenizer count)


def dit21_step_flops(transformer: nn.Module, image_tokens: int, text_tokens: int) -> int:
    """Matmul FLOPs of one `QwenImage21Transformer2DModel` forward: single-stream blocks over text + image tokens;
    attention counted in full (its block-causal mask only skips some of it: an upper bound)."""

    def tokens(name: str) -> int:
        if "modulation" in name or "time_text_embed" in name or name == "norm_out.linear":
            return 1
        if name.startswith("txt_in"):
            return text_tokens
        if name in ("img_in", "proj_out"):
            return image_tokens
        return image_tokens + text_tokens

    config = transformer.config
    joint = image_tokens + text_tokens
    attention = _attention_flops(joint, joint, config.num_attention_heads * config.attention_head_dim)
    return _linear_flops(transformer, tokens) + attention * config.num_layers


def qwen_image_21_plan(qwen3: nn.Module, cond_hw: tuple[int, int], instruction_tokens: int) -> dict[str, Any]:
    """Qwen-Image-2.1 at real size, on the meta device: its DiT and VAE from the diffusers class defaults (no
    released config ships offline; they reproduce the published sizes), Qwen3-VL-8B as text encoder. FLOPs of
    one DiT step (condition image + target, prompt with the condition's image tokens), analytic."""
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel

    with torch.device("meta"):
        transformer, vae = QwenImage21Transformer2DModel(), AutoencoderKLQwenImage21()
    height, width = cond_hw
    lat_h, lat_w = height // 16, width // 16  # 16x VAE, 64 channels, 1x1 patches: one token per 16x16 px
    slots = (lat_h // 2) * (lat_w // 2)  # Qwen3-VL: one image token per 32x32 px
    text_len = QWEN21_TEMPLATE_TOKENS + slots + instruction_tokens
    image_len = 2 * lat_h * lat_w  # the condition image's latents and the target's
    flops = dit21_step_flops(transformer, image_len, text_len)
    models = {"transformer": vars(_plan_model("transformer", transformer)),
              "text_encoder": vars(_plan_model("text_encoder", qwen3)), "vae": vars(_plan_model("vae", vae))}
    lm_head = qwen3.lm_head.weight.numel()
    return {"models": models, "dit_step_flops": flops, "dit_tokens": image_len + text_len,
            "checkpoint_bytes_bf16": sum(m["bytes_bf16"] for m in models.values()),
            "checkpoint_bytes_bf16_without_lm_head": sum(m["bytes_bf16"] for m in models.values()) - 2 * lm_head,
            "published": QWEN_IMAGE_21_PUBLISHED, "licence": LICENCES["Qwen-Image-2.1"],
            "config_source": "diffusers 0.42 class defaults (provisional; no released config ships offline)"}


# -- token counts --------------------------------------------------------------------------------------


def vision_grid(height: int, width: int, patch_size: int, merge_size: int,
                min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(grid_h, grid_w) in patches after the Qwen-VL processors' `smart_resize`."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor = patch_size * merge_size
    resized_h, resized_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return resized_h // patch_size, resized_w // patch_size


def condition_hw(height: int, width: int, area: int) -> tuple[int, int]:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    cond_w, cond_h, _ = calculate_dimensions(area, width / height)
    return int(cond_h), int(cond_w)


# Real processors' pixel limits (preprocessor_config.json of the two checkpoints).
QWEN25_PIXELS = (56 * 56, 12845056)  # Qwen-Image-Edit processor: min 3136, max 28*28*16384
QWEN3_PIXELS = (65536, 16777216)


# -- analytic FLOPs ------------------------------------------------------------------------------------


def _linear_flops(module: nn.Module, tokens_for: callable) -> int:
    total = 0
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            total += 2 * sub.in_features * sub.out_features * tokens_for(name)
    return total


def _attention_flops(query_len: int, key_len: int, width: int) -> int:
    return 2 * 2 * query_len * key_len * width  # Q @ K^T and P @ V


def vlm_forward_flops(model: nn.Module, seq_len: int, grid_thw: list[tuple[int, int, int]], skip_lm_head: bool = True) -> dict[str, int]:
    """Matmul FLOPs of one Qwen2.5-VL or Qwen3-VL forward over `seq_len` tokens with images `grid_thw`."""
    vision_cfg = model.config.vision_config
    text_cfg = model.config.text_config
    merge = vision_cfg.spatial_merge_size
    patches = sum(t * h * w for t, h, w in grid_thw)
    merged = patches // merge**2

    def vision_tokens(name: str) -> int:
        return merged if "merger" in name else patches

    vision = _linear_flops(model.model.visual, vision_tokens)
    # The patch embedding is a Conv3d whose kernel equals its stride: one weight-sized product per patch.
    vision += sum(2 * m.weight.numel() * patches for m in model.model.visual.modules() if isinstance(m, nn.Conv3d))
    attn_width = vision_cfg.hidden_size
    full_blocks = getattr(vision_cfg, "fullatt_block_indexes", None)
    if full_blocks is None:  # Qwen3-VL: every block attends over each whole image
        per_block = sum(_attention_flops(t * h * w, t * h * w, attn_width) for t, h, w in grid_thw)
        vision += per_block * vision_cfg.depth
    else:  # Qwen2.5-VL: windowed attention except in `fullatt_block_indexes`
        from transformers.vision_utils import get_vision_window_index

        _, cu = get_vision_window_index(torch.tensor(grid_thw), merge, vision_cfg.window_size, vision_cfg.patch_size)
        lengths = torch.unique_consecutive(cu).diff().tolist()
        window = sum(_attention_flops(n, n, attn_width) for n in lengths)
        full = sum(_attention_flops(t * h * w, t * h * w, attn_width) for t, h, w in grid_thw)
        vision += full * len(full_blocks) + window * (vision_cfg.depth - len(full_blocks))
    text = _linear_flops(model.model.language_model, lambda name: seq_len)
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    head_width = text_cfg.num_attention_heads * head_dim
    text += _attention_flops(seq_len, seq_len, head_width) * text_cfg.num_hidden_layers
    lm_head = 0 if skip_lm_head else 2 * model.lm_head.in_features * model.lm_head.out_features * seq_len
    return {"vision": vision, "text": text, "lm_head": lm_head, "total": vision + text + lm_head}


REWRITE_SYSTEM_TOKENS_PER_CHAR = 0.25  # English text with Qwen's BPE: about 4 characters per token (estimate)


def generate_flops(model: nn.Module, prompt_tokens: int, grid_thw: list[tuple[int, int, int]],
                   new_tokens: int) -> dict[str, int]:
    """Matmul FLOPs of a greedy `generate` of `new_tokens` after a prompt of `prompt_tokens` with images `grid_thw`:
    the prefill, whose LM head on the last position gives token 1, then tokens 2..N as one-token forwards
    attending over the prompt and the tokens before them (KV cache)."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    lm_head = 2 * model.lm_head.in_features * model.lm_head.out_features
    prefill = vlm_forward_flops(model, prompt_tokens, grid_thw)["total"] + lm_head
    context = sum(prompt_tokens + t for t in range(1, new_tokens))
    decode = (_linear_flops(model.model.language_model, lambda name: 1) + lm_head) * (new_tokens - 1) \
        + _attention_flops(1, 1, text.num_attention_heads * head_dim) * text.num_hidden_layers * context
    return {"prefill": prefill, "decode": decode, "context_tokens": context}


def rewrite_cost(qwen3: nn.Module, qwen25: nn.Module, grid3: tuple[int, int], grid25: tuple[int, int],
                 instruction_tokens: int, new_tokens: int, system_tokens: int | None = None) -> dict[str, int]:
    """What the rewrite arm adds per sample: Qwen3-VL's prefill of system prompt + images + instruction, greedy
    decoding of `new_tokens`, and Qwen2.5-VL encoding the rewrite. Decoding is bound by memory, not FLOPs:
    `decode_weight_bytes` (bf16 weights read per decoding step, shared by a batch) and `kv_bytes_per_token`
    let the cost model price it."""
    from bridgecore.model.rewrite import SYSTEM_PROMPT

    system_tokens = system_tokens if system_tokens is not None else round(len(SYSTEM_PROMPT) * REWRITE_SYSTEM_TOKENS_PER_CHAR)
    merge3 = qwen3.config.vision_config.spatial_merge_size
    # chat header and the system turn's own template tokens (5) around the image and "Instruction: ..."
    prompt = QWEN3_TEMPLATE_TOKENS + 5 + system_tokens + grid3[0] * grid3[1] // merge3**2 + instruction_tokens
    generation = generate_flops(qwen3, prompt, [(1, *grid3)], new_tokens)
    merge25 = qwen25.config.vision_config.spatial_merge_size
    seq25 = REAL_DROP_IDX + QWEN25_TEMPLATE_TOKENS_AFTER_DROP + grid25[0] * grid25[1] // merge25**2 + new_tokens
    reencode = vlm_forward_flops(qwen25, seq25, [(1, *grid25)])["total"]
    text = qwen3.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    unique = {id(p): p for p in [*qwen3.model.language_model.parameters(), qwen3.lm_head.weight]}  # tied: once
    weights = sum(p.numel() for p in unique.values())
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # K and V, bf16
    return {"prompt_tokens": prompt, "new_tokens": new_tokens, "system_tokens": system_tokens, **generation,
            "reencode": reencode, "decode_weight_bytes": 2 * weights, "kv_bytes_per_token": kv}


def dit_step_flops(transformer: nn.Module, image_tokens: int, text_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one `QwenImageTransformer2DModel` forward (one denoising step, one CFG branch).
    `image_tokens` counts the noisy target latents plus the concatenated condition latents."""

    def tokens(name: str) -> int:
        if "mod" in name or "time_text_embed" in name or name == "norm_out.linear":
            return 1
        if "txt" in name or "add_" in name:
            return text_tokens
        return image_tokens

    config = transformer.config
    joint = image_tokens + text_tokens
    attention = _attention_flops(joint, joint, config.num_attention_heads * config.attention_head_dim)
    return batch * (_linear_flops(transformer, tokens) + attention * config.num_layers)


def bridge_cost(qwen3_seq: int, qwen3_grid: tuple[int, int], qwen25_seq: int, qwen25_grid: tuple[int, int],
                config=None) -> dict[str, int]:
    """Parameters and FLOPs (measured with `torch.utils.flop_counter`) of one bridge forward at real dims."""
    from torch.utils.flop_counter import FlopCounterMode

    from bridgecore.model.bridge import BridgeConfig, VisionCacheBridge
    from bridgecore.model.cache_format import Qwen3VisionCache, Qwen25VisionCache

    config = config or BridgeConfig()
    bridge = VisionCacheBridge(config)
    n3, n25 = qwen3_grid[0] * qwen3_grid[1] // 4, qwen25_grid[0] * qwen25_grid[1] // 4
    qwen3 = Qwen3VisionCache(
        levels={name: torch.randn(qwen3_seq, config.qwen3_hidden_dim) for name in config.levels},
        deepstack={i: torch.randn(n3, config.qwen3_hidden_dim) for i in range(config.num_deepstack)},
        input_ids=torch.zeros(qwen3_seq, dtype=torch.long), vision_positions=torch.arange(n3),
        grid_thw=torch.tensor([[1, *qwen3_grid]]), layer_indices={}, model_id="", revision="")
    qwen25 = Qwen25VisionCache(
        prompt_embeds=torch.randn(qwen25_seq, config.qwen25_hidden_dim), prompt_embeds_mask=torch.ones(qwen25_seq),
        input_ids=torch.zeros(qwen25_seq, dtype=torch.long), vision_positions=torch.arange(n25),
        grid_thw=torch.tensor([[1, *qwen25_grid]]), model_id="", revision="", template="edit", drop_idx=0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bridge(qwen3, qwen25)
    return {"parameters": bridge.num_parameters(), "flops": counter.get_total_flops()}


def bridge_designs(token_counts: tuple[int, ...] = (1, 4, 16)) -> dict[str, int]:
    """Parameters of each bridge design at the real dimensions (meta device: nothing allocated)."""
    from bridgecore.model.bridge import BridgeConfig, VisionCacheBridge

    designs = {"residual": BridgeConfig(mode="residual")}
    for mode in ("tokens", "both"):
        designs.update({f"{mode} K={k}": BridgeConfig(mode=mode, num_tokens=k) for k in token_counts})
    with torch.device("meta"):
        return {name: VisionCacheBridge(config).num_parameters() for name, config in designs.items()}


# Widths of `inner_dim` kept per token while one DiT block is recomputed for backward (q, k, v, attention
# output, the 4x MLP before and after its activation, modulated norms, residuals, both streams): an estimate.
BLOCK_RECOMPUTE_WIDTHS = 30


def training_memory(transformer: nn.Module, bridge_parameters: int, text_tokens: int,
                    resolutions: tuple[int, ...] = (512, 1024), batch_sizes: tuple[int, ...] = (1, 4, 8)) -> list[dict]:
    """GPU memory to train the bridge against the frozen bf16 DiT with gradient checkpointing (estimate).

    weights (bf16, frozen) + bridge (fp32 weights, grads, AdamW moments) + per sample: every block's
    checkpointed inputs (bf16) + one block's recomputed activations.
    """
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    weights = 2 * sum(p.numel() for p in transformer.parameters())
    bridge = 16 * bridge_parameters
    rows = []
    for side in resolutions:
        tokens = 2 * (side // 16) ** 2 + text_tokens  # target + condition latents, text
        per_sample = 2 * tokens * width * (config.num_layers + BLOCK_RECOMPUTE_WIDTHS)
        for batch in batch_sizes:
            total = weights + bridge + batch * per_sample
            rows.append({"resolution": side, "batch_size": batch, "gib": total / 2**30,
                         "weights_gib": weights / 2**30, "activations_gib": batch * per_sample / 2**30})
    return rows


# -- inference memory ----------------------------------------------------------------------------------

# Estimates of live activations at inference (bf16), checked against the GPU benchmark's measured peaks:
DIT_ACTIVATION_WIDTHS = 24  # [tokens, inner_dim] tensors alive inside one DiT block (q, k, v, 4x MLP, norms, ...)
VAE_DECODE_WIDTHS = 28  # [pixels, base_dim] tensors alive in the VAE decoder's full-resolution stage (CPU: ~25)
DIT_OFFLOAD_RESIDENT_BLOCKS = 2  # group offload at block level with streams: the running block + the prefetched one
GPU_MEMORY_GIB = {"24gb": 24, "l40s": 48, "a100": 80, "h100": 80, "h200": 141}


def vlm_activation_bytes(model: nn.Module, seq_len: int, patches: int) -> int:
    """One extraction forward: every LLM hidden state is kept (`output_hidden_states`), one layer's attention and
    MLP are live, plus the vision tower's widest tensors."""
    text, vision = model.config.text_config, model.config.vision_config
    llm = seq_len * ((text.num_hidden_layers + 1 + 4) * text.hidden_size + 3 * text.intermediate_size)
    tower = patches * (16 * vision.hidden_size + 2 * vision.intermediate_size)
    return 2 * (llm + tower)


def dit_activation_bytes(transformer: nn.Module, tokens: int) -> int:
    config = transformer.config
    return 2 * tokens * config.num_attention_heads * config.attention_head_dim * DIT_ACTIVATION_WIDTHS


def vae_decode_bytes(vae: nn.Module, height: int, width: int) -> int:
    return 2 * height * width * vae.config.base_dim * VAE_DECODE_WIDTHS


def _weight_bytes(model: nn.Module, int8: bool = False) -> int:
    plan_ = _plan_model("", model)
    return plan_.bytes_int8 if int8 else plan_.bytes_bf16


def _offloaded_dit_bytes(transformer: nn.Module) -> int:
    """Resident DiT weights under block-level group offload: everything but the blocks, plus a few blocks."""
    blocks = transformer.transformer_blocks
    per_block = 2 * sum(p.numel() for p in blocks[0].parameters())
    return _weight_bytes(transformer) - per_block * len(blocks) + per_block * min(DIT_OFFLOAD_RESIDENT_BLOCKS, len(blocks))


def inference_memory(models: dict[str, nn.Module], tokens: dict[str, int], condition_hw: tuple[int, int],
                     bridge_bytes: int = 0) -> dict[str, dict[str, Any]]:
    """Peak GPU memory of one edit per residency mode (weights + the peak stage's activations; estimate).

    Modes: `all_resident` (VLMs, DiT and VAE stay loaded), `one_model_at_a_time` (each VLM is freed before the
    next model runs), `+int8_vlms` (bitsandbytes 8-bit VLMs), `+dit_offload` (the DiT's blocks stream from
    host RAM, `dit_offload=True`). Returns, per mode, the peak bytes, the stage that sets it and the cards it fits.
    """
    height, width = condition_hw
    acts = {"qwen3_vl": vlm_activation_bytes(models["qwen3_vl"], tokens["qwen3_sequence"], tokens["qwen3_patches"]),
            "qwen25_vl": vlm_activation_bytes(models["qwen25_vl"], tokens["qwen25_sequence"], tokens["qwen25_patches"]),
            "dit": dit_activation_bytes(models["transformer"], tokens["dit_image_tokens"] + tokens["qwen25_prompt_embeds"]),
            "vae": vae_decode_bytes(models["vae"], height, width)}
    vae = _weight_bytes(models["vae"])
    modes = {}
    for name, int8, offload, one_at_a_time in (("all_resident", False, False, False),
                                               ("one_model_at_a_time", False, False, True),
                                               ("one_model_at_a_time+int8_vlms", True, False, True),
                                               ("one_model_at_a_time+dit_offload", False, True, True),
                                               ("one_model_at_a_time+int8_vlms+dit_offload", True, True, True)):
        vlm = {n: _weight_bytes(models[n], int8) for n in ("qwen3_vl", "qwen25_vl")}
        dit = _offloaded_dit_bytes(models["transformer"]) if offload else _weight_bytes(models["transformer"])
        denoise = dit + vae + bridge_bytes
        if one_at_a_time:
            stages = {"qwen3_vl": vlm["qwen3_vl"] + acts["qwen3_vl"], "qwen25_vl": vlm["qwen25_vl"] + acts["qwen25_vl"],
                      "denoise": denoise + acts["dit"], "vae_decode": denoise + acts["vae"]}
        else:
            resident = sum(vlm.values()) + denoise
            stages = {"qwen3_vl": resident + acts["qwen3_vl"], "qwen25_vl": resident + acts["qwen25_vl"],
                      "denoise": resident + acts["dit"], "vae_decode": resident + acts["vae"]}
        peak_stage = max(stages, key=stages.get)
        modes[name] = {"peak_bytes": stages[peak_stage], "peak_gib": stages[peak_stage] / 2**30,
                       "peak_stage": peak_stage, "stages_gib": {k: v / 2**30 for k, v in stages.items()},
                       "fits": [gpu for gpu, gib in GPU_MEMORY_GIB.items() if stages[peak_stage] / 2**30 <= 0.95 * gib]}
    return {"activations_gib": {k: v / 2**30 for k, v in acts.items()}, "modes": modes}


# -- report --------------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    name: str
    parameters: int
    bytes_bf16: int
    bytes_int8: int


def _plan_model(name: str, model: nn.Module) -> ModelPlan:
    params = sum(p.numel() for p in model.parameters())
    # int8 (bitsandbytes LLM.int8): Linear weights in 1 byte; norms, embeddings, biases and the LM head (skipped by
    # `LoadOptions`) stay bf16.
    linear = sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head")
    return ModelPlan(name, params, 2 * params, linear + 2 * (params - linear))


def plan(height: int = 1024, width: int = 1024, condition_area: int = DEFAULT_CONDITION_AREA,
         instruction_tokens: int = DEFAULT_INSTRUCTION_TOKENS, extra_models: dict[str, nn.Module] | None = None,
         rewrite_tokens: int = 256, qwen3_area: int | None = None) -> dict[str, Any]:
    """Everything `vision-bridge plan` prints, as one dict. `qwen3_area`: Qwen3-VL's view of the condition image when
    it is given a smaller one than the DiT's (its token grid, sequence and extraction FLOPs follow it)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive; got {height}x{width}")
    if rewrite_tokens < 1:
        raise ValueError(f"rewrite tokens must be at least 1; got {rewrite_tokens}")
    models = build_meta_models()
    models.update(extra_models or {})
    cond_h, cond_w = condition_hw(height, width, condition_area)
    q25_cfg, q3_cfg = models["qwen25_vl"].config.vision_config, models["qwen3_vl"].config.vision_config
    g25 = vision_grid(cond_h, cond_w, q25_cfg.patch_size, q25_cfg.spatial_merge_size, *QWEN25_PIXELS)
    view_h, view_w = condition_hw(height, width, min(qwen3_area, condition_area)) if qwen3_area else (cond_h, cond_w)
    g3 = vision_grid(view_h, view_w, q3_cfg.patch_size, q3_cfg.spatial_merge_size, *QWEN3_PIXELS)
    tok25 = g25[0] * g25[1] // q25_cfg.spatial_merge_size**2
    tok3 = g3[0] * g3[1] // q3_cfg.spatial_merge_size**2
    seq25 = REAL_DROP_IDX + QWEN25_TEMPLATE_TOKENS_AFTER_DROP + tok25 + instruction_tokens
    seq3 = QWEN3_TEMPLATE_TOKENS + tok3 + instruction_tokens
    flops25 = vlm_forward_flops(models["qwen25_vl"], seq25, [(1, *g25)])
    flops3 = vlm_forward_flops(models["qwen3_vl"], seq3, [(1, *g3)])
    latent_tokens = (cond_h // 16) * (cond_w // 16)  # VAE /8, then 2x2 patches
    dit = dit_step_flops(models["transformer"], 2 * latent_tokens, seq25 - REAL_DROP_IDX)
    bridge = bridge_cost(seq3, g3, seq25 - REAL_DROP_IDX, g25)
    report: dict[str, Any] = {
        "image_size": [height, width],
        "condition_size": [cond_h, cond_w],
        "flop_method": "analytic matmul count (linear layers, patch embedding, attention products), element-wise ops excluded",
        "models": {name: vars(_plan_model(name, m)) for name, m in models.items()},
        "hidden_sizes": {"qwen3": models["qwen3_vl"].config.text_config.hidden_size,
                         "qwen25": models["qwen25_vl"].config.text_config.hidden_size},
        "tokens": {"qwen25_vision": tok25, "qwen25_grid": list(g25), "qwen25_sequence": seq25,
                   "qwen25_prompt_embeds": seq25 - REAL_DROP_IDX, "qwen3_vision": tok3, "qwen3_grid": list(g3),
                   "qwen3_sequence": seq3, "dit_image_tokens": 2 * latent_tokens},
        "flops": {"qwen25_extraction": flops25, "qwen3_extraction": flops3, "dit_step": dit,
                  "bridge": bridge["flops"]},
        "bridge": {"parameters": bridge["parameters"], "bytes_bf16": 2 * bridge["parameters"],
                   "flops_vs_dit_step": bridge["flops"] / dit, "mode": BridgeConfig().mode,
                   "num_tokens": BridgeConfig().num_tokens, "parameters_per_design": bridge_designs()},
        "training_memory": training_memory(models["transformer"], bridge["parameters"], seq25 - REAL_DROP_IDX),
        "inference_memory": inference_memory(
            models, {"qwen3_sequence": seq3, "qwen3_patches": g3[0] * g3[1], "qwen25_sequence": seq25,
                     "qwen25_patches": g25[0] * g25[1], "qwen25_prompt_embeds": seq25 - REAL_DROP_IDX,
                     "dit_image_tokens": 2 * latent_tokens}, (cond_h, cond_w), 4 * bridge["parameters"]),
        "drop_idx_note": f"{REAL_DROP_IDX} system tokens dropped (real tokenizer, template {EDIT_TEMPLATE[:20]!r}...)",
        "rewrite": rewrite_cost(models["qwen3_vl"], models["qwen25_vl"], g3, g25, instruction_tokens, rewrite_tokens),
        "qwen_image_21": qwen_image_21_plan(models["qwen3_vl"], (cond_h, cond_w), instruction_tokens),
        "licences": LICENCES,
    }
    report["qwen_image_21"]["dit_step_flops_vs_edit"] = report["qwen_image_21"]["dit_step_flops"] / dit
    return report


def format_plan(report: dict[str, Any]) -> str:
    lines = [f"Image {report['image_size'][0]}x{report['image_size'][1]} -> condition "
             f"{report['condition_size'][0]}x{report['condition_size'][1]}"]
    lines.append(f"{'model':<14}{'params':>14}{'bf16 GiB':>11}{'int8 GiB':>11}")
    for name, m in report["models"].items():
        lines.append(f"{name:<14}{m['parameters'] / 1e9:>13.3f}B{m['bytes_bf16'] / 2**30:>11.2f}{m['bytes_int8'] / 2**30:>11.2f}")
    b = report["bridge"]
    lines.append(f"{'bridge':<14}{b['parameters'] / 1e6:>13.3f}M{b['bytes_bf16'] / 2**30:>11.4f}  "
                 f"(default design: {b['mode']}, K={b['num_tokens']})")
    lines.append("bridge designs (parameters): " + ", ".join(
        f"{name} {count / 1e6:.2f}M" for name, count in b["parameters_per_design"].items()))
    t = report["tokens"]
    lines.append(f"vision tokens: Qwen2.5-VL {t['qwen25_vision']} (grid {t['qwen25_grid']} patches of 14 px), "
                 f"Qwen3-VL {t['qwen3_vision']} (grid {t['qwen3_grid']} patches of 16 px)")
    lines.append(f"sequences: Qwen2.5-VL {t['qwen25_sequence']} -> prompt_embeds {t['qwen25_prompt_embeds']}, "
                 f"Qwen3-VL {t['qwen3_sequence']}, DiT image tokens {t['dit_image_tokens']}")
    f = report["flops"]
    lines.append(f"FLOPs ({report['flop_method']}):")
    lines.append(f"  Qwen2.5-VL extraction {f['qwen25_extraction']['total'] / 1e12:.2f} TFLOP "
                 f"(vision {f['qwen25_extraction']['vision'] / 1e12:.2f})")
    lines.append(f"  Qwen3-VL extraction   {f['qwen3_extraction']['total'] / 1e12:.2f} TFLOP "
                 f"(vision {f['qwen3_extraction']['vision'] / 1e12:.2f})")
    lines.append(f"  DiT step              {f['dit_step'] / 1e12:.2f} TFLOP")
    for key, value in f.items():
        if key not in ("qwen25_extraction", "qwen3_extraction", "dit_step"):
            lines.append(f"  {key:<21} {value / 1e12:.4f} TFLOP")
    lines.append(f"  bridge / one DiT step = {b['flops_vs_dit_step']:.2e}")
    r = report.get("rewrite")
    if r:
        lines.append(f"  rewrite arm: Qwen3-VL prefill {r['prefill'] / 1e12:.2f} TFLOP ({r['prompt_tokens']} tokens, system "
                     f"prompt ~{r['system_tokens']}), decode {r['new_tokens']} tokens {r['decode'] / 1e12:.3f} TFLOP "
                     f"(memory-bound: {r['decode_weight_bytes'] / 1e9:.1f} GB of weights read per step), Qwen2.5-VL "
                     f"re-encode {r['reencode'] / 1e12:.2f} TFLOP")
    lines.append("training memory (frozen bf16 DiT + bridge with AdamW + checkpointed activations; estimate):")
    for row in report["training_memory"]:
        lines.append(f"  {row['resolution']:>4}px  batch {row['batch_size']:>2}: {row['gib']:6.1f} GiB "
                     f"(weights {row['weights_gib']:.1f}, activations {row['activations_gib']:.1f})")
    native = report.get("qwen_image_21")
    if native:
        m = native["models"]
        lines.append(f"Qwen-Image-2.1 (native Qwen3-VL conditioning; {native['config_source']}):")
        lines.append(f"  DiT {m['transformer']['parameters'] / 1e9:.3f}B, text encoder (Qwen3-VL-8B) "
                     f"{m['text_encoder']['parameters'] / 1e9:.3f}B, VAE {m['vae']['parameters'] / 1e9:.3f}B; "
                     f"bf16 {native['checkpoint_bytes_bf16'] / 1e9:.1f} GB "
                     f"({native['checkpoint_bytes_bf16_without_lm_head'] / 1e9:.1f} GB without the unused LM head; "
                     f"published {native['published']['checkpoint_bytes'] / 1e9:.1f} GB)")
        lines.append(f"  DiT step <= {native['dit_step_flops'] / 1e12:.2f} TFLOP ({native['dit_tokens']} tokens, full "
                     f"attention counted: an upper bound), {native['dit_step_flops_vs_edit']:.2f}x an Edit DiT step")
    if report.get("licences"):
        lines.append("licences: " + "; ".join(f"{family}: {licence}" for family, licence in report["licences"].items()))
    memory = report.get("inference_memory")
    if memory:
        lines.append("inference memory of one edit (weights + peak activations; estimate; fits = <= 95% of the card):")
        for mode, row in memory["modes"].items():
            lines.append(f"  {mode:<42} {row['peak_gib']:6.1f} GiB at {row['peak_stage']:<10} fits: "
                         + (", ".join(row["fits"]) or "none"))
    return "\n".join(lines)
