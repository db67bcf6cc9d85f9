"""Stage `rewrites`: the rewrite arm's instruction (GPU, both VLMs); runs only with `rewrite_with`.

Qwen3-VL (the bridge's model, the same resized images) rewrites each instruction greedily under a token cap
(see bridgecore/model/rewrite.py); Qwen-Image-Edit's Qwen2.5-VL then encodes the rewrite exactly as it encodes an
instruction. The rewrite is stored in the stage's table (and from there in summary.parquet) so that a person
can read every one; the encoding replaces the sample's own Qwen2.5 embeddings in stage `fused`. Being its own
stage, a new system prompt reruns the rewrites and what reads them, never the caches. With
`rewrite_with="identity"` the rewrite is the instruction itself and no generation runs: the control.
"""

from __future__ import annotations

from bridgecore.batch.records import SampleResult
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import StageContext, StageItem
from bridgecore.batch.stages.common import in_input_order, read_images, vlm_groups
from bridgecore.batch.stages.extract import ExtractStage
from bridgecore.batch.stages.outputs import REWRITES


class RewriteStage(ExtractStage):
    name = REWRITES.stage

    def enabled(self, settings: JobSettings) -> bool:
        return settings.rewrites and not settings.native

    def settings_of(self, settings: JobSettings) -> dict:
        return {**super().settings_of(settings), "rewrite": settings.rewrite_record()}

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        from bridgecore.model.payloads import rewritten_to_bytes
        from bridgecore.model.rewrite import rewrite_for

        accepted, refused = self.check_prompt(items, ctx)
        ready, results = read_images(accepted, ctx.settings.condition_area)
        results += refused
        settings = ctx.settings
        for editor, group in vlm_groups(ready, ctx, results):
            instructions = [item.sample.instruction for item, _ in group]
            if settings.rewrite_with == "qwen3":
                generated = rewrite_for(editor.extractor, [images for _, images in group], instructions,
                                        settings.rewrite_prompt, settings.rewrite_max_tokens)
            else:
                generated = [(instruction, 0) for instruction in instructions]
            # An empty answer (a model that only closed its turn) falls back to the instruction, flagged.
            rewrites = [text or instruction for (text, _), instruction in zip(generated, instructions)]
            encodings = editor.extractor.extract_qwen25_vision([images for _, images in group], rewrites)
            for (item, _), rewrite, (text, tokens), qwen25 in zip(group, rewrites, generated, encodings):
                results.append(SampleResult.done(item.sample, REWRITES.entry(rewritten_to_bytes(qwen25, rewrite)),
                                                 rewrite=rewrite, generated_tokens=tokens, empty_rewrite=not text,
                                                 tokens=int(qwen25.prompt_embeds.shape[0])))
        return in_input_order(results, items)
