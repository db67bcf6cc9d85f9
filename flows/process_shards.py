"""Flow `process-shards`: run a pipeline's stages over a batch of shards in one worker process (one GPU).

Stage-major through `run_pipeline`, so each model loads once for the whole batch and one GPU holds the
VLMs or the DiT, not both. Each stage of each shard is a `run-stage` task (cached on its fingerprint).
The run records what it did (shards, model loads and forwards, worker) under runs/<run>/children/.
"""

from __future__ import annotations

import os
import time

from prefect import flow, get_run_logger
from prefect.runtime import deployment, flow_run

from bridgecore.batch.executor import run_pipeline
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.shard_store import worker_id
from bridgecore.storage import Storage
from vision_bridge.flows.naming import speaks_in_parameters
from vision_bridge.tasks.run_stage import WORKER_MODELS, run_stage


def _child_name() -> str:
    shards = flow_run.parameters.get("shard_ids") or []
    return f"{flow_run.parameters.get('pipeline', 'bulk-edit')}-{shards[0] if shards else 'none'}+{max(len(shards) - 1, 0)}"


@flow(name="process-shards", flow_run_name=_child_name)
@speaks_in_parameters
def process_shards(output: str, shard_ids: list[str], settings: dict, pipeline: str = "bulk-edit",
                   run: str | None = None) -> dict:
    # run
    def as_task(stage, ctx, shard_id):
        return run_stage(output, pipeline, stage.name, shard_id, settings, ctx.for_shard(shard_id).fingerprints[stage.name])

    started, before = time.monotonic(), WORKER_MODELS.counts
    after = run_pipeline(output, pipeline, shard_ids, JobSettings.from_dict(settings), run_stage=as_task,
                         loaded=WORKER_MODELS, progress=deployment.id is None)  # no tqdm bars in a worker's log
    counts = {name: after[name] - before[name] for name in after}  # this run's, in a process that may run several
    # report
    record = {"flow_run": str(flow_run.id), "worker": worker_id(), "pid": os.getpid(), "shards": shard_ids,
              "seconds": round(time.monotonic() - started, 3), **counts}
    if run is not None:
        Storage(output).write_json(record, "runs", run, "children", f"{flow_run.id}.json")
    get_run_logger().info("%d shards; model loads and forwards: %s", len(shard_ids), counts)
    return record
