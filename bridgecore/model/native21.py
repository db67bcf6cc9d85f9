"""Qwen-Image-2.1, the native arm: a DiT that reads Qwen3-VL directly (diffusers `QwenImage21Pipeline`).

The bridge's question is whether Qwen3-VL's understanding, carried into Qwen-Image-Edit by a small
trained bridge, is worth it; Qwen-Image-2.1 is the native answer to the same question, so it runs
through the same batch system as a third arm, on the same samples.

Conditioning is computed by the pipeline's own `_get_qwen_prompt_embeds` (its system prompt and raw
template, left padding, drop count from the tokenized system message, the last hidden state before
the final norm, the image-pad mask) on a pipeline that holds only the text encoder and processor, and
cached. The edit feeds the cache back through the same method, so the DiT side never loads the 8B
encoder and the pictures equal the pipeline's own call.

One Qwen3-VL forward cannot serve both the bridge and 2.1: 2.1 reads its own fine-tuned text encoder
(the pipeline's `text_encoder/`, not Qwen3-VL-8B-Instruct), with its own system prompt and template;
under causal attention every token after the first differing one changes. The native arm therefore
costs one more VLM forward per sample than the bridge arm (see README, "Three arms").
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import torch
from PIL import Image

from bridgecore.model.loading import LazyModel, LoadOptions, resolve_model

logger = logging.getLogger(__name__)

CACHE_KEYS = ("qwen21.prompt_embeds", "qwen21.prompt_embeds_mask", "qwen21.image_pad_mask")
MAX_CONDITION_IMAGES = 10  # the pipeline's template numbers <image1>..<image10>


def output_resolution(condition_area: int) -> int:
    """2.1 sizes condition images and the output by a side length (area = side²); ours is an area."""
    return max(32, int(round(math.sqrt(condition_area))))


def condition_images(images: list[Image.Image], resolution: int) -> list[Image.Image]:
    """The condition images exactly as `QwenImage21Pipeline.__call__` hands them to its text encoder: RGBA,
    resized to the pipeline's `calculate_dimensions(resolution², aspect)` (multiples of 32). Our images come
    from `load_image` (transparency composited over white, for every arm alike), so their alpha is opaque: a
    transparent PNG is not seen by 2.1's 4-channel VAE as the pipeline's own call on that file would."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions

    processor = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=64)
    prepared = []
    for image in images:
        image = image.convert("RGBA") if image.mode != "RGBA" else image
        width, height, _ = calculate_dimensions(resolution * resolution, image.width / image.height)
        if width < 32 or height < 32:
            raise ValueError(f"image of {image.width}x{image.height} is too thin for Qwen-Image-2.1 at "
                             f"{resolution}px (it would become {width}x{height}); the aspect ratio is too extreme")
        prepared.append(processor.resize(image, width=width, height=height))
    return prepared


def processor_min_pixels(image_processor_config: dict) -> int | None:
    """The smallest image (pixels) the Qwen3-VL image processor keeps as it is; below, it upscales."""
    size = image_processor_config.get("size") or {}
    value = size.get("shortest_edge", image_processor_config.get("min_pixels"))
    return int(value) if value else None


def min_condition_area(model: str) -> int | None:
    """The processor's floor of a Qwen-Image-2.1 pipeline, from its config files only (None if not stated).

    2.1 fills one encoder image slot per 2x2 latent tokens, so the encoder must see each condition image at the
    size the VAE sees it; a smaller image is upscaled by the processor and the two no longer line up."""
    import json

    path = resolve_model(model, allow_patterns=["processor/*.json"]).path / "processor"
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        if (path / name).exists():
            config = json.loads((path / name).read_text())
            return processor_min_pixels(config.get(key, {}) if key else config)
    return None


