"""The pipelines, declared: each is an object holding its stage objects in order, and says whether its runs are
scored arms (edits evaluated and compared) or data (caches, training data).

    bulk-edit      caches -> negatives (cfg > 1 only) -> rewrites (rewrite arm only) -> fused -> edits -> metrics
                   Qwen-Image-2.1 (the native arm): qwen21-caches -> qwen21-edits -> metrics
    build-caches   caches, rewrites (rewrite arm only) (Qwen-Image-2.1: qwen21-caches)
    training-data  caches, latents

Each stage's `enabled(settings)` picks the branch: the editor family, CFG, the rewrite arm. Adding a stage: one
file in stages/, its object in one pipeline's tuple below (and in `STAGES`, the registry readers use by name).
"""

from __future__ import annotations

from dataclasses import dataclass

from bridgecore.batch.settings import JobSettings
from bridgecore.batch.stage import Stage
from bridgecore.batch.stages.edit import EditStage
from bridgecore.batch.stages.evaluate import EvaluateStage
from bridgecore.batch.stages.extract import ExtractStage
from bridgecore.batch.stages.fuse import FuseStage
from bridgecore.batch.stages.latents import LatentsStage
from bridgecore.batch.stages.native_edit import NativeEditStage
from bridgecore.batch.stages.native_extract import NativeExtractStage
from bridgecore.batch.stages.negatives import NegativesStage
from bridgecore.batch.stages.rewrite import RewriteStage

CACHES, NEGATIVES, REWRITES, FUSED, EDITS = ExtractStage(), NegativesStage(), RewriteStage(), FuseStage(), EditStage()
QWEN21_CACHES, QWEN21_EDITS, METRICS, LATENTS = NativeExtractStage(), NativeEditStage(), EvaluateStage(), LatentsStage()

# every stage by the name its outputs are stored under (STAGE/FP/...): how readers find a stage again
STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    CACHES, NEGATIVES, REWRITES, FUSED, EDITS, QWEN21_CACHES, QWEN21_EDITS, METRICS, LATENTS)}


@dataclass(frozen=True)
class Pipeline:
    name: str
    stages: tuple[Stage, ...]  # in order; each one after the stages it reads
    scored: bool  # runs are arms: their edits are evaluated, labelled and compared (not caches or training data)

    def enabled(self, settings: JobSettings) -> list[Stage]:
        """The stages these settings run, in order."""
        return [stage for stage in self.stages if stage.enabled(settings)]


PIPELINES: dict[str, Pipeline] = {p.name: p for p in (
    Pipeline("bulk-edit", (CACHES, NEGATIVES, REWRITES, FUSED, EDITS, QWEN21_CACHES, QWEN21_EDITS, METRICS), scored=True),
    Pipeline("build-caches", (CACHES, REWRITES, QWEN21_CACHES), scored=False),
    Pipeline("training-data", (CACHES, LATENTS), scored=False),
)}


def get_pipeline(name: str) -> Pipeline:
    if name not in PIPELINES:
        raise ValueError(f"pipeline must be one of {sorted(PIPELINES)}; got {name!r}")
    return PIPELINES[name]


def is_scored(name: str) -> bool:
    """Whether runs of this pipeline (or flow) are arms with edits to label and compare; a flow that is not a
    batch pipeline (train-bridge) is not."""
    return name in PIPELINES and PIPELINES[name].scored


def pipeline_stages(pipeline: str, settings: JobSettings) -> list[Stage]:
    """The enabled stages of a pipeline, in order."""
    return get_pipeline(pipeline).enabled(settings)


def leaf_stages(pipeline: str, settings: JobSettings) -> list[str]:
    """Stages no other enabled stage of the pipeline reads: a shard is finished when all of them are committed."""
    stages = pipeline_stages(pipeline, settings)
    read = {name for stage in stages for name in stage.upstream + stage.optional_upstream}
    return [stage.name for stage in stages if stage.name not in read]
