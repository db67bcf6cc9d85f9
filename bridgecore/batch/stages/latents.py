"""Stage `latents`: VAE latents of a training triplet's condition images and target (GPU; training data).

The edit pipeline's own VAE encoding (resize to the condition size, normalise, argmax latents, pack),
so training sees exactly what the pipeline would. Reads only the plan (images), not the caches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridgecore.batch.records import SampleResult
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import Stage, StageContext, StageItem
from bridgecore.batch.stages.outputs import LATENTS
from bridgecore.model.latents import encode_latents

if TYPE_CHECKING:  # what this stage runs through the pool: the edit pipeline as loaded, its VAE (not the bridge)
    from bridgecore.model.loading import load_edit_pipeline  # noqa: F401 - followed by the code fingerprint


class LatentsStage(Stage):
    name = LATENTS.stage
    models = ("dit",)

    def settings_of(self, settings: JobSettings) -> dict:
        return {"edit_model": settings.edit_model, "edit_revision": settings.revision(settings.edit_model),
                "condition_area": settings.condition_area}

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        import torch

        from bridgecore.model.edit_prompt import condition_size
        from bridgecore.model.payloads import latents_to_bytes
        from bridgecore.model.images import load_image

        pipe = ctx.models.editor.pipe  # `load_edit_pipeline`'s pipeline; only its VAE runs here
        results = []
        for item in items:
            sample = item.sample
            if not sample.target:
                results.append(SampleResult.failed(sample, "no target image: not a training triplet"))
                continue
            # Every condition image is VAE-encoded at its own size, as the pipelines do (Edit-Plus: several);
            # the output takes the size of the last one (Edit-Plus sizes its output from `image[-1]`).
            sources, target = [load_image(uri) for uri in sample.images], load_image(sample.target)
            if sources[-1].size != target.size:
                results.append(SampleResult.failed(
                    sample, f"target size {target.size} differs from source size {sources[-1].size}"))
                continue
            sizes = [condition_size(source, ctx.settings.condition_area) for source in sources]
            conditions = [encode_latents(pipe, source, w, h) for source, (w, h) in zip(sources, sizes)]
            width, height = sizes[-1]
            payload = latents_to_bytes(torch.cat(conditions), encode_latents(pipe, target, width, height))
            results.append(SampleResult.done(sample, LATENTS.entry(payload), latent_hw=[height // 16, width // 16],
                                             condition_hw=[[h // 16, w // 16] for w, h in sizes]))
        return results
