"""Checks over a real-width, few-layer model zoo, shared by the CPU tests (`test_realwidth.py`) and the
`gpu`-marked CUDA tests (`test_gpu.py`): the same functions run on both, only the tolerances differ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from helpers import make_image

PROMPT = "make the circle blue"


def dtype_on(device: str) -> str:
    """bf16 on CUDA; on a CPU, bf16 only where its bf16 matmuls are fast (else fp32: ~100x faster there)."""
    from bridgecore.model.loading import cpu_compute_dtype

    return "bfloat16" if device.startswith("cuda") else str(cpu_compute_dtype()).removeprefix("torch.")


def real_width_zoo(root: Path, device: str, layers: int = 2, vocab_size: int | None = None) -> dict[str, Path]:
    """The real-width zoo, written once under `root` (models built directly on `device`)."""
    from bridgecore.zoo.real_models import write_real_width_zoo

    marker = root / "zoo.json"
    if marker.exists() and json.loads(marker.read_text())["layers"] == layers:
        return {"qwen3-vl": root / "qwen3-vl", "qwen-image-edit": root / "qwen-image-edit"}
    return write_real_width_zoo(root, layers=layers, device=device, vocab_size=vocab_size)


def editor_for(zoo, device: str, area: int, **options):
    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit

    return EnhancedQwenImageEdit(zoo["qwen-image-edit"], zoo["qwen3-vl"], device=device, dtype=dtype_on(device),
                                 condition_area=area, **options)


def edit_parity(zoo, device: str, area: int, steps: int = 2, seed: int = 3) -> tuple[np.ndarray, ...]:
    """(ours, diffusers', ours at another seed): our baseline edit, diffusers' own pipeline (loaded separately,
    same dtype and device) given the same prompt embeddings, seed and condition area, and the scale of an
    unrelated difference."""
    from bridgecore.model.edit_pipeline import call_with_areas
    from bridgecore.model.loading import LoadOptions, load_edit_pipeline, resolve_model

    editor = editor_for(zoo, device, area)
    image = make_image(320, 200)
    ours = editor.generate(image, PROMPT, use_qwen3_vision=False, seed=seed, num_inference_steps=steps,
                           output_type="np")
    other_seed = editor.generate(image, PROMPT, use_qwen3_vision=False, seed=seed + 1, num_inference_steps=steps,
                                 output_type="np")
    embeds, mask, _ = editor.encode([[image]], [PROMPT], use_qwen3_vision=False)
    editor.unload()
    plain = load_edit_pipeline(resolve_model(zoo["qwen-image-edit"]), LoadOptions(device=device, dtype=dtype_on(device)))
    reference = call_with_areas(plain, area, area,
                                image=image, prompt_embeds=embeds.to(device), prompt_embeds_mask=mask.to(device),
                                num_inference_steps=steps, true_cfg_scale=1.0, output_type="np",
                                generator=torch.Generator(device).manual_seed(seed)).images[0]
    del plain
    return ours, reference, other_seed


def batched_and_single(editor, steps: int = 2, count: int = 3) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(batched outputs, one-by-one outputs, the first sample at another seed) for `count` samples: the first two
    of one condition size with prompts of different lengths (one padded DiT forward), the third of another size."""
    images = [make_image(200, 120, 0), make_image(200, 120, 1), make_image(120, 200, 2)][:count]
    prompts = [PROMPT, "a longer instruction that changes the padding of the batch", "add a hat"][:count]
    seeds = [5, 6, 7][:count]
    batch = editor.generate(images, prompts, seed=seeds, num_inference_steps=steps, output_type="np")
    singles = [editor.generate(i, p, seed=s, num_inference_steps=steps, output_type="np")
               for i, p, s in zip(images, prompts, seeds)]
    other_seed = editor.generate(images[0], prompts[0], seed=99, num_inference_steps=steps, output_type="np")
    return batch, singles, other_seed


def meta_models(zoo) -> dict[str, torch.nn.Module]:
    """The zoo's four models on the meta device (for the planner's memory estimate)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    edit = Path(zoo["qwen-image-edit"])
    with torch.device("meta"):
        return {
            "qwen3_vl": Qwen3VLForConditionalGeneration(AutoConfig.from_pretrained(zoo["qwen3-vl"])),
            "qwen25_vl": Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(edit / "text_encoder")),
            "transformer": QwenImageTransformer2DModel.from_config(
                QwenImageTransformer2DModel.load_config(edit / "transformer")),
            "vae": AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(edit / "vae")),
        }


def planned_memory(zoo, caches, condition_hw: tuple[int, int]) -> dict:
    """The planner's per-mode estimate for the zoo's models at the token counts of real caches."""
    from bridgecore.planning.planner import inference_memory

    qwen3, qwen25 = caches.qwen3, caches.qwen25
    patches3 = int(qwen3.grid_thw.prod(-1).sum())
    patches25 = int(qwen25.grid_thw.prod(-1).sum())
    height, width = condition_hw
    tokens = {"qwen3_sequence": int(qwen3.input_ids.numel()), "qwen3_patches": patches3,
              "qwen25_sequence": int(qwen25.input_ids.numel()) + qwen25.drop_idx, "qwen25_patches": patches25,
              "qwen25_prompt_embeds": int(qwen25.input_ids.numel()), "dit_image_tokens": 2 * (height // 16) * (width // 16)}
    return inference_memory(meta_models(zoo), tokens, condition_hw)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()
