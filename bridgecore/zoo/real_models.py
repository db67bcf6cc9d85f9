"""The real models at their real dimensions with random weights: no download, built where they will run.

Widths, heads, vocabularies and processors' pixel limits come from the shipped real configs
(`real_configs/`); only depth can be reduced (`layers=K`) so that a CPU can run the same code path.
Weights are created directly on the target device in the target dtype (a 20B-parameter DiT is never
materialised on the host) with each library's own random initialisation. The GPU benchmark
(`bench/gpu_realdim.py`) and the `gpu`-marked tests build their models here.

    model = build_real_model("transformer", device="cuda", layers=2)      # QwenImageTransformer2DModel, bf16
    processor = real_processor("qwen25_vl")                               # real image processor, offline BPE
    write_real_width_zoo("/tmp/zoo", layers=2, device="cuda")            # from_pretrained-loadable directories
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from pathlib import Path
from typing import Any

import torch

from bridgecore.planning.planner import QWEN3_PIXELS, QWEN25_PIXELS, load_real_config

logger = logging.getLogger(__name__)

VLM_NAMES = ("qwen25_vl", "qwen3_vl")
DIT_NAMES = ("transformer", "qwen_image21_transformer")
MODEL_NAMES = (*VLM_NAMES, *DIT_NAMES, "vae")

# Qwen-Image-Edit's scheduler (scheduler/scheduler_config.json of the checkpoint).
REAL_SCHEDULER_CONFIG = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
)


@contextlib.contextmanager
def _building_on(device: str | torch.device, dtype: torch.dtype):
    """New tensors land on `device` in `dtype` (factory functions follow both)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


_TEXT_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _keep_below(indices: list[int], layers: int, fallback: list[int]) -> list[int]:
    kept = [i for i in indices if i < layers]
    return kept or [i for i in fallback if i < layers] or [layers - 1]


def _vlm_config(name: str, layers: int | None, token_ids: dict[str, int] | None, vocab_size: int | None):
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    raw = load_real_config(name)
    text, vision = raw["text_config"], raw["vision_config"]
    if layers is not None:
        text["num_hidden_layers"] = vision["depth"] = layers
        if name == "qwen25_vl":
            text["max_window_layers"] = layers
            vision["fullatt_block_indexes"] = _keep_below(vision["fullatt_block_indexes"], layers, [layers - 1])
        else:
            vision["deepstack_visual_indexes"] = _keep_below(vision["deepstack_visual_indexes"], layers,
                                                             list(range(3)))
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    for key, value in (token_ids or {}).items():
        (text if key in _TEXT_TOKEN_KEYS else raw)[key] = value
    return (Qwen2_5_VLConfig if name == "qwen25_vl" else Qwen3VLConfig)(**raw)


def _diffusers_config(name: str, layers: int | None) -> dict[str, Any]:
    if name == "qwen_image21_transformer":
        config: dict[str, Any] = {}  # no released config is shipped here: the class defaults (provisional)
    else:
        config = load_real_config(name)
        config.pop("_class_name", None)
    if layers is not None and name in DIT_NAMES:
        config["num_layers"] = layers
    return config


