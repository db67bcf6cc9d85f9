"""Stage `caches`: each sample's images and instruction -> its vision caches (GPU).

Qwen3-VL's hidden states at three depths plus its DeepStack features, and Qwen-Image-Edit's own
Qwen2.5-VL prompt embeddings, in one `SampleCache` safetensors entry per sample (see cache_format.py).
A batch runs one forward per model; images that cannot be read fail their sample before the batch runs.
"""

from __future__ import annotations

from ..records import SampleResult
from ..settings import JobSettings
from ..stage import Stage, StageContext, StageItem


def read_images(items: list[StageItem], condition_area: int | None = None) -> tuple[list[tuple[StageItem, list]],
                                                                                  list[SampleResult]]:
    """(items whose images all load, with the images; failures for the others). With `condition_area`, an
    image too thin for it fails its sample here, with the reason, before any batch runs."""
    from ...edit_prompt import condition_size
    from ...images import ImageLoadError, load_image

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
            "the multi-image samples (--plus-model, e.g. Qwen/Qwen-Image-Edit-2511) to run them in this job")


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


class ExtractStage(Stage):
    name = "caches"
    models = ("vlm",)
    code = ("extraction", "edit_prompt", "cache_format", "images")

    def enabled(self, settings: JobSettings) -> bool:
        return not settings.native  # Qwen-Image-2.1 reads its own conditioning (stage qwen21-caches)

    def group_key(self, item: StageItem, ctx: StageContext) -> bool:
        return ctx.models.routes_to_plus(item.sample)

    def settings_of(self, settings: JobSettings) -> dict:
        return {"qwen3_model": settings.qwen3_model, "qwen3_revision": settings.revision(settings.qwen3_model),
                "edit_model": settings.edit_model, "edit_revision": settings.revision(settings.edit_model),
                "condition_area": settings.condition_area, "load_in_8bit": settings.load_in_8bit,
                **settings.plus_record()}

    def prompt(self, item: StageItem, settings: JobSettings) -> str:
        return item.sample.instruction

    def check_prompt(self, items: list[StageItem], ctx: StageContext) -> tuple[list[StageItem], list[SampleResult]]:
        """Items whose prompt is within `max_prompt_tokens` (Qwen2.5-VL's tokenizer); failures for the others.
        A runaway instruction must fail its sample, not allocate a run's worth of memory downstream."""
        tokenizer = ctx.models.extractor.qwen25_encoder.processor.tokenizer
        limit, kept, failed = ctx.settings.max_prompt_tokens, [], []
        for item in items:
            count = len(tokenizer(self.prompt(item, ctx.settings), add_special_tokens=False)["input_ids"])
            if count > limit:
                failed.append(SampleResult.failed(item.sample, f"the prompt has {count} tokens; the limit is {limit} "
                                                  "(max_prompt_tokens)"))
            else:
                kept.append(item)
        return kept, failed

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        from ...cache_format import cache_to_bytes

        accepted, refused = self.check_prompt(items, ctx)
        ready, results = read_images(accepted, ctx.settings.condition_area)
        results += refused
        if not ready:
            return results
        caches = []
        for editor, group in vlm_groups(ready, ctx, results):
            prompts = [self.prompt(item, ctx.settings) for item, _ in group]
            caches += list(zip(group, editor.extractor.extract([images for _, images in group], prompts)))
        for (item, _), cache in caches:
            cache.extra = {"id": item.sample.id, "input_hash": item.sample.input_hash}
            results.append(SampleResult.done(item.sample, {"safetensors": cache_to_bytes(cache)},
                                             qwen25_tokens=int(cache.qwen25.prompt_embeds.shape[0]),
                                             qwen3_tokens=int(next(iter(cache.qwen3.levels.values())).shape[0]),
                                             qwen3_vision_tokens=cache.qwen3.num_vision_tokens,
                                             qwen25_vision_tokens=cache.qwen25.num_vision_tokens))
        order = {id(item.sample): index for index, item in enumerate(items)}
        return sorted(results, key=lambda r: order[id(r.sample)])
