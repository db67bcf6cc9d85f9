"""Planning a job: read the inputs, assign new samples to new shards, say which shards have work left under these
settings (and repair damaged plan files of shards about to run)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field

from bridgecore.storage import Storage
from bridgecore.batch.fingerprints import ShardFingerprints
from bridgecore.batch.pipelines import STAGES, get_pipeline, leaf_stages
from bridgecore.batch.records import Sample
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.sharding import EDIT_SHARD_SIZE, PLAN_SHARDS, cut_shards, read_assignment, read_inputs, write_plan

logger = logging.getLogger(__name__)

JOBS = "plan/jobs"


@dataclass
class JobPlan:
    """A job's samples and shards under one output and one set of settings."""

    job: str  # id of the job's sample list (plan/jobs/<job>.parquet)
    shards: list[str]  # every shard holding the job's samples
    pending: list[str]  # shards with work left under these settings
    samples: int
    stages: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> {"committed", "to_run"} shards
    pending_samples: int = 0  # samples in the pending shards


def _write_job(storage: Storage, rows: list[tuple[str, str, str]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows)
    digest = hashlib.sha256()
    for row in rows:  # incrementally: a million rows joined into one string would double the planner's memory
        digest.update("\0".join(row).encode() + b"\n")
    job = digest.hexdigest()[:16]
    if not storage.exists(JOBS, f"{job}.parquet"):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"id": [r[0] for r in rows], "input_hash": [r[1] for r in rows],
                                 "shard": [r[2] for r in rows]}), buffer)
        storage.write_bytes(buffer.getvalue(), JOBS, f"{job}.parquet")
    return job