class NativeQwenImage21:
    """Qwen-Image-2.1 split in two halves that load separately: `encode` (text encoder + processor) and
    `edit` (DiT + VAE, fed cached conditioning). `model` is a hub id or a local pipeline directory."""

    def __init__(self, model: str, device: str = "auto", condition_area: int = 1024 * 1024,
                 load_in_8bit: bool = False):
        self.model = str(model)
        self.options = LoadOptions(device=device, load_in_8bit=load_in_8bit)
        self.resolution = output_resolution(condition_area)
        self._encoder = LazyModel(self._load_encoder, f"Qwen-Image-2.1 text encoder ({model})")
        self._pipe = LazyModel(self._load_pipeline, f"Qwen-Image-2.1 DiT and VAE ({model})")
        self._override = threading.Lock()
        self.encode_count = 0
        self.edit_count = 0

    # -- loading --------------------------------------------------------------------------------------------

    def _load_encoder(self):
        from diffusers import QwenImage21Pipeline
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        path = resolve_model(self.model).path
        text_encoder = Qwen3VLForConditionalGeneration.from_pretrained(
            path, subfolder="text_encoder", **self.options.from_pretrained_kwargs())
        if not (self.options.load_in_8bit or self.options.load_in_4bit):
            text_encoder = text_encoder.to(self.options.torch_device())
        processor = AutoProcessor.from_pretrained(path, subfolder="processor", trust_remote_code=False)
        # The pipeline class itself, without DiT and VAE: its encoding method is the ground truth.
        return QwenImage21Pipeline(scheduler=None, vae=None, text_encoder=text_encoder.eval(), processor=processor,
                                   transformer=None)

    def _load_pipeline(self):
        from diffusers import QwenImage21Pipeline

        pipe = QwenImage21Pipeline.from_pretrained(resolve_model(self.model).path, text_encoder=None,
                                                   dtype=self.options.torch_dtype(), trust_remote_code=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.options.torch_device())

    def unload_encoder(self) -> None:
        self._encoder.unload()

    def unload_pipeline(self) -> None:
        self._pipe.unload()

    @property
    def counts(self) -> dict[str, int]:
        """Encodes, edits and loads so far."""
        return {"qwen21_encodes": self.encode_count, "qwen21_edits": self.edit_count,
                "qwen21_encoder_loads": self._encoder.load_count, "qwen21_pipeline_loads": self._pipe.load_count}

    # -- conditioning ---------------------------------------------------------------------------------------

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of an instruction under 2.1's tokenizer (the guard against runaway prompts)."""
        tokenizer = self._encoder.get().processor.tokenizer
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def encode(self, images: list[Image.Image], prompt: str) -> dict[str, torch.Tensor]:
        """One sample's conditioning, as `encode_prompt` computes it: {key: tensor} under `CACHE_KEYS`, on CPU
        (prompt_embeds [L, D], prompt_embeds_mask [L] int64, image_pad_mask [L] bool)."""
        if not 1 <= len(images) <= MAX_CONDITION_IMAGES:
            raise ValueError(f"Qwen-Image-2.1 takes 1 to {MAX_CONDITION_IMAGES} condition images; got {len(images)}")
        encoder = self._encoder.get()
        prepared = condition_images(images, self.resolution)
        floor = processor_min_pixels(encoder.processor.image_processor.to_dict())
        for image in prepared:
            if floor and image.width * image.height < floor:
                raise ValueError(f"a condition image of {image.width}x{image.height} is below Qwen-Image-2.1's "
                                 f"processor floor of {floor} pixels (it would be upscaled for the encoder only): "
                                 "raise --condition-area")
        with torch.no_grad():
            embeds, mask, image_pad = encoder._get_qwen_prompt_embeds([prompt], prepared, self.options.torch_device())
        self.encode_count += 1
        return {"qwen21.prompt_embeds": embeds[0].detach().cpu().contiguous(),
                "qwen21.prompt_embeds_mask": mask[0].detach().cpu().to(torch.int64).contiguous(),
                "qwen21.image_pad_mask": image_pad[0].detach().cpu().to(torch.bool).contiguous()}

    # -- edits ----------------------------------------------------------------------------------------------

    def edit(self, images: list[Image.Image], conditioning: dict[str, torch.Tensor], seed: int, steps: int,
             output_type: str = "pil") -> Any:
        """The edit of one sample from its cached conditioning: the pipeline's own `__call__` (resizing, VAE
        encoding of the condition images, sigmas, prefix KV cache, decoding), with its prompt encoding
        answered from the cache instead of the text encoder."""
        slots = sum((image.width // 32) * (image.height // 32) for image in condition_images(images, self.resolution))
        if int(conditioning["qwen21.image_pad_mask"].sum()) != slots:
            raise ValueError(f"the cached Qwen-Image-2.1 conditioning holds {int(conditioning['qwen21.image_pad_mask'].sum())}"
                             f" image slots, but these images need {slots}: it was made for a different set of images")
        pipe = self._pipe.get()
        device = self.options.torch_device()
        cached = (conditioning["qwen21.prompt_embeds"][None].to(device, pipe.transformer.dtype),
                  conditioning["qwen21.prompt_embeds_mask"][None].to(device),
                  conditioning["qwen21.image_pad_mask"][None].to(device))

        def from_cache(prompt, image=None, device=None):
            return cached

        with self._override:  # the instance attribute shadows the method for this call only
            pipe._get_qwen_prompt_embeds = from_cache
            try:
                result = pipe(prompt=" ", image=list(images), num_inference_steps=steps,
                              output_resolution=self.resolution, output_type=output_type,
                              generator=torch.Generator(device="cpu").manual_seed(seed))
            finally:
                del pipe._get_qwen_prompt_embeds
        self.edit_count += 1
        return result.images[0]

    def generate(self, images: list[Image.Image], prompt: str, seed: int = 0, steps: int = 40,
                 output_type: str = "pil") -> Any:
        """Encode then edit (one sample): the interactive path of the native arm."""
        return self.edit(images, self.encode(images, prompt), seed, steps, output_type)
