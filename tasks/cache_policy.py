"""Prefect cache policy for shard tasks: keyed on what the output depends on, never on the run id.

Key = stage + output URI + shard id (which hashes the shard's inputs) + settings fingerprint (model ids,
revisions, bridge checksum, edit parameters) + code version. A shard whose completion marker is gone
gets no key, so the task runs: the marker on storage stays the ground truth, the Prefect cache a shortcut.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

from prefect.cache_policies import CachePolicy

from bridgecore.batch_job import code_version
from bridgecore.shard_store import ShardStore
from bridgecore.storage import Storage


@dataclass
class ShardCachePolicy(CachePolicy):
    stage: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> Optional[str]:
        output, shard_id = inputs["output"], inputs["shard_id"]
        if not ShardStore(Storage(output), self.stage).is_done(shard_id):
            return None
        parts = [self.stage, output, shard_id, inputs.get("fingerprint", ""), code_version()]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


def shard_cache(stage: str) -> ShardCachePolicy:
    return ShardCachePolicy(stage=stage)  # keyword only: CachePolicy's first field is key_storage


def is_transient(task, task_run, state) -> bool:
    """Retry only storage/network hiccups, never a deterministic failure."""
    from bridgecore.storage import is_transient_error

    try:
        state.result()
    except Exception as error:  # noqa: BLE001
        return is_transient_error(error)
    return False
