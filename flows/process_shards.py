"""Flow `process-shards`: run the stages over a list of shards in one worker process (one GPU).

Stage-major: all extractions first, then the VLMs are released before the DiT loads, so one GPU holds
the VLMs or the DiT, not both. A shard whose upstream objects turn out corrupt is recomputed.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from tqdm.auto import tqdm

from bridgecore.batch_job import forward_counts, invalidate_from, release_vlms
from bridgecore.shard_store import CorruptShardError
from tasks.edit import edit
from tasks.evaluate import evaluate
from tasks.extract_caches import extract_caches
from tasks.fuse import fuse

UPSTREAM = {"fused": ("caches", extract_caches), "edits": ("fused", fuse)}


def _stage(name, task, shards, output, *args, **kwargs):
    for shard_id in tqdm(shards, desc=name, unit="shard", leave=False):
        try:
            task(output, shard_id, *args, **kwargs)
        except CorruptShardError as error:  # corrupt upstream: recompute it once, then retry
            if name not in UPSTREAM:
                raise
            upstream, upstream_task = UPSTREAM[name]
            get_run_logger().warning("corrupt %s of %s (%s): recomputing", upstream, shard_id, error)
            invalidate_from(output, shard_id, upstream)
            upstream_task(output, shard_id, *args, **kwargs)
            task(output, shard_id, *args, **kwargs)


@flow(name="process-shards")
def process_shards(output: str, shard_ids: list[str], settings: dict, fingerprint: str,
                   final_stage: str = "metrics") -> dict:
    _stage("caches", extract_caches, shard_ids, output, settings, fingerprint)
    release_vlms()
    if final_stage != "caches":
        _stage("fused", fuse, shard_ids, output, settings, fingerprint)
        _stage("edits", edit, shard_ids, output, settings, fingerprint)
        for shard_id in shard_ids:
            evaluate(output, shard_id, fingerprint)
    return {"shards": len(shard_ids), "forwards": forward_counts()}
