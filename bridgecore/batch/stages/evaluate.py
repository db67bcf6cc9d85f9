"""Stage `metrics`: per-sample scores of an edit (CPU).

Every sample gets PSNR against its source (and target, when it has one) and the mean absolute change;
capability benchmark samples (a `capability` column, from `make-benchmark`) also get their capability
metrics: OCR, spatial, detail preservation, multi-image consistency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridgecore.batch.records import SampleResult
from bridgecore.batch.stage import Stage, StageContext, StageItem
from bridgecore.batch.stages.outputs import EDITS, QWEN21_EDITS

if TYPE_CHECKING:
    from PIL import Image


def basic_metrics(edited: "Image.Image", source: "Image.Image", target: "Image.Image | None") -> dict[str, float]:
    import numpy as np
    from PIL import Image

    from bridgecore.evaluation.metrics import psnr

    edited_array = np.asarray(edited)
    source_array = np.asarray(source.resize(edited.size, Image.BICUBIC))
    values = {"psnr_vs_source": psnr(edited_array, source_array),
              "mean_abs_change": float(np.abs(edited_array.astype(float) - source_array).mean() / 255)}
    if target is not None:
        values["psnr_vs_target"] = psnr(edited_array, np.asarray(target.resize(edited.size, Image.BICUBIC)))
    return values


class EvaluateStage(Stage):
    name = "metrics"
    optional_upstream = (EDITS.stage, QWEN21_EDITS.stage)  # whichever editor family made the edits
    layout = "table"

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        from bridgecore.evaluation.metrics import score_sample
        from bridgecore.model.images import load_image

        results = []
        for item in items:
            sample = item.sample
            edited = item.output(EDITS if item.has(EDITS) else QWEN21_EDITS)
            sources = [load_image(uri) for uri in sample.images]
            target = load_image(sample.target) if sample.target else None
            metrics = basic_metrics(edited, sources[0], target)
            if sample.extra.get("capability") and target is not None:
                meta = {**sample.extra, "id": sample.id, "instruction": sample.instruction}
                metrics.update(score_sample(meta, edited, sources, target), capability=sample.extra["capability"])
            results.append(SampleResult.done(sample, **metrics))
        return results
