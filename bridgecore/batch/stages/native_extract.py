"""Stage `qwen21-caches`: each sample's images and instruction -> Qwen-Image-2.1's conditioning (GPU).

Computed by the pipeline's own encoding (see native21.py) with 2.1's own Qwen3-VL text encoder, and kept
as one safetensors entry per sample: `qwen21.prompt_embeds` [L, D], `qwen21.prompt_embeds_mask` [L],
`qwen21.image_pad_mask` [L], with the provenance in the header. Runs only for the native arm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


from bridgecore.batch.records import SampleResult
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import Stage, StageContext, StageItem
from bridgecore.batch.stages.common import in_input_order, read_images
from bridgecore.batch.stages.outputs import QWEN21_CACHES

if TYPE_CHECKING:  # the model classes this stage calls through the pool: its code fingerprint follows them
    from bridgecore.model.native21 import NativeQwenImage21


class NativeExtractStage(Stage):
    name = QWEN21_CACHES.stage
    models = ("vlm",)

    def enabled(self, settings: JobSettings) -> bool:
        return settings.native

    def batch_size(self, settings: JobSettings) -> int:
        return 1  # one sample per encoder call: the pipeline shares one image set across a call's prompts

    def settings_of(self, settings: JobSettings) -> dict:
        return {"edit_model": settings.edit_model, "edit_revision": settings.revision(settings.edit_model),
                "condition_area": settings.condition_area, "load_in_8bit": settings.load_in_8bit}

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        from bridgecore.model.payloads import qwen21_to_bytes

        native: NativeQwenImage21 = ctx.models.native
        limit = ctx.settings.max_prompt_tokens
        ready, results = read_images(items, ctx.settings.condition_area)
        for item, images in ready:
            tokens = native.prompt_tokens(item.sample.instruction)
            if tokens > limit:
                results.append(SampleResult.failed(item.sample, f"the prompt has {tokens} tokens; the limit is "
                                                   f"{limit} (max_prompt_tokens)"))
                continue
            conditioning = native.encode(images, item.sample.instruction)
            meta = {"id": item.sample.id, "input_hash": item.sample.input_hash, "edit_model": ctx.settings.edit_model,
                    "fingerprint": ctx.fingerprints[self.name], "resolution": native.resolution}
            payload = qwen21_to_bytes(conditioning, meta)
            results.append(SampleResult.done(item.sample, QWEN21_CACHES.entry(payload),
                                             tokens=int(conditioning["qwen21.prompt_embeds"].shape[0]),
                                             image_slots=int(conditioning["qwen21.image_pad_mask"].sum())))
        return in_input_order(results, items)
