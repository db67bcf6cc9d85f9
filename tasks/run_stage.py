"""Task: run one stage of a pipeline on one shard (GPU or CPU, as the stage needs). One task for every
stage: the stage itself (bridgecore.batch.stages) says what it does."""

from prefect import get_run_logger, task

from bridgecore.batch.executor import make_context
from bridgecore.batch.pipelines import STAGES
from bridgecore.batch.model_pool import LoadedModels
from bridgecore.batch.settings import JobSettings
from vision_bridge.tasks.cache_policy import StageCachePolicy, is_transient

# The worker process's models: one process serves one GPU, and every stage task it runs draws from these, so a
# model loads once per process and stays resident across shards (Prefect's process worker starts a process per
# flow run).
WORKER_MODELS = LoadedModels()


@task(name="run-stage", task_run_name="{stage}-{shard_id}", cache_policy=StageCachePolicy(),
      result_serializer="json", retries=3, retry_delay_seconds=2, retry_condition_fn=is_transient)
def run_stage(output: str, pipeline: str, stage: str, shard_id: str, settings: dict, fingerprint: str) -> dict:
    ctx = make_context(output, pipeline, JobSettings.from_dict(settings), WORKER_MODELS).for_shard(shard_id)
    if ctx.fingerprints[stage] != fingerprint:
        raise RuntimeError(f"{stage}: this worker computes fingerprint {ctx.fingerprints[stage]}, the job planned "
                           f"{fingerprint}: its code or models differ from the planner's; update the worker")
    marker = STAGES[stage].run_shard(ctx, shard_id)
    get_run_logger().info("%s %s: %s%s", stage, shard_id, marker["counts"], " (already committed)" if marker.get("skipped") else "")
    return marker
