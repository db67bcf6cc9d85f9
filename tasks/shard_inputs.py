"""Task: read the inputs and plan the shards (writes plan/), saying what is left under the job's settings."""

from dataclasses import asdict

from prefect import get_run_logger, task

from bridgecore.batch.pipeline import plan_job
from bridgecore.batch.settings import JobSettings


@task(name="shard_inputs")
def shard_inputs(input: str, output: str, settings: dict, pipeline: str, prompt: str | None, shard_size: int,
                 retry_failed: bool = False) -> dict:
    plan = plan_job(input, output, JobSettings.from_dict(settings), pipeline, prompt, shard_size, retry_failed)
    get_run_logger().info("%d samples in %d shards; %d shards to run", plan.samples, len(plan.shards),
                          len(plan.pending))
    return asdict(plan)
