"""Task: read the inputs and plan the shards that still have work (writes plan/<shard>.json)."""

from prefect import task

from bridgecore.batch_job import plan_job


@task(name="shard_inputs", retries=3, retry_delay_seconds=2)
def shard_inputs(input: str, output: str, prompt: str | None, shard_size: int, final_stage: str,
                 retry_failed: bool = False) -> dict:
    plan = plan_job(input, output, prompt, shard_size, final_stage, retry_failed)
    return {"shards": plan.shards, "new_shards": plan.new_shards, "samples": plan.samples}
