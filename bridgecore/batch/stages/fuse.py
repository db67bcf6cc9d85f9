"""Stage `fused`: a sample's caches -> Qwen2.5-compatible prompt embeddings through the bridge.

The bridge (a trained checkpoint, or untrained = exactly the baseline) reads the Qwen3-VL levels and
corrects Qwen-Image-Edit's own embeddings; the edit stage then needs only the DiT. In the rewrite arm the
own embeddings are those of the rewritten instruction (stage `rewrites`); Qwen3-VL's features stay those of
the user's instruction. With true CFG the
negative prompt's embeddings (never bridged) travel in the same entry, so the edit stage gets both
branches from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridgecore.batch.records import SampleResult
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import Stage, StageContext, StageItem
from bridgecore.batch.stages.outputs import CACHES, FUSED, NEGATIVES, REWRITES
from bridgecore.model.payloads import fused_to_bytes

if TYPE_CHECKING:  # the model classes this stage calls through the pool: its code fingerprint follows them
    import torch

    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit


class FuseStage(Stage):
    name = FUSED.stage
    upstream = (CACHES.stage,)
    optional_upstream = (NEGATIVES.stage, REWRITES.stage)

    def enabled(self, settings: JobSettings) -> bool:
        return not settings.native

    def settings_of(self, settings: JobSettings) -> dict:
        return {"bridge": settings.bridge, "bridge_checksum": settings.bridge_checksum}

    def _fuse(self, ctx: StageContext, item: StageItem) -> "torch.Tensor":
        import torch

        cache = item.output(CACHES)
        qwen25 = cache.qwen25
        if item.has(REWRITES):
            qwen25, _ = item.output(REWRITES)
        editor: EnhancedQwenImageEdit = ctx.models.editor_for(item.sample)
        bridge = editor.bridge_for(cache.qwen3, qwen25)
        with torch.no_grad():
            return bridge(cache.qwen3, qwen25).prompt_embeds[0]  # [L, D]

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        results = []
        for item in items:
            embeds = self._fuse(ctx, item)
            negative = None
            if item.has(NEGATIVES):  # the negative branch as Qwen-Image-Edit computes it
                negative = item.output(NEGATIVES)
            meta = {"id": item.sample.id, "bridge": ctx.settings.bridge, "bridge_checksum": ctx.settings.bridge_checksum,
                    "qwen3_model": ctx.settings.qwen3_model, "edit_model": ctx.settings.edit_model,
                    "rewrite_with": ctx.settings.rewrite_with,
                    "fingerprint": ctx.fingerprints[self.name]}
            results.append(SampleResult.done(item.sample, FUSED.entry(fused_to_bytes(embeds, meta, negative)),
                                             tokens=int(embeds.shape[0])))
        return results
