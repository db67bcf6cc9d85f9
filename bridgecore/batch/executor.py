"""The one executor every caller uses (the local path, the Prefect flows, the training-data preparation):
stage-major (one GPU holds the VLMs or the DiT, not both), shards another worker computes awaited, corrupt or
missing upstream shards recomputed, then the shard retried.

The batch core, one module per concern: `pipelines` (the declared pipelines and their stages), `fingerprints`,
`job_plan` (planning), this executor, `summary`.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from bridgecore.storage import Storage
from bridgecore.batch.fingerprints import route_fingerprints
from bridgecore.batch.model_pool import LoadedModels, ModelPool
from bridgecore.batch.pipelines import STAGES, pipeline_stages
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.shard_store import CorruptShardError, ShardBusyError
from bridgecore.batch.stage import Stage, StageContext

logger = logging.getLogger(__name__)

BUSY_POLL_SECONDS = 2.0

RunStage = Callable[[Stage, StageContext, str], dict]


def run_stage_here(stage: Stage, ctx: StageContext, shard_id: str) -> dict:
    return stage.run_shard(ctx, shard_id)


def make_context(output_uri: str, pipeline: str, settings: JobSettings,
                 loaded: LoadedModels | None = None) -> StageContext:
    routes = route_fingerprints(pipeline, settings)
    return StageContext(Storage(output_uri), settings, routes["single"], ModelPool(settings, loaded), STAGES,
                        routes=routes if routes["single"] != routes["multi"] else {})


def run_pipeline(output_uri: str, pipeline: str, shard_ids: list[str], settings: JobSettings,
                 run_stage: RunStage = run_stage_here, progress: bool = True,
                 loaded: LoadedModels | None = None) -> dict[str, int]:
    """Runs every enabled stage of `pipeline` over the shards, stage-major. Returns the model counts (of `loaded`,
    the models this run draws from: its own unless given; pass one to share models across runs).

    `run_stage` runs one stage on one shard: directly by default; the Prefect flow passes one that calls
    the stage's task (cache policy, retries). A corrupt or missing upstream shard is recomputed once.
    """
    from bridgecore.console import bar

    ctx = make_context(output_uri, pipeline, settings, loaded)
    stages = pipeline_stages(pipeline, settings)

    def run(stage: Stage, shard_id: str, attempts: int = len(stages) + 1) -> dict:
        try:
            return run_stage(stage, ctx, shard_id)
        except CorruptShardError as error:
            prints = ctx.for_shard(shard_id).fingerprints
            if attempts <= 0 or error.stage not in prints:
                raise
            logger.warning("%s of %s is corrupt or missing (%s): recomputing it", error.stage, shard_id, error)
            STAGES[error.stage].store(ctx.storage, prints[error.stage]).invalidate(shard_id)
            if error.stage != stage.name:
                run(STAGES[error.stage], shard_id, attempts - 1)
            return run(stage, shard_id, attempts - 1)

    for stage in stages:
        ctx.models.release(keep=stage.models)
        busy = []  # shards another worker is computing right now: their results are awaited, not redone
        for shard_id in bar(shard_ids, desc=stage.name, unit="shard", disable=not progress or not shard_ids):
            try:
                run(stage, shard_id)
            except ShardBusyError:
                busy.append(shard_id)
        while busy:
            logger.info("%s: waiting for %d shards that another worker is computing", stage.name, len(busy))
            time.sleep(BUSY_POLL_SECONDS)
            still = []
            for shard_id in busy:
                try:
                    run(stage, shard_id)  # committed meanwhile (skipped), or the lease expired (taken over)
                except ShardBusyError:
                    still.append(shard_id)
            busy = still
    return ctx.models.counts
