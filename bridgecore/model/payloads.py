"""The tensor payloads the stages write besides the vision cache (see cache_format.py), one safetensors blob per
sample each, with their names and shapes in one place. No pickle; provenance as JSON under the header key
`vision_bridge` where a reader needs it.

    negatives  prompt_embeds [L, D]                      the negative prompt's Qwen2.5-VL embeddings (true CFG)
    fused      prompt_embeds [L, D], prompt_embeds_mask [L] (all ones: unpadded),
               negative_prompt_embeds [L', D], negative_prompt_embeds_mask [L'] (with true CFG)
    latents    condition [sum N_i, 4C], target [N, 4C]   packed, normalised VAE latents (training)
    qwen21     qwen21.prompt_embeds [L, D], qwen21.prompt_embeds_mask [L], qwen21.image_pad_mask [L]
    rewritten  qwen25.* as in the cache (prompt_embeds, mask, input_ids, vision_positions, grid_thw), the rewrite
               as the header's prompt
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from bridgecore.model.cache_format import (
    FORMAT_VERSION,
    Qwen25VisionCache,
    qwen25_from,
    qwen25_metadata,
    qwen25_tensors,
    read_metadata,
)

if TYPE_CHECKING:
    import torch

METADATA_KEY = "vision_bridge"


def _save(tensors: dict[str, "torch.Tensor"], meta: dict[str, Any] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={METADATA_KEY: json.dumps(meta, default=str)} if meta is not None else None)


def _load(data: bytes) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load

    return load(data)


def negatives_to_bytes(prompt_embeds: "torch.Tensor") -> bytes:
    return _save({"prompt_embeds": prompt_embeds})


def negatives_from_bytes(data: bytes) -> "torch.Tensor":
    return _load(data)["prompt_embeds"]


def fused_to_bytes(prompt_embeds: "torch.Tensor", meta: dict, negative: "torch.Tensor | None" = None) -> bytes:
    """`prompt_embeds [L, D]` + `prompt_embeds_mask [L]` (all ones: the embeddings are unpadded), and the
    negative pair for true CFG, with the provenance (models, bridge) in the header."""
    import torch

    tensors = {"prompt_embeds": prompt_embeds, "prompt_embeds_mask": torch.ones(prompt_embeds.shape[0], dtype=torch.long)}
    if negative is not None:
        tensors["negative_prompt_embeds"] = negative
        tensors["negative_prompt_embeds_mask"] = torch.ones(negative.shape[0], dtype=torch.long)
    return _save(tensors, meta)


def fused_from_bytes(data: bytes) -> "tuple[torch.Tensor, torch.Tensor | None]":
    """(prompt_embeds [L, D], negative_prompt_embeds [L', D] or None)."""
    tensors = _load(data)
    return tensors["prompt_embeds"], tensors.get("negative_prompt_embeds")


def latents_to_bytes(condition: "torch.Tensor", target: "torch.Tensor") -> bytes:
    return _save({"condition": condition, "target": target})


def latents_from_bytes(data: bytes) -> "tuple[torch.Tensor, torch.Tensor]":
    """(condition [sum N_i, 4C], target [N, 4C])."""
    tensors = _load(data)
    return tensors["condition"], tensors["target"]


def qwen21_to_bytes(conditioning: dict[str, "torch.Tensor"], meta: dict) -> bytes:
    return _save(conditioning, meta)


def qwen21_from_bytes(data: bytes) -> dict[str, "torch.Tensor"]:
    return _load(data)


def rewritten_to_bytes(qwen25: Qwen25VisionCache, rewrite: str) -> bytes:
    """Qwen-Image-Edit's encoding of a rewritten instruction (the `qwen25.*` tensors), the rewrite in the header."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in qwen25_tensors(qwen25).items()}
    meta = {"format_version": FORMAT_VERSION, "prompt": rewrite, "qwen25": qwen25_metadata(qwen25)}
    return _save(tensors, meta)


def rewritten_from_bytes(data: bytes) -> tuple[Qwen25VisionCache, str]:
    """(the rewritten instruction's Qwen25VisionCache, the rewrite)."""
    meta = read_metadata(data)
    if meta.get("format_version") != FORMAT_VERSION or "qwen3" in meta:
        raise ValueError("not a rewritten-instruction encoding (stage `rewrites`)")
    return qwen25_from(_load(data), meta["qwen25"]), meta["prompt"]
