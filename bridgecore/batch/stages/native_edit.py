"""Stage `qwen21-edits`: Qwen-Image-2.1's cached conditioning + the condition images -> edited PNGs (GPU), one
object each or a WebDataset tar per shard (`edits_format`).

Only 2.1's DiT and VAE run here (its text encoder never loads). One sample per call: the pipeline takes
one image set per call. Each sample keeps its own noise seed, derived from the job seed and its id, as
in the `edits` stage, so the arms of a comparison see the same seeds.
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
    read_images,
    sample_seed,
)
from bridgecore.batch.stages.outputs import QWEN21_CACHES, QWEN21_EDITS

if TYPE_CHECKING:  # the model classes this stage calls through the pool: its code fingerprint follows them
    from bridgecore.model.native21 import NativeQwenImage21


class NativeEditStage(Stage):
    name = QWEN21_EDITS.stage
    upstream = (QWEN21_CACHES.stage,)
    layout = "files"
    models = ("dit",)

    def enabled(self, settings: JobSettings) -> bool:
        return settings.native

    def batch_size(self, settings: JobSettings) -> int:
        return 1

    def layout_for(self, settings: JobSettings | None) -> str:
        return edits_layout(settings)

    def settings_of(self, settings: JobSettings) -> dict:
        return {"edit_model": settings.edit_model, "edit_revision": settings.revision(settings.edit_model),
                "condition_area": settings.condition_area, "steps": settings.steps, "seed": settings.seed,
                **edits_format_record(settings)}

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        ready, results = read_images(items)
        for item, images in ready:
            conditioning = item.output(QWEN21_CACHES)
            native: NativeQwenImage21 = ctx.models.native
            image = native.edit(images, conditioning, sample_seed(ctx.settings.seed, item.sample.id),
                                ctx.settings.steps)
            results.append(edit_result(item, QWEN21_EDITS, image, ctx.settings))
        return in_input_order(results, items)