def read_job(storage: Storage, job: str) -> dict[str, list[str]]:
    """{shard: [sample ids]} of a planned job."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(JOBS, f"{job}.parquet")))
    members: dict[str, list[str]] = {}
    for sample_id, shard in zip(table.column("id").to_pylist(), table.column("shard").to_pylist()):
        members.setdefault(shard, []).append(sample_id)
    return members


def _failed_samples(storage: Storage, pipeline: str, settings: JobSettings, shards: list[str]) -> set[str]:
    prints = ShardFingerprints(storage, pipeline, settings, shards)
    committed = prints.committed(shards)
    failed: set[str] = set()
    for name in leaf_stages(pipeline, settings):
        for shard in shards:
            if shard in committed[name]:
                failed |= {row["id"] for row in prints.store(STAGES[name], shard).table(shard)
                           if row["status"] == "failed"}
    return failed


def _repair_plans(storage: Storage, shards: list[str], samples: list[Sample], rows: list[tuple[str, str, str]]) -> None:
    """Rewrites the plan files of shards about to run that are missing or unreadable (a truncated write, a
    deleted object), from the inputs: damage heals on rerun instead of failing every run the same way."""
    contents = storage.read_many([(PLAN_SHARDS, f"{shard}.json") for shard in shards])
    broken = []
    for (_, name), data in contents.items():
        try:
            json.loads(data)["samples"]
        except (TypeError, ValueError, KeyError):
            broken.append(name[: -len(".json")])
    if broken:
        by_id = {sample.id: sample for sample in samples}
        members: dict[str, list[Sample]] = {}
        for sample_id, _, shard in rows:
            members.setdefault(shard, []).append(by_id[sample_id])
        logger.warning("rewriting %d missing or damaged plan files: %s", len(broken), broken[:5])
        for shard in broken:
            storage.write_json({"shard": shard, "samples": [s.to_dict() for s in sorted(members[shard], key=lambda s: s.id)]},
                               PLAN_SHARDS, f"{shard}.json", indent=None)


def plan_job(input_uri: str, output_uri: str, settings: JobSettings, pipeline: str = "bulk-edit",
             prompt: str | None = None, shard_size: int = EDIT_SHARD_SIZE, retry_failed: bool = False,
             create_bucket: bool = False, content_hash: bool = False, limit: int | None = None) -> JobPlan:
    """Reads the inputs, assigns new samples to new shards (written under plan/), and says what is left.

    `limit` takes the first N samples of the inputs only (a trial run): settings and fingerprints are the job's
    own, so the full job later reuses everything the trial committed.

    Shards already planned are reused whatever the settings, so caches are shared between settings;
    `retry_failed` moves the samples that failed under these settings into new (retry) shards. `content_hash`
    identifies local inputs by the hash of their bytes (see `storage.FileStamps`).
    """
    settings.check_editor()
    if pipeline == "training-data" and settings.native:
        raise ValueError("the bridge is trained for Qwen-Image-Edit's conditioning; Qwen-Image-2.1 reads Qwen3-VL "
                         "natively and has no bridge to train")
    storage = Storage(output_uri)
    storage.ensure_root(create_bucket)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1; got {limit}")
    samples = read_inputs(input_uri, prompt, content_hash, limit)
    if settings.bridge and any(len(sample.images) > 1 for sample in samples):
        settings.check_bridge_serves_plus()  # before anything is planned or dispatched
    settings.check_references(max((len(sample.references) for sample in samples), default=0),
                              edits=get_pipeline(pipeline).scored)
    settings.check_bridge_levels()
    assignment = read_assignment(storage)
    new = cut_shards([s for s in samples if (s.id, s.input_hash) not in assignment], shard_size)
    fresh = write_plan(storage, new)
    for shard_id, members in new.items():
        assignment.update({(s.id, s.input_hash): (0, shard_id) for s in members})
    if retry_failed:
        current = sorted({assignment[(s.id, s.input_hash)][1] for s in samples})
        failed = _failed_samples(storage, pipeline, settings, current)
        by_generation: dict[int, list[Sample]] = {}
        for sample in samples:
            generation, _ = assignment[(sample.id, sample.input_hash)]
            if sample.id in failed:
                by_generation.setdefault(generation + 1, []).append(sample)
        for generation, retried in sorted(by_generation.items()):
            shards = cut_shards(retried, shard_size, salt=f"retry-{generation}:")
            write_plan(storage, shards, generation)
            for shard_id, members in shards.items():
                assignment.update({(s.id, s.input_hash): (generation, shard_id) for s in members})
        logger.info("retrying %d failed samples", len(failed))
    rows = [(s.id, s.input_hash, assignment[(s.id, s.input_hash)][1]) for s in samples]
    del assignment  # the largest structure of planning: free it before the job file is written
    job = _write_job(storage, rows)
    shards = sorted({shard for _, _, shard in rows})
    multi = {shard for sample, (_, _, shard) in zip(samples, rows) if sample.multi_image}
    routes = {shard: "multi" if shard in multi else "single" for shard in shards}
    committed = ShardFingerprints(storage, pipeline, settings, shards, known_routes=routes).committed(shards)
    finished = set(shards).intersection(*committed.values())
    pending = [shard for shard in shards if shard not in finished]
    _repair_plans(storage, [shard for shard in pending if shard not in fresh], samples, rows)
    storage.remove_stale_temporaries()
    stages = {name: {"committed": len(done & set(shards)), "to_run": len(set(shards) - done)}
              for name, done in committed.items()}
    logger.info("%d samples in %d shards: %d shards finished, %d to run", len(samples), len(shards),
                len(finished), len(pending))
    waiting = set(pending)
    return JobPlan(job, shards, pending, len(samples), stages, sum(shard in waiting for _, _, shard in rows))


def committed_stages(output_uri: str, pipeline: str, settings: JobSettings, shards: list[str]) -> int:
    """How many (stage, shard) pairs of `shards` are committed: a worker's progress, one listing per stage."""
    storage = Storage(output_uri)
    return sum(len(done) for done in ShardFingerprints(storage, pipeline, settings, shards).committed(shards).values())
