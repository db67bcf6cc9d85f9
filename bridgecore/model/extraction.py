"""Vision cache extraction from both VLMs: Qwen3-VL multi-level features and Qwen-Image-Edit's embeddings.

    extractor = VisionCacheExtractor("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen-Image-Edit")
    cache = extractor.extract(image, "Change the text 'Hello' to 'Goodbye'")   # SampleCache
    print(format_comparison(extractor.compare_caches(cache.qwen3, cache.qwen25)))

Both models see the same resized pixels (the pipeline's condition-image resize), so their token grids
cover the same content: 32 px per Qwen3-VL token, 28 px per Qwen2.5-VL token. Models load lazily, on
first use, and `unload()` frees them. Several samples go through one forward per model.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from bridgecore.model.cache_format import LEVEL_NAMES, Qwen3VisionCache, Qwen25VisionCache, SampleCache
from bridgecore.model.edit_prompt import (
    DEFAULT_CONDITION_AREA,
    DEFAULT_PLUS_CONDITION_AREA,
    EditPromptEncoder,
    EditPromptEncoding,
    prepare_condition_images,
    resize_for_condition,
)
from bridgecore.model.images import load_image
from bridgecore.model.loading import (
    DEFAULT_EDIT_MODEL,
    DEFAULT_QWEN3_MODEL,
    EDIT_ENCODER_FILES,
    LazyModel,
    LoadOptions,
    load_edit_text_encoder,
    load_qwen3_vl,
    model_revision,
    pipeline_class_name,
    resolve_model,
)

logger = logging.getLogger(__name__)

def default_layer_indices(num_layers: int) -> dict[str, int]:
    """Early / mid / late `hidden_states` indices spread over the depth (9, 18, 27 for 36 layers)."""
    return {name: round(num_layers * (i + 1) / 4) for i, name in enumerate(LEVEL_NAMES)}


def image_digest(images: list[Image.Image]) -> str:
    """sha256 over the resized pixels of one sample: equal for both caches of the same sample."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def _as_samples(images, text_prompt) -> tuple[list[list[Any]], list[str], bool]:
    """Normalises (images, prompt) into per-sample image lists; returns whether the input was a batch."""
    if isinstance(text_prompt, str):
        sample = list(images) if isinstance(images, (list, tuple)) else [images]
        return [sample], [text_prompt], False
    prompts = list(text_prompt)
    if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
        raise ValueError(
            f"a batch of {len(prompts)} prompts needs a list of {len(prompts)} images (or image lists); "
            f"got {type(images).__name__} of length {len(images) if isinstance(images, (list, tuple)) else 1}"
        )
    return [list(i) if isinstance(i, (list, tuple)) else [i] for i in images], prompts, True


def _as_references(references, count: int, batched: bool) -> list[list[Any]]:
    """Per-sample reference lists: None -> none; one sample's list; or a list of lists for a batch."""
    if references is None:
        return [[] for _ in range(count)]
    if not batched:
        return [list(references) if isinstance(references, (list, tuple)) else [references]]
    if len(references) != count:
        raise ValueError(f"a batch of {count} samples needs {count} reference lists; got {len(references)}")
    return [list(r) if isinstance(r, (list, tuple)) else [r] for r in references]


@dataclass
class _Qwen3Handle:
    model: Any
    processor: Any
    model_id: str
    revision: str


@dataclass
class _Qwen25Handle:
    encoder: EditPromptEncoder
    model_id: str
    revision: str


