"""Stage `negatives`: Qwen-Image-Edit's own embeddings of the negative prompt, for true CFG (GPU); runs only
when cfg > 1.

Qwen-Image-Edit's negative conditioning sees the sample's images too, so it is extracted per sample. Only
Qwen2.5-VL runs: the negative branch is never bridged (see `bridge.negative_prompt_embeds`: the bridge is
trained on conditional branches only, and CFG then amplifies exactly its correction). Being its own stage,
turning CFG on (or changing the negative prompt) extracts only these, never the samples' own caches again.
"""

from __future__ import annotations

from bridgecore.batch.records import SampleResult
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import StageContext, StageItem
from bridgecore.batch.stages.common import in_input_order, read_images, vlm_groups
from bridgecore.batch.stages.extract import ExtractStage
from bridgecore.batch.stages.outputs import NEGATIVES


class NegativesStage(ExtractStage):
    name = NEGATIVES.stage

    def enabled(self, settings: JobSettings) -> bool:
        return settings.uses_cfg and not settings.native

    def settings_of(self, settings: JobSettings) -> dict:
        return {"edit_model": settings.edit_model, "edit_revision": settings.revision(settings.edit_model),
                "condition_area": settings.condition_area, "load_in_8bit": settings.load_in_8bit,
                "negative_prompt": settings.negative_prompt, **settings.plus_record()}

    def prompt(self, item: StageItem, settings: JobSettings) -> str:
        return settings.negative_prompt

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        from bridgecore.model.payloads import negatives_to_bytes

        ready, results = read_images(items, ctx.settings.condition_area)
        if not ready:
            return results
        caches = []
        for editor, group in vlm_groups(ready, ctx, results):
            caches += list(zip(group, editor.extractor.extract_qwen25_vision(
                [images for _, images in group], [ctx.settings.negative_prompt] * len(group))))
        for (item, _), cache in caches:
            embeds = cache.prompt_embeds.detach().cpu().contiguous()  # [L, D]
            results.append(SampleResult.done(item.sample, NEGATIVES.entry(negatives_to_bytes(embeds)),
                                             tokens=int(embeds.shape[0])))
        return in_input_order(results, items)
