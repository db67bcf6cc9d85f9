"""Stage `negatives`: the negative prompt's caches for true CFG (GPU); runs only when cfg > 1.

Qwen-Image-Edit's negative conditioning sees the sample's images too, so it is extracted per sample,
exactly like `caches` but with the job's negative prompt. Being its own stage, turning CFG on (or
changing the negative prompt) extracts only these, never the samples' own caches again.
"""

from __future__ import annotations

from ..settings import JobSettings
from ..stage import StageItem
from .extract import ExtractStage


class NegativesStage(ExtractStage):
    name = "negatives"
    code = ExtractStage.code + ("batch.stages.extract",)

    def enabled(self, settings: JobSettings) -> bool:
        return settings.uses_cfg

    def settings_of(self, settings: JobSettings) -> dict:
        return {**super().settings_of(settings), "negative_prompt": settings.negative_prompt}

    def prompt(self, item: StageItem, settings: JobSettings) -> str:
        return settings.negative_prompt
