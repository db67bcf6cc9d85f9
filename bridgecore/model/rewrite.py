"""The training-free control arm: Qwen3-VL rewrites the instruction, Qwen-Image-Edit's own encoder reads the text.

    texts = rewrite_instructions(model, processor, ["Make the square red"], [[image]])   # greedy, capped

Before a trained connector is trusted, the question is whether it beats letting the better VLM *describe*
what it sees in words (Qwen ships prompt rewriters for its image models for this reason). Qwen3-VL sees the
same resized pixels the bridge reads, gets `SYSTEM_PROMPT` and the user's instruction, and answers with one
rewritten instruction, decoded greedily up to a token cap. The text then goes through Qwen2.5-VL like any
instruction (stage `rewrites`, see batch/stages/rewrite.py).

`identity` forces the rewrite to be the original instruction: the control that proves the plumbing (its
edits equal the Edit arm's own).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # settings import this module for its names: torch loads only when a rewrite runs
    from PIL import Image

REWRITERS = ("none", "qwen3", "identity")
DEFAULT_MAX_TOKENS = 256

SYSTEM_PROMPT = """You rewrite image-editing instructions for an image-editing model that cannot see as well as you.
You are given the image(s) to edit and the user's instruction. Write one rewritten instruction that:
- keeps the user's intent exactly: do not add, drop or change any requested change;
- names what the edit needs from the image: the objects it acts on with their colour, size and position
  (left, right, top, bottom, centre), and what must stay as it is;
- for text edits, quotes the exact text to replace and the new text in double quotes, keeps their language
  and letter case, and says where the text is;
- with several images, says which image each object comes from (Picture 1, Picture 2, ...).
Keep it to one or two sentences. Answer with the rewritten instruction only: no preamble, no explanation."""

_THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_PREAMBLE = re.compile(r"^(rewritten( instruction)?|instruction|answer)\s*:\s*", re.IGNORECASE)


def clean_rewrite(text: str) -> str:
    """The instruction in a generated answer: a thinking block, a JSON wrapper ({"Rewritten": ...}, as Qwen's own
    rewriter answers), a 'Rewritten:' preamble and surrounding quotes removed; '' when nothing is left."""
    text = _THINKING.sub("", text).strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
            if isinstance(value, dict) and value:
                text = str(next(iter(value.values()))).strip()
        except ValueError:
            pass
    text = _PREAMBLE.sub("", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def rewrite_messages(instruction: str, image_count: int, system_prompt: str) -> list[dict]:
    """The chat: the system prompt, then the images and the instruction as the user's turn."""
    content = [{"type": "image"}] * image_count + [{"type": "text", "text": f"Instruction: {instruction}"}]
    return [{"role": "system", "content": [{"type": "text", "text": system_prompt}]},
            {"role": "user", "content": content}]


def rewrite_instructions(model, processor, instructions: list[str], sample_images: list[list["Image.Image"]],
                         system_prompt: str = SYSTEM_PROMPT, max_new_tokens: int = DEFAULT_MAX_TOKENS
                         ) -> list[tuple[str, int]]:
    """(cleaned rewrite, generated token count) per sample, B samples in one greedy `generate` (left padding,
    so every answer starts right after its own prompt). Images are already resized as the bridge's Qwen3-VL
    sees them."""
    texts = [processor.apply_chat_template(rewrite_messages(instruction, len(images), system_prompt),
                                           tokenize=False, add_generation_prompt=True)
             for instruction, images in zip(instructions, sample_images)]
    flat = [image for images in sample_images for image in images]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = processor(text=texts, images=flat, padding=True, return_tensors="pt").to(model.device)
    finally:
        tokenizer.padding_side = side
    import torch

    # Greedy whatever the checkpoint's generation_config samples with: the rewrite is part of a fingerprint.
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                temperature=None, top_p=None, top_k=None)
    answers, stops = output[:, inputs["input_ids"].shape[1]:], _stop_ids(model, tokenizer)
    results = []
    for answer in answers:
        ids = answer.tolist()  # after its end-of-turn token an answer is padding
        count = next((i + 1 for i, token in enumerate(ids) if token in stops), len(ids))
        results.append((clean_rewrite(tokenizer.decode(ids[:count], skip_special_tokens=True)), count))
    return results


def rewrite_for(extractor, sample_images: list[list], instructions: list[str], system_prompt: str = SYSTEM_PROMPT,
                max_new_tokens: int = DEFAULT_MAX_TOKENS) -> list[tuple[str, int]]:
    """`rewrite_instructions` with a `VisionCacheExtractor`'s Qwen3-VL, on the images resized exactly as its features
    see them (the bridge's view)."""
    model, processor = extractor.qwen3
    results = rewrite_instructions(model, processor, instructions,
                                   [extractor.prepare_images(images) for images in sample_images], system_prompt,
                                   max_new_tokens)
    extractor.generate_count += 1
    return results


def _stop_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
