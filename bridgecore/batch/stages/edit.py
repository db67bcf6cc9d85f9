"""Stage `edits`: fused prompt embeddings + the condition images -> edited PNGs (GPU, the DiT), one object each or a
WebDataset tar per shard (`edits_format`).

Only the DiT and VAE run here. Samples whose condition images have the same size share one DiT
forward; each keeps its own noise seed, derived from the job seed and the sample id, so an edit does
not depend on its shard, batch or worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


from bridgecore.batch.records import SampleResult
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import Stage, StageContext, StageItem
from bridgecore.batch.stages.common import (
    edit_result,
    edits_format_record,
    edits_layout,
    in_input_order,
    multi_image_refusal,
    read_images,
    sample_seed,
)
from bridgecore.batch.stages.outputs import EDITS, FUSED

if TYPE_CHECKING:  # the model classes this stage calls through the pool: its code fingerprint follows them
    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit


class EditStage(Stage):
    name = EDITS.stage
    upstream = (FUSED.stage,)
    layout = "files"
    models = ("dit",)

    def enabled(self, settings: JobSettings) -> bool:
        return not settings.native

    def layout_for(self, settings: JobSettings | None) -> str:
        return edits_layout(settings)

    def group_key(self, item: StageItem, ctx: StageContext) -> bool:
        return ctx.models.routes_to_plus(item.sample)

    def settings_of(self, settings: JobSettings) -> dict:
        return {"edit_model": settings.edit_model, "edit_revision": settings.revision(settings.edit_model),
                "steps": settings.steps, "seed": settings.seed, "cfg": settings.cfg if settings.uses_cfg else 1.0,
                "lora_and_scheduler": settings.speed_fingerprint, **settings.plus_record(),
                **({"step_cache": settings.step_cache} if settings.step_cache else {}),  # an approximation: other edits
                **({"fp8": settings.fp8} if settings.fp8 != "off" else {}),  # likewise
                **edits_format_record(settings)}

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        ready, results = read_images(items)
        for editor, group in ctx.models.route(ready):  # multi-image samples may go to the Edit-Plus model
            results += self._edit(editor, group, ctx)
        return in_input_order(results, items)

    def _edit(self, editor: EnhancedQwenImageEdit, ready: list, ctx: StageContext) -> list[SampleResult]:
        from bridgecore.model.edit_prompt import pad_prompt_embeds

        results = []
        if not editor.plus:
            for item, images in [r for r in ready if len(r[1]) != 1]:
                results.append(SampleResult.failed(item.sample, multi_image_refusal(len(images), ctx.settings)))
            ready = [r for r in ready if len(r[1]) == 1]
        if ready:
            ctx.models.use(editor, ("dit",))
            fused = [item.output(FUSED) for item, _ in ready]
            embeds, mask = pad_prompt_embeds([positive for positive, _ in fused])
            negative = pad_prompt_embeds([n for _, n in fused]) if ctx.settings.uses_cfg else None
            seeds = [sample_seed(ctx.settings.seed, item.sample.id) for item, _ in ready]
            edited = editor.denoise([images for _, images in ready], embeds, mask, seeds, ctx.settings.steps,
                                    ctx.settings.cfg, negative)
            for (item, _), image in zip(ready, edited):
                results.append(edit_result(item, EDITS, image, ctx.settings))
        return results
