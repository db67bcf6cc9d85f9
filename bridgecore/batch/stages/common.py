"""What several stages share: reading a sample's images, routing samples to the pipelines that take them, the
noise seed of an edit, PNG bytes, and returning results in the order the items came."""

from __future__ import annotations

import hashlib
import io

from bridgecore.batch.records import SampleResult
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import StageContext, StageItem
from bridgecore.batch.stages.outputs import StageOutput
from bridgecore.options import option


def read_images(items: list[StageItem], condition_area: int | None = None) -> tuple[list[tuple[StageItem, list]],
                                                                                  list[SampleResult]]:
    """(items whose images all load, with the images; failures for the others). With `condition_area`, an
    image too thin for it fails its sample here, with the reason, before any batch runs."""
    from bridgecore.model.edit_prompt import condition_size
    from bridgecore.model.images import ImageLoadError, load_image

    ready, failed = [], []
    for item in items:
        try:
            images = [load_image(uri) for uri in item.sample.images]
            for image in images if condition_area else []:
                condition_size(image, condition_area)
            ready.append((item, images))
        except (ImageLoadError, ValueError) as error:
            failed.append(SampleResult.failed(item.sample, str(error)))
    return ready, failed


def multi_image_refusal(count: int, settings: JobSettings) -> str:
    return (f"{count} images, but {settings.edit_model} is a single-image pipeline: give an Edit-Plus model for "
            f"the multi-image samples ({option('plus_model')}, e.g. Qwen/Qwen-Image-Edit-2511) to run them in this job")


def vlm_groups(ready: list, ctx: StageContext, results: list[SampleResult]):
    """(editor, [(item, images)]) per pipeline that takes them, that editor's VLMs made the resident ones;
    multi-image samples no pipeline of the job takes are failed into `results` with the hint."""
    for editor, group in ctx.models.route(ready):  # multi-image samples may go to the Edit-Plus model
        if not editor.plus:
            results += [SampleResult.failed(item.sample, multi_image_refusal(len(images), ctx.settings))
                        for item, images in group if len(images) != 1]
            group = [(item, images) for item, images in group if len(images) == 1]
        if group:
            ctx.models.use(editor, ("vlm",))
            yield editor, group


def sample_seed(job_seed: int, sample_id: str) -> int:
    """The noise seed of one sample: depends on the job seed and the sample, not on shard or worker."""
    return int.from_bytes(hashlib.sha256(f"{job_seed}:{sample_id}".encode()).digest()[:4], "little")


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def in_input_order(results: list[SampleResult], items: list[StageItem]) -> list[SampleResult]:
    """`results` sorted as their samples came in `items` (stages fail some samples early and batch the rest)."""
    order = {id(item.sample): index for index, item in enumerate(items)}
    return sorted(results, key=lambda r: order[id(r.sample)])


def edits_layout(settings: JobSettings | None) -> str:
    """The edit stages' layout: a PNG object per sample ("png"), or a WebDataset tar per shard ("webdataset")."""
    return "tar" if settings is not None and settings.edits_format == "webdataset" else "files"


def edits_format_record(settings: JobSettings) -> dict:
    """The edits' format, in an edit stage's fingerprint when it is not the default (PNG fingerprints unchanged)."""
    return {"edits_format": settings.edits_format} if settings.edits_format != "png" else {}


def edit_result(item: StageItem, output: StageOutput, image, settings: JobSettings) -> SampleResult:
    """An edited image as the stage commits it; in a WebDataset, with its metadata beside it (`<key>.json`)."""
    entries = output.entry(png_bytes(image))
    if settings.edits_format == "webdataset":
        import json

        sample = item.sample
        entries["json"] = json.dumps({**sample.extra, "id": sample.id, "instruction": sample.instruction,
                                      "images": list(sample.images), "width": image.width, "height": image.height},
                                     sort_keys=True, default=str).encode()  # the manifest's columns never win
    return SampleResult.done(item.sample, entries, width=image.width, height=image.height)
