"""Task: batched DiT edits of one fused shard (GPU)."""

from prefect import get_run_logger, task

from bridgecore.batch_job import JobSettings
from bridgecore.stage_edit import edit_shard
from bridgecore.storage import Storage
from tasks.cache_policy import is_transient, shard_cache


@task(name="edit", cache_policy=shard_cache("edits"), result_serializer="json", retries=3, retry_delay_seconds=2,
      retry_condition_fn=is_transient)
def edit(output: str, shard_id: str, settings: dict, fingerprint: str) -> dict:
    job = JobSettings(**settings)
    marker = edit_shard(Storage(output), shard_id, job.editor(), job.steps, job.seed, job.batch_size, job.cfg)
    get_run_logger().info("edits %s: %s", shard_id, marker["counts"])
    return marker