class VisionCacheExtractor:
    """Extracts Qwen3-VL multi-level features and Qwen-Image-Edit's Qwen2.5-VL embeddings.

    Args:
        qwen3_model: hub id or local directory of a Qwen3-VL checkpoint.
        edit_model: hub id or local directory of a Qwen-Image-Edit(-Plus) pipeline; its `text_encoder`
            and `processor` are the Qwen2.5-VL side. Edit-Plus is detected from `model_index.json`.
        device, dtype, load_in_8bit, load_in_4bit: placement (see `LoadOptions`).
        condition_area: pixel area of the condition image for the VLMs in Edit mode (default 1024*1024).
        plus_condition_area: per-image VLM area in Edit-Plus mode (default 384*384).
        qwen3_layers: `{"early": i, "mid": j, "late": k}` indices into `hidden_states`; default spread.
        qwen3_area: Qwen3-VL's view of each condition image in pixels when smaller than the DiT's (None: the same
            pixels as Qwen2.5-VL); the bridge resamples its token grid onto Qwen2.5-VL's either way. A smaller view
            makes smaller caches and a cheaper extraction.
    """

    def __init__(
        self,
        qwen3_model: str | Path = DEFAULT_QWEN3_MODEL,
        edit_model: str | Path = DEFAULT_EDIT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        condition_area: int = DEFAULT_CONDITION_AREA,
        plus_condition_area: int = DEFAULT_PLUS_CONDITION_AREA,
        qwen3_layers: dict[str, int] | None = None,
        qwen3_area: int | None = None,
    ):
        if condition_area < 32 * 32 or plus_condition_area < 32 * 32:
            raise ValueError(f"condition areas must be at least 32*32 pixels; got {condition_area}, {plus_condition_area}")
        self.options = LoadOptions(device=device, dtype=dtype, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
        self.qwen3_name = str(qwen3_model)
        self.edit_name = str(edit_model)
        self.condition_area = condition_area
        self.plus_condition_area = plus_condition_area
        if qwen3_area is not None and qwen3_area < 32 * 32:
            raise ValueError(f"qwen3_area must be at least 32*32 pixels; got {qwen3_area}")
        self.qwen3_area = qwen3_area
        self._requested_layers = qwen3_layers
        self._qwen3 = LazyModel(self._load_qwen3, f"Qwen3-VL ({self.qwen3_name})")
        self._qwen25 = LazyModel(self._load_qwen25, f"Qwen2.5-VL of {self.edit_name}")
        self.forward_count = 0  # model forwards run; lets callers prove that cached work was skipped
        self.generate_count = 0  # Qwen3-VL generations run (the rewrite arm, `rewrite.rewrite_for`)

    # -- loading -----------------------------------------------------------------------------------------

    def _load_qwen3(self) -> _Qwen3Handle:
        resolved = resolve_model(self.qwen3_name)
        model, processor = load_qwen3_vl(resolved, self.options)
        processor.tokenizer.padding_side = "right"
        return _Qwen3Handle(model, processor, self.qwen3_name, resolved.revision)

    def _load_qwen25(self) -> _Qwen25Handle:
        resolved = resolve_model(self.edit_name, allow_patterns=EDIT_ENCODER_FILES)
        text_encoder, processor = load_edit_text_encoder(resolved, self.options)
        encoder = EditPromptEncoder(text_encoder, processor, plus=self.plus, condition_area=self.condition_area,
                                    plus_condition_area=self.plus_condition_area)
        return _Qwen25Handle(encoder, self.edit_name, resolved.revision)

    @property
    def qwen25_encoder(self) -> EditPromptEncoder:
        return self._qwen25.get().encoder

    @property
    def qwen3(self) -> tuple[Any, Any]:
        """(model, processor) of Qwen3-VL, loaded on first use."""
        handle = self._qwen3.get()
        return handle.model, handle.processor

    @property
    def qwen3_layers(self) -> dict[str, int]:
        num_layers = self._qwen3.get().model.config.text_config.num_hidden_layers
        layers = self._requested_layers or default_layer_indices(num_layers)
        if set(layers) != set(LEVEL_NAMES) or not all(0 <= i <= num_layers for i in layers.values()):
            raise ValueError(f"qwen3_layers must map {LEVEL_NAMES} to indices in [0, {num_layers}]; got {layers}")
        return dict(layers)

    @functools.cached_property
    def revisions(self) -> dict[str, str]:
        """Revisions of both models, resolved without loading them (so records never depend on load order)."""
        return {"qwen3_revision": model_revision(self.qwen3_name), "qwen25_revision": model_revision(self.edit_name)}

    def unload_qwen3(self) -> None:
        self._qwen3.unload()

    def unload_qwen25(self) -> None:
        self._qwen25.unload()

    @property
    def counts(self) -> dict[str, int]:
        """Forwards, generations and loads so far: lets callers prove that cached work was skipped."""
        return {"vlm_forwards": self.forward_count, "qwen3_rewrites": self.generate_count,
                "qwen3_loads": self._qwen3.load_count, "qwen25_loads": self._qwen25.load_count}

    def unload(self) -> None:
        """Frees both models; the next extraction loads them again."""
        self.unload_qwen3()
        self.unload_qwen25()

    # -- extraction --------------------------------------------------------------------------------------

    @functools.cached_property
    def plus(self) -> bool:
        """Edit-Plus mode, read from the edit model's `model_index.json` (no model loaded)."""
        resolved = resolve_model(self.edit_name, allow_patterns=["model_index.json"])
        return pipeline_class_name(resolved) == "QwenImageEditPlusPipeline"

    def qwen3_view(self, image: Image.Image) -> Image.Image:
        """The condition image as Qwen3-VL sees it: itself, or resized to `qwen3_area` when that is smaller."""
        if self.qwen3_area is None or image.width * image.height <= self.qwen3_area:
            return image
        return resize_for_condition(image, self.qwen3_area)

    @property
    def reference_area(self) -> int:
        """Pixel area of a reference picture for Qwen3-VL: Edit-Plus's per-picture view (384*384), or the condition
        area when that is smaller (the tiny task)."""
        return min(self.condition_area, self.plus_condition_area)

    def prepare_references(self, references: Sequence[Any]) -> list[Image.Image]:
        """Loads one sample's reference pictures (read by Qwen3-VL only) and resizes them to `reference_area`."""
        return [resize_for_condition(load_image(image), self.reference_area) for image in references]

    def prepare_images(self, images: Sequence[Any]) -> list[Image.Image]:
        """Loads one sample's images and resizes them as Qwen-Image-Edit does for its VLM (loads no model, so
        Qwen3-VL-only extraction never brings Qwen2.5-VL into memory)."""
        return prepare_condition_images([load_image(image) for image in images], self.plus, self.condition_area,
                                        self.plus_condition_area)

    @torch.no_grad()
    def _encode_qwen3(self, prompts: list[str], sample_images: list[list[Image.Image]],
                      references: list[list[Image.Image]] | None = None) -> list[Qwen3VisionCache]:
        handle = self._qwen3.get()
        references = references or [[] for _ in sample_images]
        views = [[self.qwen3_view(image) for image in images] for images in sample_images]
        caches = encode_qwen3_features(handle.model, handle.processor, prompts,
                                       [images + refs for images, refs in zip(views, references)],
                                       self.qwen3_layers, handle.model_id, handle.revision,
                                       [len(refs) for refs in references])
        if self.qwen3_area is not None:  # the digest ties the caches to the condition images both models were given
            for cache, images in zip(caches, sample_images):
                cache.image_digest = image_digest(images)
        self.forward_count += 1
        return caches

    @torch.no_grad()
    def _encode_qwen25(self, prompts: list[str], sample_images: list[list[Image.Image]]) -> list[Qwen25VisionCache]:
        handle = self._qwen25.get()
        encoding = handle.encoder.encode(prompts, sample_images, resized=True)
        self.forward_count += 1
        return qwen25_caches(encoding, sample_images, handle.model_id, handle.revision,
                             template="edit_plus" if handle.encoder.plus else "edit")

    def extract_qwen3_vision(self, images, text_prompt: str | list[str] = "Describe this image", references=None):
        """Qwen3-VL features of one sample (`images`: an image or a list of one sample's images) or, when
        `text_prompt` is a list, of a batch (`images[b]` an image or a list). `references`: pictures only Qwen3-VL
        reads after the condition images (a list for one sample, a list of lists for a batch). Returns cache(s)."""
        samples, prompts, batched = _as_samples(images, text_prompt)
        refs = _as_references(references, len(samples), batched)
        caches = self._encode_qwen3(prompts, [self.prepare_images(s) for s in samples],
                                    [self.prepare_references(r) for r in refs])
        return caches if batched else caches[0]

    def extract_qwen25_vision(self, images, text_prompt: str | list[str] = "Describe this image"):
        """Qwen-Image-Edit's prompt embeddings (M-RoPE-correct) for one sample or a batch, as above."""
        samples, prompts, batched = _as_samples(images, text_prompt)
        caches = self._encode_qwen25(prompts, [self.prepare_images(s) for s in samples])
        return caches if batched else caches[0]

    def extract(self, images, text_prompt: str | list[str], one_model_at_a_time: bool = False, references=None):
        """Both caches, as `SampleCache` (or a list for a batch). Images are loaded and resized once.
        `one_model_at_a_time` frees Qwen2.5-VL before Qwen3-VL loads, and Qwen3-VL after (small GPUs).
        `references`: pictures only Qwen3-VL reads (as in `extract_qwen3_vision`); the DiT's conditioning never
        sees them, so only a bridge trained for reference pictures carries them into the edit."""
        samples, prompts, batched = _as_samples(images, text_prompt)
        refs = [self.prepare_references(r) for r in _as_references(references, len(samples), batched)]
        loaded = [[load_image(i) for i in s] for s in samples]
        resized = [prepare_condition_images(s, self.plus, self.condition_area, self.plus_condition_area) for s in loaded]
        qwen25 = self._encode_qwen25(prompts, resized)
        if one_model_at_a_time:
            self.unload_qwen25()
        qwen3 = self._encode_qwen3(prompts, resized, refs)
        if one_model_at_a_time:
            self.unload_qwen3()
        caches = [
            SampleCache(q3, q25, prompt, [image.size for image in imgs])
            for q3, q25, prompt, imgs in zip(qwen3, qwen25, prompts, loaded)
        ]
        return caches if batched else caches[0]

    @staticmethod
    def compare_caches(qwen3_cache: Qwen3VisionCache, qwen25_cache: Qwen25VisionCache) -> dict[str, Any]:
        return compare_caches(qwen3_cache, qwen25_cache)



# -- encoding with given models (the extractor's path; also used by the GPU benchmark) ------------------------


@torch.no_grad()
def encode_qwen3_features(model, processor, prompts: list[str], sample_images: list[list[Image.Image]],
                          layers: dict[str, int], model_id: str = "", revision: str = "",
                          reference_counts: list[int] | None = None) -> list[Qwen3VisionCache]:
    """Qwen3-VL multi-level features of B samples in one forward (images already resized).

    `layers` maps early/mid/late to `hidden_states` indices. DeepStack features are captured from the vision
    tower's output by a hook; the LM head is skipped. `reference_counts[b]`: how many of sample b's images (the
    last ones) are reference pictures, not condition images (recorded in the cache, digested apart).
    """
    reference_counts = reference_counts or [0] * len(sample_images)
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * len(imgs) + [{"type": "text", "text": prompt}]}],
            tokenize=False, add_generation_prompt=True,
        )
        for prompt, imgs in zip(prompts, sample_images)
    ]
    flat = [image for imgs in sample_images for image in imgs]
    inputs = processor(text=texts, images=flat, padding=True, return_tensors="pt").to(model.device)
    captured: dict[str, list[torch.Tensor]] = {}
    hook = model.model.visual.register_forward_hook(
        lambda module, args, output: captured.__setitem__("deepstack", output.deepstack_features)
    )
    try:
        outputs = model.model(**inputs, output_hidden_states=True, use_cache=False)  # skips the LM head
    finally:
        hook.remove()
    deepstack_indices = list(model.config.vision_config.deepstack_visual_indexes)
    merge = processor.image_processor.merge_size
    tokens_per_image = (inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
    image_token_id = model.config.image_token_id
    caches, first_image, first_token = [], 0, 0
    for b, count in enumerate(len(imgs) for imgs in sample_images):
        valid = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b][valid]
        n_tokens = sum(tokens_per_image[first_image:first_image + count])
        caches.append(Qwen3VisionCache(
            levels={name: outputs.hidden_states[i][b][valid] for name, i in layers.items()},  # [L3, D3]
            deepstack={index: feats[first_token:first_token + n_tokens]
                       for index, feats in zip(deepstack_indices, captured["deepstack"])},  # [N3, D3]
            input_ids=ids.cpu(),
            vision_positions=torch.nonzero(ids == image_token_id).flatten().cpu(),
            grid_thw=inputs["image_grid_thw"][first_image:first_image + count].cpu(),
            layer_indices=layers,
            model_id=model_id,
            revision=revision,
            image_digest=image_digest(sample_images[b][:count - reference_counts[b]]),
            reference_images=reference_counts[b],
            reference_digest=image_digest(sample_images[b][count - reference_counts[b]:]) if reference_counts[b] else "",
        ))
        first_image += count
        first_token += n_tokens
    return caches


