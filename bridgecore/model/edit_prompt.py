"""Qwen-Image-Edit's prompt embeddings, computed the way its DiT was trained on them.

diffusers' `QwenImageEditPipeline._get_qwen_prompt_embeds` builds the chat sequence (system prompt,
image tokens, instruction, assistant header), runs Qwen2.5-VL and drops the system prefix. Under
transformers >= 5.3 it silently loses multimodal RoPE because it does not pass `mm_token_type_ids`
(diffusers issue 14194). `EditPromptEncoder` does the same computation with M-RoPE active, and derives
the number of dropped prefix tokens from the tokenizer (64 for the real one) instead of hard-coding it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

# Copied from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit.QwenImageEditPipeline.__init__
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Copied from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus.QwenImageEditPlusPipeline.__init__
EDIT_PLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
# Copied from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus.QwenImageEditPlusPipeline._get_qwen_prompt_embeds
EDIT_PLUS_IMAGE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"

DEFAULT_CONDITION_AREA = 1024 * 1024  # Edit: the VLM and the VAE both see ~1 MP
DEFAULT_PLUS_CONDITION_AREA = 384 * 384  # Edit-Plus: each image goes to the VLM at ~147k px
_USER_HEADER = "<|im_start|>user\n"


def system_prefix_length(tokenizer, template: str = EDIT_TEMPLATE) -> int:
    """Number of tokens the pipeline drops: everything up to and including the user header."""
    prefix = template[: template.index(_USER_HEADER) + len(_USER_HEADER)]
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])


def pad_prompt_embeds(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads `[L_i, D]` embeddings into `[B, L, D]` with a `[B, L]` long mask, as the edit pipelines do."""
    length = max(e.shape[0] for e in embeds)
    padded = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[0])) for e in embeds])
    mask = torch.stack([torch.nn.functional.pad(torch.ones(e.shape[0], dtype=torch.long, device=e.device),
                                                (0, length - e.shape[0])) for e in embeds])
    return padded, mask


def condition_size(image: Image.Image, area: int) -> tuple[int, int]:
    """(width, height) the pipeline resizes `image` to for a target `area` (multiples of 32)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(area, image.width / image.height)
    if min(width, height) < 32:
        raise ValueError(f"aspect ratio {image.width}x{image.height} is too extreme for a condition area of {area} "
                         f"pixels: the condition image would be {int(width)}x{int(height)}; a side must be at least "
                         "32 px (crop the image or raise the condition area)")
    return int(width), int(height)


def resize_for_condition(image: Image.Image, area: int) -> Image.Image:
    """The pipeline's own resize (diffusers `VaeImageProcessor.resize`, Lanczos) to `area`."""
    from diffusers.image_processor import VaeImageProcessor

    width, height = condition_size(image, area)
    return VaeImageProcessor(vae_scale_factor=16).resize(image, height, width)


def prepare_condition_images(images: list[Image.Image], plus: bool, condition_area: int = DEFAULT_CONDITION_AREA,
                             plus_condition_area: int = DEFAULT_PLUS_CONDITION_AREA) -> list[Image.Image]:
    """Resizes one sample's images as the pipeline does before handing them to the VLM (no model needed)."""
    if not plus and len(images) != 1:
        raise ValueError(
            f"the single-image Qwen-Image-Edit pipeline takes exactly one image per sample; got {len(images)}. "
            "Use an Edit-Plus model (Qwen/Qwen-Image-Edit-2509) for multi-image edits."
        )
    area = plus_condition_area if plus else condition_area
    return [resize_for_condition(image, area) for image in images]


@dataclass
class EditPromptEncoding:
    """Output of `EditPromptEncoder.encode` for a batch of B samples.

    Args:
        prompt_embeds (`torch.Tensor` of shape `[B, L, D]`): what the DiT reads, right-padded with zeros.
        prompt_embeds_mask (`torch.Tensor` of shape `[B, L]`, long): 1 on real tokens.
        input_ids (`list[torch.Tensor]`): per sample, the kept token ids `[L_i]`.
        vision_positions (`list[torch.Tensor]`): per sample, indices of image tokens in `prompt_embeds`.
        grid_thw (`list[torch.Tensor]`): per sample, `[n_images, 3]` patch grids (before merging).
        drop_idx (`int`): system-prefix tokens dropped from every sequence.
    """

    prompt_embeds: torch.Tensor
    prompt_embeds_mask: torch.Tensor
    input_ids: list[torch.Tensor]
    vision_positions: list[torch.Tensor]
    grid_thw: list[torch.Tensor]
    drop_idx: int


