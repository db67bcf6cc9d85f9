"""Task: read the inputs and plan the shards (writes plan/), saying what is left under the job's settings."""

import re
from dataclasses import asdict

from prefect import get_run_logger, task

from bridgecore.batch.job_plan import plan_job
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.sizing import pending_gpu_hours


@task(name="shard_inputs")
def shard_inputs(input: str, output: str, settings: dict, pipeline: str, prompt: str | None, shard_size: int,
                 retry_failed: bool = False, create_bucket: bool = False, content_hash: bool = False,
                 limit: int | None = None) -> dict:
    unresolved = [f"{name}={value!r}" for name, value in (("input", input), ("output", output)) if "{{" in str(value)]
    if unresolved:  # a deployment whose template variables were not set where `prefect deploy` ran
        variables = sorted(set(re.findall(r"\$(\w+)", " ".join(unresolved))))
        raise ValueError(f"{pipeline}: the deployment's parameters are unresolved templates ({', '.join(unresolved)}): "
                         f"set {' and '.join(variables)} where you run `prefect deploy`, then deploy again (or pass "
                         "--param input=... --param output=... to this run)")
    if not input or not output:  # e.g. a deployment created without its parameters
        raise ValueError(f"{pipeline} needs an input and an output; got input={input!r}, output={output!r} "
                         "(set them as deployment parameters, e.g. --param input=s3://... --param output=s3://...)")
    job = JobSettings.from_dict(settings)
    plan = plan_job(input, output, job, pipeline, prompt, shard_size, retry_failed, create_bucket, content_hash, limit)
    hours = pending_gpu_hours(plan.pending_samples, job, pipeline)
    get_run_logger().info("%d samples in %d shards; %d shards to run (%d samples): about %.2f GPU-hours on the real "
                          "models at this condition area (the planner's estimate)", plan.samples, len(plan.shards),
                          len(plan.pending), plan.pending_samples, hours)
    return {**asdict(plan), "pending_gpu_hours": hours}