def build_real_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     layers: int | None = None, token_ids: dict[str, int] | None = None,
                     vocab_size: int | None = None, seed: int = 0):
    """One real model with random weights, built on `device` in `dtype`.

    Args:
        name: one of `MODEL_NAMES` ("qwen25_vl", "qwen3_vl", "transformer", "qwen_image21_transformer", "vae").
        layers: depth of the LLM, the vision tower and the DiT (None: the real depth). The VAE is never reduced.
        token_ids: `image_token_id`, ... overrides so that a model matches the offline tokenizer's ids.
        vocab_size: VLM vocabulary override (None: the real one). Only the embedding table depends on it.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {MODEL_NAMES}; got {name!r}")
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be >= 1 (or None for the real depth); got {layers}")
    torch.manual_seed(seed)
    if name in VLM_NAMES:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

        cls = Qwen2_5_VLForConditionalGeneration if name == "qwen25_vl" else Qwen3VLForConditionalGeneration
        config = _vlm_config(name, layers, token_ids, vocab_size)
        with _building_on(device, dtype):
            model = cls._from_config(config, dtype=dtype)
    else:
        from diffusers import AutoencoderKLQwenImage, QwenImage21Transformer2DModel, QwenImageTransformer2DModel

        cls = {"transformer": QwenImageTransformer2DModel, "vae": AutoencoderKLQwenImage,
               "qwen_image21_transformer": QwenImage21Transformer2DModel}[name]
        with _building_on(device, dtype):
            model = cls.from_config(_diffusers_config(name, layers))
    return model.eval().requires_grad_(False)


def real_processor(name: str):
    """The VLM's processor class with the real image-processor settings (patch, merge, pixel limits) and the
    offline byte-level BPE tokenizer of the tiny zoo (Qwen's special tokens; ids differ from the real ones:
    pass `processor_token_ids(processor)` to `build_real_model`)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLProcessor
    from transformers import Qwen3VLVideoProcessor

    from bridgecore.zoo.tiny_zoo import QWEN3_VL_CHAT_TEMPLATE, QWEN25_VL_CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer()
    vision = load_real_config(name)["vision_config"]
    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    min_pixels, max_pixels = QWEN25_PIXELS if name == "qwen25_vl" else QWEN3_PIXELS
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=vision["temporal_patch_size"],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        **({} if name == "qwen25_vl" else {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}),
    )
    if name == "qwen25_vl":
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN25_VL_CHAT_TEMPLATE)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(patch_size=patch, merge_size=merge),
                            chat_template=QWEN3_VL_CHAT_TEMPLATE)


def processor_token_ids(processor) -> dict[str, int]:
    """The config token ids that must match the processor's tokenizer."""
    tokenizer = processor.tokenizer
    names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
             "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>", "pad_token_id": "<|endoftext|>"}
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def build_real_vlm(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                   layers: int | None = None, vocab_size: int | None = None):
    """(model, processor) of one VLM at real width, their token ids matched."""
    processor = real_processor(name)
    model = build_real_model(name, device, dtype, layers, processor_token_ids(processor), vocab_size)
    return model, processor


def release_memory() -> None:
    """Returns freed model memory now (after the caller dropped its references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_real_width_zoo(root: str | Path, layers: int = 2, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.bfloat16, vocab_size: int | None = None) -> dict[str, Path]:
    """`qwen3-vl/` and `qwen-image-edit/` at real width and `layers` depth, loadable with `from_pretrained`
    (as the tiny zoo, but real-width). One model is in memory at a time. Returns the two directories."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    root = Path(root)
    qwen3_dir, edit_dir = root / "qwen3-vl", root / "qwen-image-edit"
    model, processor = build_real_vlm("qwen3_vl", device, dtype, layers, vocab_size)
    model.save_pretrained(qwen3_dir)
    processor.save_pretrained(qwen3_dir)
    del model
    release_memory()
    text_encoder, processor = build_real_vlm("qwen25_vl", device, dtype, layers, vocab_size)
    components = dict(text_encoder=text_encoder, tokenizer=processor.tokenizer, processor=processor,
                      vae=build_real_model("vae", device, dtype),
                      transformer=build_real_model("transformer", device, dtype, layers),
                      scheduler=FlowMatchEulerDiscreteScheduler(**REAL_SCHEDULER_CONFIG))
    QwenImageEditPipeline(**components).save_pretrained(edit_dir)
    components.clear()
    del text_encoder
    release_memory()
    (root / "zoo.json").write_text(json.dumps({"layers": layers, "dtype": str(dtype), "vocab_size": vocab_size}))
    return {"qwen3-vl": qwen3_dir, "qwen-image-edit": edit_dir}