class EditPromptEncoder:
    """Encodes (images, instruction) pairs with Qwen-Image-Edit's Qwen2.5-VL, M-RoPE included.

    Args:
        text_encoder: the pipeline's `Qwen2_5_VLForConditionalGeneration`.
        processor: the pipeline's `Qwen2VLProcessor`.
        plus (`bool`): Edit-Plus (2509) template, several images per sample, "Picture i:" prefixes.
        condition_area (`int`): pixel area images are resized to for the VLM in Edit mode.
        plus_condition_area (`int`): the same for Edit-Plus (each image).
    """

    def __init__(self, text_encoder, processor, plus: bool = False,
                 condition_area: int = DEFAULT_CONDITION_AREA, plus_condition_area: int = DEFAULT_PLUS_CONDITION_AREA):
        self.text_encoder = text_encoder
        self.processor = processor
        self.processor.tokenizer.padding_side = "right"
        self.plus = plus
        self.template = EDIT_PLUS_TEMPLATE if plus else EDIT_TEMPLATE
        self.condition_area = condition_area
        self.plus_condition_area = plus_condition_area
        self.drop_idx = system_prefix_length(processor.tokenizer, self.template)
        self.image_token_id = processor.image_token_id

    def prepare_images(self, images: list[Image.Image]) -> list[Image.Image]:
        """Resizes one sample's images as the pipeline does before handing them to the VLM."""
        return prepare_condition_images(images, self.plus, self.condition_area, self.plus_condition_area)

    def format_prompt(self, instruction: str, num_images: int) -> str:
        if not self.plus:
            return self.template.format(instruction)
        pictures = "".join(EDIT_PLUS_IMAGE_TEMPLATE.format(i + 1) for i in range(num_images))
        return self.template.format(pictures + instruction)

    @torch.no_grad()
    def encode(self, instructions: list[str], images: list[list[Image.Image]], resized: bool = False) -> EditPromptEncoding:
        """Encodes B samples in one forward. `images[b]` lists sample b's images (already resized if `resized`)."""
        if len(instructions) != len(images):
            raise ValueError(f"got {len(instructions)} instructions for {len(images)} image lists")
        sample_images = [imgs if resized else self.prepare_images(imgs) for imgs in images]
        texts = [self.format_prompt(text, len(imgs)) for text, imgs in zip(instructions, sample_images)]
        flat_images = [image for imgs in sample_images for image in imgs]
        device = self.text_encoder.device
        inputs = self.processor(text=texts, images=flat_images or None, padding=True, return_tensors="pt").to(device)
        # [B, T, D]; `mm_token_type_ids` is what switches on multimodal RoPE under transformers >= 5.3.
        hidden = self.text_encoder.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            mm_token_type_ids=inputs["mm_token_type_ids"],
            output_hidden_states=True,
            use_cache=False,  # one forward, no generation: a KV cache would only cost memory
        ).hidden_states[-1]
        return self._split(hidden, inputs, [len(imgs) for imgs in sample_images])

    def _split(self, hidden: torch.Tensor, inputs, images_per_sample: list[int]) -> EditPromptEncoding:
        mask = inputs["attention_mask"].bool()
        grids = inputs.get("image_grid_thw")
        embeds, ids, positions, grid_list = [], [], [], []
        first_image = 0
        for b, count in enumerate(images_per_sample):
            kept_ids = inputs["input_ids"][b][mask[b]][self.drop_idx:]
            embeds.append(hidden[b][mask[b]][self.drop_idx:])  # [L_b, D]
            ids.append(kept_ids.cpu())
            positions.append(torch.nonzero(kept_ids == self.image_token_id).flatten().cpu())
            grid = grids[first_image:first_image + count] if grids is not None else torch.zeros(0, 3, dtype=torch.long)
            grid_list.append(grid.cpu())
            first_image += count
        prompt_embeds, prompt_mask = pad_prompt_embeds(embeds)
        return EditPromptEncoding(prompt_embeds, prompt_mask, ids, positions, grid_list, self.drop_idx)
