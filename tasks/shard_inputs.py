"""Task: read the inputs and plan the shards (writes plan/), saying what is left under the job's settings."""

from dataclasses import asdict

from prefect import get_run_logger, task

from bridgecore.batch.pipeline import plan_job
from bridgecore.batch.settings import JobSettings


@task(name="shard_inputs")
def shard_inputs(input: str, output: str, settings: dict, pipeline: str, prompt: str | None, shard_size: int,
                 retry_failed: bool = False, create_bucket: bool = False, content_hash: bool = False) -> dict:
    if not input or not output:  # e.g. a deployment created without its parameters
        raise ValueError(f"{pipeline} needs an input and an output; got input={input!r}, output={output!r} "
                         "(set them as deployment parameters, e.g. --param input=s3://... --param output=s3://...)")
    plan = plan_job(input, output, JobSettings.from_dict(settings), pipeline, prompt, shard_size, retry_failed,
                    create_bucket, content_hash)
    get_run_logger().info("%d samples in %d shards; %d shards to run", plan.samples, len(plan.shards),
                          len(plan.pending))
    return asdict(plan)
