"""What an output holds, stage by stage and fingerprint by fingerprint, which runs use it, what a job would rerun,
and what nothing uses any more (`vision-bridge cache status` and `cache prune`).

A fingerprint folder (`STAGE/FP/`, see shard_store.py) is *used* when a run's summary (`runs/<run>/summary.json`)
names it, for the single-image or the multi-image route. Pruning removes only folders no summary names, that hold
no live lease and whose newest commit is older than a minimum age (a job still running has no summary yet), and it
removes a folder's commit markers first: a prune cut short leaves shards that readers see as not committed (to be
recomputed), never a half-deleted shard that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Any

from bridgecore.batch.fingerprints import fingerprints
from bridgecore.batch.pipelines import STAGES, pipeline_stages
from bridgecore.batch.settings import JobSettings
from bridgecore.storage import Storage, retry_transient


@dataclass
class StoredFingerprint:
    """One `STAGE/FP/` folder."""

    stage: str
    fingerprint: str
    shards: int  # committed shards (`_done` markers)
    samples: int  # done samples in them
    failed: int  # failed samples in them
    bytes: int  # everything under the folder
    newest_commit: float | None  # unix time of the newest marker, None without any
    leases: int  # shards a worker holds now (expired leases included: they are files until taken over)
    record: dict[str, Any] | None  # settings.json: the stage's settings, its upstream fingerprints, its code version
    runs: list[str] = field(default_factory=list)  # runs whose summary names this fingerprint


def stage_folders(storage: Storage) -> list[str]:
    """The stage names that have a folder in this output (stages of every pipeline)."""
    present = set(storage.list())
    return [name for name in STAGES if name in present]


def runs_by_fingerprint(storage: Storage) -> dict[tuple[str, str], list[str]]:
    """{(stage, fingerprint): [run, ...]} from every `runs/<run>/summary.json`."""
    used: dict[tuple[str, str], list[str]] = {}
    for run in storage.list("runs"):
        if not storage.exists("runs", run, "summary.json"):
            continue
        summary = storage.read_json("runs", run, "summary.json")
        for prints in (summary.get("fingerprints") or {}, summary.get("multi_image_fingerprints") or {}):
            for stage, fingerprint in prints.items():
                runs = used.setdefault((stage, fingerprint), [])
                if run not in runs:
                    runs.append(run)
    return used


def _folder_bytes(storage: Storage, *parts: str) -> int:
    path = storage.path(*parts)
    return int(retry_transient(lambda: storage.fs.du(path, total=True, withdirs=False)) or 0)


def inventory(storage: Storage) -> list[StoredFingerprint]:
    """Every fingerprint folder of every stage in the output, with its counts, bytes and the runs that use it."""
    used = runs_by_fingerprint(storage)
    found = []
    for stage in stage_folders(storage):
        for fingerprint in storage.list(stage):
            markers = storage.list(stage, fingerprint, "_done", suffix=".json")
            contents = storage.read_many([(stage, fingerprint, "_done", name) for name in markers])
            samples = failed = 0
            newest = None
            for data in contents.values():
                if data is None:
                    continue
                try:
                    marker = json.loads(data)
                except ValueError:
                    continue  # a damaged marker: --verify's business; it still counts as a shard here
                samples += int(marker.get("counts", {}).get("done", 0))
                failed += int(marker.get("counts", {}).get("failed", 0))
                committed = marker.get("committed")
                if isinstance(committed, (int, float)):
                    newest = committed if newest is None else max(newest, committed)
            record = storage.read_json(stage, fingerprint, "settings.json") if storage.exists(
                stage, fingerprint, "settings.json") else None
            size = _folder_bytes(storage, stage, fingerprint)
            if not markers and record is None and not size:
                continue  # an empty prefix a pruned folder may leave on an object store
            found.append(StoredFingerprint(
                stage=stage, fingerprint=fingerprint, shards=len(markers), samples=samples, failed=failed,
                bytes=size, newest_commit=newest,
                leases=len(storage.list(stage, fingerprint, "_lease", suffix=".json")), record=record,
                runs=sorted(used.get((stage, fingerprint), []))))
    return found


def latest_job(storage: Storage) -> tuple[str, JobSettings] | None:
    """The pipeline and settings of the output's most recent summary (`summary.json` at the root), if any."""
    if not storage.exists("summary.json"):
        return None
    summary = storage.read_json("summary.json")
    return summary["pipeline"], JobSettings.from_dict(summary["settings"])


