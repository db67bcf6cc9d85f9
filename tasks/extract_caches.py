"""Task: extract the vision caches of one shard (GPU). Models load once per worker process."""

from prefect import get_run_logger, task

from bridgecore.batch_job import JobSettings
from bridgecore.stage_extract import extract_shard
from bridgecore.storage import Storage
from tasks.cache_policy import is_transient, shard_cache


@task(name="extract_caches", cache_policy=shard_cache("caches"), result_serializer="json", retries=3,
      retry_delay_seconds=2, retry_condition_fn=is_transient)
def extract_caches(output: str, shard_id: str, settings: dict, fingerprint: str) -> dict:
    job = JobSettings(**settings)
    marker = extract_shard(Storage(output), shard_id, job.editor().extractor, job.batch_size,
                           negative_prompt=job.negative)
    get_run_logger().info("caches %s: %s", shard_id, marker["counts"])
    return marker
