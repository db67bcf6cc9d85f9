"""EnhancedQwenImageEdit: diffusers' Qwen-Image-Edit(-Plus) pipelines fed with bridged embeddings.

No fork of the denoising code: the pipeline gets `prompt_embeds` / `prompt_embeds_mask` (and the
negative pair for true CFG) computed here the M-RoPE-correct way, optionally enhanced by the bridge.
With true CFG only the conditional branch goes through the bridge: the negative prompt gets
Qwen-Image-Edit's own embeddings, as the bridge is never trained on negatives and CFG then amplifies
exactly the bridge's correction.

    editor = EnhancedQwenImageEdit("Qwen/Qwen-Image-Edit", "Qwen/Qwen3-VL-8B-Instruct", bridge="ckpt/")
    image = editor.generate(image, "Change the text 'Hello' to 'Goodbye'", seed=0)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import types
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bridgecore.model.bridge import BridgeConfig, VisionCacheBridge, identity_bridge
from bridgecore.model.edit_prompt import DEFAULT_CONDITION_AREA, DEFAULT_PLUS_CONDITION_AREA, condition_size
from bridgecore.model.extraction import VisionCacheExtractor
from bridgecore.model.images import load_image
from bridgecore.model.loading import (
    DEFAULT_EDIT_MODEL,
    DEFAULT_QWEN3_MODEL,
    LazyModel,
    LoadOptions,
    load_edit_pipeline,
    pipeline_class_name,
    resolve_model,
)
from bridgecore.model.speed import (
    attention_backends,
    compile_transformer,
    conflicting_options,
    default_steps,
    enable_batched_cfg,
    enable_dit_offload,
    enable_fp8,
    enable_step_cache,
    load_loras,
    parse_loras,
    resolve_scheduler,
    set_attention_backend,
    use_lightning_scheduler,
)
from bridgecore.options import option

logger = logging.getLogger(__name__)

_PIPELINE_AREA = 1024 * 1024  # hard-coded in both diffusers pipelines
_PIPELINE_PLUS_CONDITION_AREA = 384 * 384


def call_with_areas(pipe, condition_area: int, plus_condition_area: int, **kwargs):
    """`pipe(**kwargs)`, diffusers' own call, with its condition images sized to our areas instead of the hard-coded
    1024*1024 (and Edit-Plus's 384*384).

    diffusers reads the areas through its module's `calculate_dimensions`. Rather than patch that module function
    (shared state), the call runs as a copy of diffusers' `__call__` code whose globals map those areas to ours:
    nothing shared changes, so threads and other pipelines are unaffected.
    """
    call = inspect.unwrap(type(pipe).__call__)  # diffusers' function below its torch.no_grad decorator
    if "calculate_dimensions" not in call.__code__.co_names:
        raise RuntimeError(f"{type(pipe).__name__}.__call__ no longer sizes images through calculate_dimensions: "
                           "this diffusers version needs another way to set the condition area")
    original = call.__globals__["calculate_dimensions"]
    mapping = {_PIPELINE_AREA: condition_area, _PIPELINE_PLUS_CONDITION_AREA: plus_condition_area}

    def calculate_dimensions(target_area, ratio):
        return original(mapping.get(target_area, target_area), ratio)

    sized = types.FunctionType(call.__code__, {**call.__globals__, "calculate_dimensions": calculate_dimensions},
                               call.__name__, call.__defaults__, call.__closure__)
    sized.__kwdefaults__ = call.__kwdefaults__
    with torch.no_grad():
        return sized(pipe, **kwargs)


class EnhancedQwenImageEdit:
    """Qwen-Image-Edit with Qwen3-VL vision through a `VisionCacheBridge`.

    Args:
        edit_model: hub id or directory of a Qwen-Image-Edit (or Edit-Plus) pipeline.
        qwen3_model: hub id or directory of Qwen3-VL.
        bridge: a `VisionCacheBridge`, a checkpoint directory, or None for an untrained (no-op) bridge.
        condition_area: condition-image area (the pipelines' 1024*1024 by default).
        one_model_at_a_time: keep at most one large model resident (Qwen3-VL, Qwen2.5-VL, DiT in turn).
        load_in_8bit: load the two VLMs in 8-bit.
        lora: LoRA(s) for the DiT, each `PATH_OR_ID[:scale]` (see `bridgecore.model.speed`); fused after loading.
        scheduler: "auto" (Lightning's scheduler when a Lightning LoRA is given), "default" or "lightning".
        compile: regional `torch.compile` of the DiT's repeated blocks; `compile_options` go to torch.compile.
        attention_backend: diffusers attention backend for the DiT ("native", "_native_cudnn", "flash", ...).
        dit_offload: stream the DiT's blocks from host RAM (cards smaller than the 38 GiB bf16 DiT).
        step_cache: the fast mode's First Block Cache threshold (0: off, the exact edit); see `speed.enable_step_cache`.
        batch_cfg: run true CFG's two forwards per step as one batch of two (exact); see `speed.BatchedGuidanceHook`.
        fp8: "off", "dynamic" (FP8 matmuls, compute capability >= 8.9) or "weights" (FP8 storage): the DiT blocks'
            linear layers through torchao, an approximation; see `speed.enable_fp8`.
        qwen3_area: Qwen3-VL's view of the condition image when smaller (see `VisionCacheExtractor`).
    """

    def __init__(self, edit_model: str | Path = DEFAULT_EDIT_MODEL, qwen3_model: str | Path = DEFAULT_QWEN3_MODEL,
                 bridge: VisionCacheBridge | str | Path | None = None, device: str = "auto", dtype: str = "auto",
                 condition_area: int = DEFAULT_CONDITION_AREA,
                 plus_condition_area: int = DEFAULT_PLUS_CONDITION_AREA,
                 one_model_at_a_time: bool = False, load_in_8bit: bool = False,
                 lora: str | list[str] | None = None, scheduler: str = "auto", compile: bool = False,
                 compile_options: dict | None = None, attention_backend: str | None = None,
                 dit_offload: bool = False, step_cache: float = 0.0, batch_cfg: bool = False, fp8: str = "off",
                 qwen3_area: int | None = None):
        self.options = LoadOptions(device=device, dtype=dtype)
        self.step_cache = step_cache
        conflict = conflicting_options(fp8, dit_offload, batch_cfg, step_cache)
        if conflict:
            raise ValueError(f"{option(conflict[0])} with {option(conflict[1])}: not supported together ({conflict[2]})")
        self.batch_cfg, self.fp8 = batch_cfg, fp8
        self.loras = parse_loras(lora)
        self.scheduler = resolve_scheduler(scheduler, self.loras)
        self.compile, self.compile_options = compile, compile_options
        if attention_backend is not None and attention_backend not in attention_backends():
            raise ValueError(f"attention_backend must be one of {attention_backends()}; got {attention_backend!r}")
        self.attention_backend = attention_backend
        self.dit_offload = dit_offload
        self.extractor = VisionCacheExtractor(qwen3_model, edit_model, device=device, dtype=dtype,
                                              load_in_8bit=load_in_8bit, condition_area=condition_area,
                                              plus_condition_area=plus_condition_area, qwen3_area=qwen3_area)
        self.edit_name = str(edit_model)
        self.condition_area = condition_area
        self.plus_condition_area = plus_condition_area
        self.one_model_at_a_time = one_model_at_a_time
        self._bridge_source = bridge
        self._bridge: VisionCacheBridge | None = bridge if isinstance(bridge, VisionCacheBridge) else None
        self._pipe = LazyModel(self._load_pipeline, f"edit pipeline {self.edit_name}")
        self.dit_calls = 0  # pipeline calls run; lets callers prove that finished work was skipped

    def _load_pipeline(self):
        resolved = resolve_model(self.edit_name)
        device = self.options.torch_device()
        # With DiT offload the pipeline is assembled in host RAM (in the target dtype) and only the small parts move.
        options = (LoadOptions(device="cpu", dtype=str(self.options.torch_dtype()).removeprefix("torch."))
                   if self.dit_offload else self.options)
        # The text encoder stays with the extractor: the pipeline only ever receives embeddings.
        pipe = load_edit_pipeline(resolved, options, text_encoder=None)
        load_loras(pipe, self.loras)
        enable_fp8(pipe.transformer, self.fp8)  # after the LoRAs are fused into the bf16 weights
        if self.scheduler == "lightning":
            use_lightning_scheduler(pipe)
        if self.attention_backend is not None:
            set_attention_backend(pipe.transformer, self.attention_backend)
        if self.dit_offload:
            pipe.vae.to(device)
            enable_dit_offload(pipe.transformer, device)
        if self.step_cache:
            enable_step_cache(pipe.transformer, self.step_cache)
        if self.batch_cfg:
            enable_batched_cfg(pipe.transformer)
        if self.compile:
            # batched CFG changes the batch (1 on the first step, 2 later) and the mask between calls: compiled for
            # dynamic shapes from the start, not recompiled per shape until torch's recompile limit stops the job
            compile_transformer(pipe.transformer, ({"dynamic": True} if self.batch_cfg else {}) | (self.compile_options or {}))
        return pipe

    @property
    def default_steps(self) -> int:
        """Steps when none are given: 50, or a distilled (Lightning) LoRA's 4 or 8."""
        return default_steps(self.loras, self.scheduler)

    @property
    def pipe(self):
        return self._pipe.get()

    @functools.cached_property
    def plus(self) -> bool:
        """Edit-Plus (several images per sample), read once from the pipeline's `model_index.json`."""
        return pipeline_class_name(resolve_model(self.edit_name, allow_patterns=["model_index.json"])) == (
            "QwenImageEditPlusPipeline")

    def bridge_for(self, qwen3, qwen25) -> VisionCacheBridge:
        """The bridge, built untrained from the caches' dims or loaded and checked against them."""
        if self._bridge is None:
            expected = BridgeConfig.from_caches(qwen3, qwen25)
            if self._bridge_source is None:
                logger.warning("no bridge checkpoint given: no bridge, so output equals the baseline")
                self._bridge = identity_bridge(expected)
            else:
                self._bridge = VisionCacheBridge.from_pretrained(self._bridge_source, expect=expected)
            self._bridge = self._bridge.to(self.options.torch_device()).eval()
        return self._bridge

    def set_condition_area(self, area: int) -> None:
        """Condition-image area for the VLMs and the VAE (the pipelines' default is 1024*1024)."""
        if area < 32 * 32:
            raise ValueError(f"condition_area must be at least 32*32 pixels; got {area}")
        self.condition_area = self.extractor.condition_area = area
        if self.extractor._qwen25.loaded:
            self.extractor.qwen25_encoder.condition_area = area

    def unload(self) -> None:
        self.extractor.unload()
        self._pipe.unload()

    def unload_pipeline(self) -> None:
        """Frees the DiT and VAE; the next edit loads them again."""
        self._pipe.unload()

    @property
    def counts(self) -> dict[str, int]:
        """Model forwards and loads so far (its extractor's included)."""
        return {**self.extractor.counts, "dit_calls": self.dit_calls, "pipeline_loads": self._pipe.load_count}

    # -- embeddings --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, samples: list[list[Image.Image]], prompts: list[str], use_qwen3_vision: bool,
               return_attention_weights: bool = False):
        """(prompt_embeds [B, L, D], mask [B, L], attention maps or None) for B samples."""
        if use_qwen3_vision:
            caches = self.extractor.extract(samples, prompts, one_model_at_a_time=self.one_model_at_a_time)
            output = self.bridge_for(caches[0].qwen3, caches[0].qwen25)(
                [c.qwen3 for c in caches], [c.qwen25 for c in caches], return_attention_weights=return_attention_weights)
            embeds, mask, maps = output.prompt_embeds, output.prompt_embeds_mask, output.attention_weights
        else:
            resized = [self.extractor.prepare_images(s) for s in samples]
            encoding = self.extractor.qwen25_encoder.encode(prompts, resized, resized=True)
            embeds, mask, maps = encoding.prompt_embeds, encoding.prompt_embeds_mask, None
        if not torch.isfinite(embeds).all():
            raise ValueError("prompt embeddings contain NaN or Inf; refusing to run the DiT on them")
        return embeds, mask, maps

    # -- generation --------------------------------------------------------------------------------------

    def _group_by_size(self, samples: list[list[Image.Image]]) -> list[list[int]]:
        groups: dict[Any, list[int]] = {}
        for index, images in enumerate(samples):
            key = tuple(condition_size(image, self.condition_area) for image in images)
            groups.setdefault(key if not self.plus else index, []).append(index)
        return list(groups.values())

    def generate(self, image, prompt: str | list[str], use_qwen3_vision: bool = True, seed: int | list[int] = 0,
                 num_inference_steps: int | None = None, true_cfg_scale: float = 4.0, negative_prompt: str | None = None,
                 output_type: str = "pil", return_attention_weights: bool = False, condition_area: int | None = None):
        """Edits one sample (`image`: an image or, for Edit-Plus, a list) or a batch (`prompt` a list).

        Samples whose condition images have the same size share one DiT forward; each keeps its own seed.
        `condition_area` overrides the editor's for this call. Returns an image (or a list), plus
        attention maps when `return_attention_weights`.
        """
        with self._condition_area(condition_area):
            return self._generate(image, prompt, use_qwen3_vision, seed, num_inference_steps, true_cfg_scale,
                                  negative_prompt, output_type, return_attention_weights)

    @contextlib.contextmanager
    def _condition_area(self, area: int | None):
        """This editor's condition area set to `area` for one call (None: unchanged)."""
        previous = self.condition_area
        if area is not None and area != previous:
            self.set_condition_area(area)
        try:
            yield
        finally:
            if self.condition_area != previous:
                self.set_condition_area(previous)

    def _generate(self, image, prompt, use_qwen3_vision, seed, num_inference_steps, true_cfg_scale, negative_prompt,
                  output_type, return_attention_weights):
        batched = isinstance(prompt, (list, tuple))
        prompts = list(prompt) if batched else [prompt]
        raw = list(image) if batched else [image]
        samples = [[load_image(i) for i in (s if isinstance(s, (list, tuple)) else [s])] for s in raw]
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(len(prompts))]
        if len(samples) != len(prompts) or len(seeds) != len(prompts):
            raise ValueError(f"got {len(samples)} images, {len(prompts)} prompts and {len(seeds)} seeds")
        if not self.plus and any(len(s) != 1 for s in samples):
            raise ValueError("the single-image Qwen-Image-Edit pipeline takes one image per sample; "
                             "use an Edit-Plus model (Qwen/Qwen-Image-Edit-2509) for several")

        cfg = true_cfg_scale > 1 and negative_prompt is not None
        if cfg and self.scheduler == "lightning":
            logger.warning("true CFG with a Lightning (CFG-distilled) LoRA: these are made for true_cfg_scale 1")
        embeds, mask, maps = self.encode(samples, prompts, use_qwen3_vision, return_attention_weights)
        if cfg:  # the negative branch is never bridged (see `bridge.negative_prompt_embeds`)
            neg_embeds, neg_mask, _ = self.encode(samples, [negative_prompt] * len(prompts), use_qwen3_vision=False)
        if self.one_model_at_a_time:
            self.extractor.unload()

        negative = (neg_embeds, neg_mask) if cfg else None
        outputs = self.denoise(samples, embeds, mask, seeds, num_inference_steps, true_cfg_scale, negative, output_type)
        if self.one_model_at_a_time:
            self._pipe.unload()
        result = outputs if batched else outputs[0]
        return (result, maps) if return_attention_weights else result

    def denoise(self, samples: list[list[Image.Image]], embeds: torch.Tensor, mask: torch.Tensor, seeds: list[int],
                num_inference_steps: int | None = None, true_cfg_scale: float = 4.0,
                negative: tuple[torch.Tensor, torch.Tensor] | None = None, output_type: str = "pil") -> list[Any]:
        """Runs the DiT on given embeddings (`[B, L, D]`, mask `[B, L]`), one forward per condition size."""
        num_inference_steps = num_inference_steps or self.default_steps
        if num_inference_steps < 2 and self.pipe.scheduler.config.get("shift_terminal"):
            raise ValueError(f"num_inference_steps must be >= 2 with this scheduler (its terminal shift divides by "
                             f"zero at one step and every pixel is NaN); got {num_inference_steps}")
        outputs: list[Any] = [None] * len(samples)
        device = self.options.torch_device()
        for group in self._group_by_size(samples):
            length = int(mask[group].sum(-1).max())
            kwargs = dict(prompt_embeds=embeds[group, :length].to(device), prompt_embeds_mask=mask[group, :length].to(device))
            if negative is not None:
                neg_embeds, neg_mask = negative
                neg_length = int(neg_mask[group].sum(-1).max())
                kwargs.update(negative_prompt_embeds=neg_embeds[group, :neg_length].to(device),
                              negative_prompt_embeds_mask=neg_mask[group, :neg_length].to(device))
            images = samples[group[0]] if self.plus else [samples[i][0] for i in group]
            generators = [torch.Generator(device).manual_seed(seeds[i]) for i in group]
            result = self.call_pipeline(images=images if len(images) > 1 or self.plus else images[0],
                                        true_cfg_scale=true_cfg_scale if negative is not None else 1.0,
                                        num_inference_steps=num_inference_steps,
                                        generator=generators if len(generators) > 1 else generators[0],
                                        output_type=output_type, **kwargs).images
            self.dit_calls += 1
            for slot, index in enumerate(group):
                outputs[index] = result[slot]
        return outputs

    def call_pipeline(self, images, **kwargs):
        """The diffusers pipeline's own call on given embeddings, its condition images sized to this editor's areas."""
        try:
            return call_with_areas(self.pipe, self.condition_area, self.plus_condition_area, image=images, **kwargs)
        except BaseException:
            # the pipeline resets its DiT's stateful hooks (step cache, batched CFG) only when it ends normally: a
            # failed edit (out of memory, an interrupt) must not leave the next one a stale cache or negative
            if self._pipe.loaded:  # (not when loading was what failed: that would load it again)
                self.pipe.transformer._reset_stateful_cache()
            raise

    def benchmark(self, test_images: list, test_prompts: list[str], output_dir: str | Path,
                  num_inference_steps: int = 50, seed: int = 0, use_qwen3_vision: bool = True) -> list[dict]:
        """Per-sample latency by stage and peak memory; writes outputs, summary.parquet/json; prints a table."""
        from bridgecore.model.edit_benchmark import benchmark_edits

        return benchmark_edits(self, test_images, test_prompts, output_dir, num_inference_steps, seed, use_qwen3_vision)

    def compare(self, image, prompt: str, seed: int = 0, num_inference_steps: int | None = None,
                save_comparison: str | Path | None = None, **kwargs):
        """(baseline, enhanced, attention maps); `save_comparison=PATH` writes the labelled PNG grid."""
        return compare_edits(self, image, prompt, seed, num_inference_steps, save_comparison, **kwargs)


# -- comparison ------------------------------------------------------------------------------------------


def attention_overlay(image: Image.Image, qwen3_maps: dict[str, torch.Tensor], vision_positions: torch.Tensor,
                      grid_thw: torch.Tensor) -> Image.Image:
    """Where the bridge looked: its attention onto Qwen3's image tokens (the appended tokens' when it has a token
    path, else the correction's cross-attention), averaged, drawn over the image."""
    import numpy as np

    if "tokens" not in qwen3_maps and "cross_attention" not in qwen3_maps:
        return image.convert("RGB")  # no bridge: it looked nowhere
    looked = qwen3_maps["tokens"] if "tokens" in qwen3_maps else qwen3_maps["cross_attention"]  # [K or L25, L3]
    attention = looked.float().mean(0)[vision_positions]  # [N3]
    _, h, w = (int(v) for v in grid_thw[0])
    heat = attention[: (h // 2) * (w // 2)].reshape(h // 2, w // 2).cpu().numpy()
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
    heat_image = Image.fromarray((heat * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    red = Image.merge("RGB", (heat_image, Image.new("L", image.size, 0), Image.new("L", image.size, 0)))
    return Image.blend(image.convert("RGB"), red, 0.5)


def comparison_grid(panels: list[tuple[str, Image.Image]], height: int = 256) -> Image.Image:
    """One labelled row of panels, each scaled to `height`."""
    from PIL import ImageDraw

    scaled = [(label, image.resize((max(1, round(image.width * height / image.height)), height))) for label, image in panels]
    label_height = 20
    grid = Image.new("RGB", (sum(i.width for _, i in scaled), height + label_height), (255, 255, 255))
    draw, x = ImageDraw.Draw(grid), 0
    for label, image in scaled:
        grid.paste(image, (x, label_height))
        draw.text((x + 4, 4), label, fill=(0, 0, 0))
        x += image.width
    return grid


def compare_edits(editor: EnhancedQwenImageEdit, image, prompt: str, seed: int = 0, num_inference_steps: int | None = None,
            save_comparison: str | Path | None = None, **kwargs):
    """(baseline, enhanced, attention maps) for one sample; `save_comparison` writes
    input | baseline | enhanced | attention overlay as one labelled PNG."""
    source = load_image(image if not isinstance(image, (list, tuple)) else image[0])
    baseline = editor.generate(image, prompt, use_qwen3_vision=False, seed=seed,
                               num_inference_steps=num_inference_steps, **kwargs)
    enhanced, maps = editor.generate(image, prompt, use_qwen3_vision=True, seed=seed,
                                     num_inference_steps=num_inference_steps, return_attention_weights=True, **kwargs)
    if save_comparison is not None:
        cache = editor.extractor.extract_qwen3_vision(source, prompt)
        overlay = attention_overlay(editor.extractor.prepare_images([source])[0], maps[0], cache.vision_positions,
                                    cache.grid_thw)
        Path(save_comparison).parent.mkdir(parents=True, exist_ok=True)  # as the edit's own --out does
        comparison_grid([("input", source), ("baseline", baseline), ("enhanced", enhanced),
                         ("bridge attention", overlay)]).save(save_comparison)
    return baseline, enhanced, maps