def with_overrides(settings: JobSettings, overrides: dict[str, Any]) -> JobSettings:
    """`settings` with some fields replaced; an unknown field is refused with the known ones named."""
    known = set(settings.to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown job settings {unknown}; known: {sorted(known)}")
    return replace(settings, **overrides)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}"]


def rerun_plan(storage: Storage, pipeline: str, settings: JobSettings,
               stored: list[StoredFingerprint] | None = None) -> list[dict[str, Any]]:
    """For each enabled stage of `pipeline` under `settings` (single-image route): its fingerprint, whether a
    folder of it is stored here (and how many shards), and if not, why it would run again: the differences
    between what it would be and the closest stored record of the stage (settings, code version, upstream)."""
    stored = inventory(storage) if stored is None else stored
    wanted = fingerprints(pipeline, settings)
    by_stage: dict[str, list[StoredFingerprint]] = {}
    for item in stored:
        by_stage.setdefault(item.stage, []).append(item)
    plan = []
    for stage in pipeline_stages(pipeline, settings):
        fingerprint = wanted[stage.name]
        upstream = {name: wanted[name] for name in stage.upstream + stage.optional_upstream if name in wanted}
        record = json.loads(json.dumps(stage.fingerprint_record(settings, upstream), default=str))
        match = next((item for item in by_stage.get(stage.name, []) if item.fingerprint == fingerprint), None)
        entry: dict[str, Any] = {"stage": stage.name, "fingerprint": fingerprint,
                                 "stored_shards": match.shards if match else 0}
        if match is None:
            candidates = [item for item in by_stage.get(stage.name, []) if item.record is not None]
            if not candidates:
                entry["why"] = ["nothing of this stage is stored here"]
            else:  # the stored record that differs least says what changed
                def differences(item: StoredFingerprint) -> list[str]:
                    return _differences({key: item.record.get(key) for key in record}, record)

                # fewest differences; among equals the most recently committed (the latest run's)
                closest = min(candidates, key=lambda item: (len(differences(item)), -(item.newest_commit or 0)))
                reasons = []
                for line in differences(closest):
                    if line.startswith("code"):
                        reasons.append("the stage's code changed")
                    elif line.startswith("upstream"):
                        reasons.append(f"an upstream stage's output changed ({line.split(':')[0][len('upstream.'):]})")
                    else:
                        reasons.append(f"setting {line[len('settings.'):] if line.startswith('settings.') else line}")
                entry["closest"] = closest.fingerprint
                entry["why"] = sorted(set(reasons), key=reasons.index)
        plan.append(entry)
    return plan


def prunable(stored: list[StoredFingerprint], min_age_s: float, now: float | None = None) -> list[StoredFingerprint]:
    """Folders no run's summary names, without a lease, whose newest commit is older than `min_age_s`."""
    now = time.time() if now is None else now
    return [item for item in stored if not item.runs and not item.leases
            and (item.newest_commit is None or now - item.newest_commit >= min_age_s)]


def prune(storage: Storage, items: list[StoredFingerprint]) -> int:
    """Deletes these fingerprint folders, commit markers first; returns the bytes freed."""
    freed = 0
    for item in items:
        for marker in storage.list(item.stage, item.fingerprint, "_done", suffix=".json"):
            storage.remove(item.stage, item.fingerprint, "_done", marker)
        path = storage.path(item.stage, item.fingerprint)

        def remove_folder(path: str = path) -> None:
            for _ in range(3):  # an object store's listing may lag its writes: delete until a fresh listing is empty
                storage.fs.invalidate_cache(path)
                # (an object store may keep the prefix itself as a directory entry: not an object of the folder)
                left = [name for name in storage.fs.find(path) if name.rstrip("/") != path.rstrip("/")]
                if not left:
                    return
                storage.fs.rm(left)
            raise OSError(f"{path}: objects left after deleting it three times: {left[:3]}")
        retry_transient(remove_folder)
        if storage.is_local and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)  # the empty folders a local file system keeps
        freed += item.bytes
    return freed
