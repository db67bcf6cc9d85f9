"""Prefect cache policy for stage tasks: keyed on what the output depends on, never on the run id.

Key = output URI + stage + stage fingerprint (its settings, model revisions, code and upstream
fingerprints) + shard id (which hashes the shard's members). A shard whose marker is gone gets no key,
so the task runs: the marker on storage stays the ground truth, the Prefect cache a shortcut.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

from prefect.cache_policies import CachePolicy

from bridgecore.batch.pipelines import STAGES
from bridgecore.storage import Storage, is_transient_error


@dataclass
class StageCachePolicy(CachePolicy):
    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> Optional[str]:
        output, stage, fingerprint, shard_id = (inputs[k] for k in ("output", "stage", "fingerprint", "shard_id"))
        if not STAGES[stage].store(Storage(output), fingerprint).is_done(shard_id):
            return None
        return hashlib.sha256("|".join((output, stage, fingerprint, shard_id)).encode()).hexdigest()


def is_transient(task, task_run, state) -> bool:
    """Retry only storage/network hiccups, never a deterministic failure."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001
        return is_transient_error(error)
    return False