def qwen25_caches(encoding: EditPromptEncoding, sample_images: list[list[Image.Image]], model_id: str = "",
                  revision: str = "", template: str = "edit") -> list[Qwen25VisionCache]:
    """Splits an `EditPromptEncoder` batch into per-sample caches (padding removed)."""
    return [
        Qwen25VisionCache(
            prompt_embeds=encoding.prompt_embeds[b, : len(encoding.input_ids[b])],
            prompt_embeds_mask=encoding.prompt_embeds_mask[b, : len(encoding.input_ids[b])],
            input_ids=encoding.input_ids[b],
            vision_positions=encoding.vision_positions[b],
            grid_thw=encoding.grid_thw[b],
            model_id=model_id,
            revision=revision,
            template=template,
            drop_idx=encoding.drop_idx,
            image_digest=image_digest(sample_images[b]),
        )
        for b in range(len(encoding.input_ids))
    ]


def _stats(tensor: torch.Tensor) -> dict[str, float]:
    values = tensor.float()
    return {"mean": values.mean().item(), "std": values.std().item(), "rms": values.pow(2).mean().sqrt().item(),
            "absmax": values.abs().max().item()}


def compare_caches(qwen3_cache: Qwen3VisionCache, qwen25_cache: Qwen25VisionCache) -> dict[str, Any]:
    """Token counts, hidden sizes, grid mismatch and per-level statistics of one sample's two caches."""
    grid3 = [(int(t), int(h) // 2, int(w) // 2) for t, h, w in qwen3_cache.grid_thw.tolist()]
    grid25 = [(int(t), int(h) // 2, int(w) // 2) for t, h, w in qwen25_cache.grid_thw.tolist()]
    return {
        "qwen3": {"model_id": qwen3_cache.model_id, "hidden_size": qwen3_cache.hidden_size,
                  "sequence_length": int(qwen3_cache.input_ids.numel()),
                  "vision_tokens": qwen3_cache.num_vision_tokens, "token_grids": grid3,
                  "layer_indices": qwen3_cache.layer_indices,
                  "levels": {name: {"shape": list(t.shape), **_stats(t)} for name, t in qwen3_cache.levels.items()},
                  "deepstack": {str(i): {"shape": list(t.shape), **_stats(t)} for i, t in qwen3_cache.deepstack.items()}},
        "qwen25": {"model_id": qwen25_cache.model_id, "hidden_size": qwen25_cache.hidden_size,
                   "sequence_length": int(qwen25_cache.input_ids.numel()),
                   "vision_tokens": qwen25_cache.num_vision_tokens, "token_grids": grid25,
                   "drop_idx": qwen25_cache.drop_idx,
                   "prompt_embeds": {"shape": list(qwen25_cache.prompt_embeds.shape), **_stats(qwen25_cache.prompt_embeds)}},
        "vision_token_count_match": qwen3_cache.num_vision_tokens == qwen25_cache.num_vision_tokens,
        "grid_match": grid3 == grid25,
        "dimension_mismatch": qwen3_cache.hidden_size != qwen25_cache.hidden_size,
        "dimension_ratio": qwen3_cache.hidden_size / qwen25_cache.hidden_size,
    }


def format_comparison(report: dict[str, Any]) -> str:
    """The seed's `example_extraction` printout, with the true numbers."""
    q3, q25 = report["qwen3"], report["qwen25"]
    lines = [f"Qwen3-VL cache ({q3['model_id']}): hidden {q3['hidden_size']}, sequence {q3['sequence_length']}, "
             f"{q3['vision_tokens']} vision tokens, grids (t, h, w) {q3['token_grids']}"]
    for name, level in q3["levels"].items():
        lines.append(f"  {name:<5} (hidden_states[{q3['layer_indices'][name]}]): {level['shape']}  "
                     f"rms {level['rms']:.4g}  absmax {level['absmax']:.4g}")
    for index, feats in q3["deepstack"].items():
        lines.append(f"  deepstack (vision block {index}): {feats['shape']}  rms {feats['rms']:.4g}")
    lines.append(f"Qwen2.5-VL cache ({q25['model_id']}): hidden {q25['hidden_size']}, sequence {q25['sequence_length']} "
                 f"(after dropping {q25['drop_idx']} system tokens), {q25['vision_tokens']} vision tokens, "
                 f"grids {q25['token_grids']}")
    lines.append(f"  prompt_embeds: {q25['prompt_embeds']['shape']}  rms {q25['prompt_embeds']['rms']:.4g}")
    lines.append("Cache comparison:")
    lines.append(f"  Vision token count match: {report['vision_token_count_match']}")
    lines.append(f"  Token grid match: {report['grid_match']}")
    lines.append(f"  Dimension mismatch: {report['dimension_mismatch']}")
    lines.append(f"  Dimension ratio: {report['dimension_ratio']:.3f}")
    return "\n".join(lines)
