"""Stage `qwen21-edits`: Qwen-Image-2.1's cached conditioning + the condition images -> edited PNGs (GPU).

Only 2.1's DiT and VAE run here (its text encoder never loads). One sample per call: the pipeline takes
one image set per call. Each sample keeps its own noise seed, derived from the job seed and its id, as
in the `edits` stage, so the arms of a comparison see the same seeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridgecore.batch.records import SampleResult
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import Stage, StageContext, StageItem
from bridgecore.batch.stages.common import in_input_order, png_bytes, read_images, sample_seed

if TYPE_CHECKING:  # the model classes this stage calls through the pool: its code fingerprint follows them
    from bridgecore.model.native21 import NativeQwenImage21


class NativeEditStage(Stage):
    name = "qwen21-edits"
    upstream = ("qwen21-caches",)
    layout = "files"
    models = ("dit",)

    def enabled(self, settings: JobSettings) -> bool:
        return settings.native

    def batch_size(self, settings: JobSettings) -> int:
        return 1

    def settings_of(self, settings: JobSettings) -> dict:
        return {"edit_model": settings.edit_model, "edit_revision": settings.revision(settings.edit_model),
                "condition_area": settings.condition_area, "steps": settings.steps, "seed": settings.seed}

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        from bridgecore.model.payloads import qwen21_from_bytes

        ready, results = read_images(items)
        for item, images in ready:
            conditioning = qwen21_from_bytes(item.upstream["qwen21-caches"]["safetensors"])
            native: NativeQwenImage21 = ctx.models.native
            image = native.edit(images, conditioning, sample_seed(ctx.settings.seed, item.sample.id),
                                ctx.settings.steps)
            results.append(SampleResult.done(item.sample, {"png": png_bytes(image)}, width=image.width,
                                             height=image.height))
        return in_input_order(results, items)
