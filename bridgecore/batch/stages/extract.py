"""Stage `caches`: each sample's images and instruction -> its vision caches (GPU).

Qwen3-VL's hidden states at three depths plus its DeepStack features, and Qwen-Image-Edit's own
Qwen2.5-VL prompt embeddings, in one `SampleCache` safetensors entry per sample (see cache_format.py).
A sample's reference pictures (manifest column `reference_images`) go to Qwen3-VL only, after its condition
images. A batch runs one forward per model; images that cannot be read fail their sample before the batch runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridgecore.batch.records import SampleResult
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import Stage, StageContext, StageItem
from bridgecore.batch.stages.common import in_input_order, read_images, vlm_groups
from bridgecore.batch.stages.outputs import CACHES

if TYPE_CHECKING:  # the model classes this stage calls through the pool: its code fingerprint follows them
    from bridgecore.model.extraction import VisionCacheExtractor


class ExtractStage(Stage):
    name = CACHES.stage
    models = ("vlm",)

    def enabled(self, settings: JobSettings) -> bool:
        return not settings.native  # Qwen-Image-2.1 reads its own conditioning (stage qwen21-caches)

    def group_key(self, item: StageItem, ctx: StageContext) -> bool:
        return ctx.models.routes_to_plus(item.sample)

    def settings_of(self, settings: JobSettings) -> dict:
        return {"qwen3_model": settings.qwen3_model, "qwen3_revision": settings.revision(settings.qwen3_model),
                "edit_model": settings.edit_model, "edit_revision": settings.revision(settings.edit_model),
                "condition_area": settings.condition_area, "load_in_8bit": settings.load_in_8bit,
                **settings.plus_record(),
                **({"cache_dtype": settings.cache_dtype} if settings.cache_dtype != "native" else {}),
                "deepstack_taps": settings.cache_deepstack,
                **({"qwen3_area": settings.qwen3_area} if settings.qwen3_area else {})}

    def prompt(self, item: StageItem, settings: JobSettings) -> str:
        return item.sample.instruction

    def check_prompt(self, items: list[StageItem], ctx: StageContext) -> tuple[list[StageItem], list[SampleResult]]:
        """Items whose prompt is within `max_prompt_tokens` (Qwen2.5-VL's tokenizer); failures for the others.
        A runaway instruction must fail its sample, not allocate a run's worth of memory downstream."""
        extractor: VisionCacheExtractor = ctx.models.extractor
        tokenizer = extractor.qwen25_encoder.processor.tokenizer
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
        from bridgecore.model.cache_format import cache_to_bytes

        accepted, refused = self.check_prompt(items, ctx)
        ready, results = read_images(accepted, ctx.settings.condition_area)
        results += refused
        ready, references = read_references(ready, results)
        if not ready:
            return results
        caches = []
        for editor, group in vlm_groups(ready, ctx, results):
            prompts = [self.prompt(item, ctx.settings) for item, _ in group]
            extracted = editor.extractor.extract([images for _, images in group], prompts,
                                                 references=[references[id(item)] for item, _ in group])
            caches += list(zip(group, extracted))
        for (item, _), cache in caches:
            cache.extra = {"id": item.sample.id, "input_hash": item.sample.input_hash}
            if not ctx.settings.cache_deepstack:  # not kept: the default bridge does not read them
                cache.qwen3.deepstack = {}
            results.append(SampleResult.done(item.sample, CACHES.entry(cache_to_bytes(cache, ctx.settings.cache_dtype)),
                                             qwen25_tokens=int(cache.qwen25.prompt_embeds.shape[0]),
                                             qwen3_tokens=int(next(iter(cache.qwen3.levels.values())).shape[0]),
                                             qwen3_vision_tokens=cache.qwen3.num_vision_tokens,
                                             qwen25_vision_tokens=cache.qwen25.num_vision_tokens,
                                             **({"reference_images": cache.qwen3.reference_images}
                                                if cache.qwen3.reference_images else {})))
        return in_input_order(results, items)


def read_references(ready: list, results: list[SampleResult]) -> tuple[list, dict[int, list]]:
    """(the ready items whose reference pictures all load, {id(item): pictures}); a picture that cannot be read fails
    its sample into `results` with the reason."""
    from bridgecore.model.images import ImageLoadError, load_image

    kept, references = [], {}
    for item, images in ready:
        try:
            references[id(item)] = [load_image(uri) for uri in item.sample.references]
            kept.append((item, images))
        except ImageLoadError as error:
            results.append(SampleResult.failed(item.sample, f"reference picture: {error}"))
    return kept, references
