"""Task: basic metrics of one edited shard (CPU)."""

from prefect import get_run_logger, task

from bridgecore.stage_evaluate import evaluate_shard
from bridgecore.storage import Storage
from tasks.cache_policy import is_transient, shard_cache


@task(name="evaluate", cache_policy=shard_cache("metrics"), result_serializer="json", retries=3,
      retry_delay_seconds=2, retry_condition_fn=is_transient)
def evaluate(output: str, shard_id: str, fingerprint: str) -> dict:
    marker = evaluate_shard(Storage(output), shard_id)
    get_run_logger().info("metrics %s: %s", shard_id, marker["counts"])
    return marker
