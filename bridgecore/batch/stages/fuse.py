"""Stage `fused`: a sample's caches -> Qwen2.5-compatible prompt embeddings through the bridge.

The bridge (a trained checkpoint, or untrained = exactly the baseline) reads the Qwen3-VL levels and
corrects Qwen-Image-Edit's own embeddings; the edit stage then needs only the DiT. In the rewrite arm the
own embeddings are those of the rewritten instruction (stage `rewrites`); Qwen3-VL's features stay those of
the user's instruction. With true CFG the
negative prompt's embeddings (never bridged) travel in the same entry, so the edit stage gets both
branches from here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from bridgecore.batch.records import SampleResult
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import Stage, StageContext, StageItem

if TYPE_CHECKING:  # the model classes this stage calls through the pool: its code fingerprint follows them
    import torch

    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit


def fused_to_bytes(prompt_embeds: torch.Tensor, meta: dict, negative: torch.Tensor | None = None) -> bytes:
    """`prompt_embeds [L, D]` + `prompt_embeds_mask [L]` (all ones: the embeddings are unpadded), and the
    negative pair for true CFG, as safetensors with the provenance (models, bridge) in the header."""
    import torch
    from safetensors.torch import save as save_tensors

    tensors = {"prompt_embeds": prompt_embeds, "prompt_embeds_mask": torch.ones(prompt_embeds.shape[0], dtype=torch.long)}
    if negative is not None:
        tensors["negative_prompt_embeds"] = negative
        tensors["negative_prompt_embeds_mask"] = torch.ones(negative.shape[0], dtype=torch.long)
    return save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                        metadata={"vision_bridge": json.dumps(meta, default=str)})


def fused_from_bytes(data: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds [L, D], negative_prompt_embeds [L', D] or None)."""
    from safetensors.torch import load as load_tensors

    tensors = load_tensors(data)
    return tensors["prompt_embeds"], tensors.get("negative_prompt_embeds")


class FuseStage(Stage):
    name = "fused"
    upstream = ("caches",)
    optional_upstream = ("negatives", "rewrites")

    def enabled(self, settings: JobSettings) -> bool:
        return not settings.native

    def settings_of(self, settings: JobSettings) -> dict:
        return {"bridge": settings.bridge, "bridge_checksum": settings.bridge_checksum}

    def _fuse(self, data: bytes, ctx: StageContext, item: StageItem) -> "torch.Tensor":
        import torch

        from bridgecore.model.cache_format import cache_from_bytes, rewritten_from_bytes

        cache = cache_from_bytes(data)
        qwen25 = cache.qwen25
        if "rewrites" in item.upstream:
            qwen25, _ = rewritten_from_bytes(item.upstream["rewrites"]["safetensors"])
        editor: EnhancedQwenImageEdit = ctx.models.editor_for(item.sample)
        bridge = editor.bridge_for(cache.qwen3, qwen25)
        with torch.no_grad():
            return bridge(cache.qwen3, qwen25).prompt_embeds[0]  # [L, D]

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        from safetensors.torch import load as load_tensors

        results = []
        for item in items:
            embeds = self._fuse(item.upstream["caches"]["safetensors"], ctx, item)
            negative = None
            if "negatives" in item.upstream:  # the negative branch as Qwen-Image-Edit computes it
                negative = load_tensors(item.upstream["negatives"]["safetensors"])["prompt_embeds"]
            meta = {"id": item.sample.id, "bridge": ctx.settings.bridge, "bridge_checksum": ctx.settings.bridge_checksum,
                    "qwen3_model": ctx.settings.qwen3_model, "edit_model": ctx.settings.edit_model,
                    "rewrite_with": ctx.settings.rewrite_with,
                    "fingerprint": ctx.fingerprints[self.name]}
            results.append(SampleResult.done(item.sample, {"safetensors": fused_to_bytes(embeds, meta, negative)},
                                             tokens=int(embeds.shape[0])))
        return results
