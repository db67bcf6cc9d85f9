"""Task: run the bridge over one committed cache shard."""

from prefect import get_run_logger, task

from bridgecore.batch_job import JobSettings
from bridgecore.stage_fuse import fuse_shard
from bridgecore.storage import Storage
from tasks.cache_policy import is_transient, shard_cache


@task(name="fuse", cache_policy=shard_cache("fused"), result_serializer="json", retries=3, retry_delay_seconds=2,
      retry_condition_fn=is_transient)
def fuse(output: str, shard_id: str, settings: dict, fingerprint: str) -> dict:
    job = JobSettings(**settings)
    marker = fuse_shard(Storage(output), shard_id, job.bridge, job.editor().options.torch_device())
    get_run_logger().info("fused %s: %s", shard_id, marker["counts"])
    return marker
