"""The pipelines, their fingerprints, and the one executor every caller uses.

    PIPELINES["bulk-edit"]     caches -> negatives (cfg > 1 only) -> rewrites (rewrite arm only) -> fused -> edits
                               -> metrics
                               Qwen-Image-2.1 (the native arm): qwen21-caches -> qwen21-edits -> metrics
    PIPELINES["build-caches"]  caches, rewrites (rewrite arm only) (Qwen-Image-2.1: qwen21-caches)
    PIPELINES["training-data"] caches, latents

A stage's fingerprint hashes exactly what its output depends on: its settings (model revisions
included), its code, and its upstream stages' fingerprints. Outputs live under `STAGE/FINGERPRINT/`,
so a changed setting reruns exactly the stages downstream of it, and several settings share one output
(a baseline and a bridge run share their caches). `run_pipeline` is the executor of the local path,
the Prefect flows and the training-data preparation alike: stage-major (one GPU holds the VLMs or the
DiT, not both), corrupt or missing upstream shards recomputed, then the shard retried.

Adding a stage: one file in stages/, one line in STAGES, its name in a pipeline.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from bridgecore.storage import Storage
from bridgecore.batch.records import ROUTES, Sample
from bridgecore.batch.model_pool import LoadedModels, ModelPool
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.shard_store import CorruptShardError, ShardBusyError, ShardStore
from bridgecore.batch.sharding import (
    EDIT_SHARD_SIZE,
    PLAN_SHARDS,
    cut_shards,
    read_assignment,
    read_inputs,
    write_plan,
)
from bridgecore.batch.stage import Stage, StageContext
from bridgecore.batch.stages.edit import EditStage
from bridgecore.batch.stages.evaluate import EvaluateStage
from bridgecore.batch.stages.extract import ExtractStage
from bridgecore.batch.stages.fuse import FuseStage
from bridgecore.batch.stages.latents import LatentsStage
from bridgecore.batch.stages.native_edit import NativeEditStage
from bridgecore.batch.stages.native_extract import NativeExtractStage
from bridgecore.batch.stages.negatives import NegativesStage
from bridgecore.batch.stages.rewrite import RewriteStage

logger = logging.getLogger(__name__)

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    ExtractStage(), NegativesStage(), RewriteStage(), FuseStage(), EditStage(), NativeExtractStage(), NativeEditStage(),
    EvaluateStage(), LatentsStage())}

# Each stage's `enabled(settings)` picks the branch: the editor family, CFG, the rewrite arm.
PIPELINES: dict[str, tuple[str, ...]] = {
    "bulk-edit": ("caches", "negatives", "rewrites", "fused", "edits", "qwen21-caches", "qwen21-edits", "metrics"),
    "build-caches": ("caches", "rewrites", "qwen21-caches"),
    "training-data": ("caches", "latents"),
}

JOBS = "plan/jobs"
BUSY_POLL_SECONDS = 2.0


def pipeline_stages(pipeline: str, settings: JobSettings) -> list[Stage]:
    """The enabled stages of a pipeline, in order."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {sorted(PIPELINES)}; got {pipeline!r}")
    return [STAGES[name] for name in PIPELINES[pipeline] if STAGES[name].enabled(settings)]


def fingerprints(pipeline: str, settings: JobSettings, route: str = "single") -> dict[str, str]:
    """{stage: fingerprint} of the pipeline's enabled stages under these settings, for the shards of one route.

    A single-image shard's outputs are what the job gives without an Edit-Plus `plus_model`, so its route is
    fingerprinted without it: adding `plus_model` to a finished job runs only its multi-image shards.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}; got {route!r}")
    if route == "single" and settings.plus_model:
        settings = replace(settings, plus_model=None)
    result: dict[str, str] = {}
    for stage in pipeline_stages(pipeline, settings):
        upstream = {name: result[name] for name in stage.upstream + stage.optional_upstream if name in result}
        missing = [name for name in stage.upstream if name not in result]
        if missing:
            raise ValueError(f"stage {stage.name} needs {missing} before it in pipeline {pipeline}")
        record = json.dumps(stage.fingerprint_record(settings, upstream), sort_keys=True, default=str)
        result[stage.name] = hashlib.sha256(record.encode()).hexdigest()[:16]
    return result


def route_fingerprints(pipeline: str, settings: JobSettings) -> dict[str, dict[str, str]]:
    """{route: {stage: fingerprint}}."""
    return {route: fingerprints(pipeline, settings, route) for route in ROUTES}


def shard_routes(storage: Storage, shards: list[str]) -> dict[str, str]:
    """{shard: route}, from the shards' plans (a shard whose plan is unreadable counts as single-image)."""
    routes = {}
    for (_, name), data in storage.read_many([(PLAN_SHARDS, f"{shard}.json") for shard in shards]).items():
        try:
            samples = json.loads(data)["samples"]
        except (TypeError, ValueError, KeyError):
            samples = []
        routes[name[: -len(".json")]] = "multi" if any(len(s.get("images") or ()) > 1 for s in samples) else "single"
    return routes


class ShardFingerprints:
    """The fingerprints of each shard of a job: its route's. Plans are read only when the routes differ."""

    def __init__(self, storage: Storage, pipeline: str, settings: JobSettings, shards: list[str],
                 known_routes: dict[str, str] | None = None):
        self.storage, self.settings, self.routes = storage, settings, route_fingerprints(pipeline, settings)
        self.stages = pipeline_stages(pipeline, settings)
        self.differ = self.routes["single"] != self.routes["multi"]
        self.shard_route: dict[str, str] = {}
        if self.differ:
            self.shard_route = dict(known_routes or {})
            self.shard_route.update(shard_routes(storage, [s for s in shards if s not in self.shard_route]))

    def of(self, shard_id: str) -> dict[str, str]:
        return self.routes[self.shard_route.get(shard_id, "single")]

    def record(self) -> dict[str, Any]:
        """What identifies the job's outputs: one route's fingerprints, or both when they differ."""
        return self.routes if self.differ else self.routes["single"]

    def committed(self, shards: list[str]) -> dict[str, set[str]]:
        """{stage: the shards committed under their route's fingerprint}, one listing per stage and route."""
        result = {}
        for stage in self.stages:
            listed: dict[str, set[str]] = {}  # fingerprint -> its committed shards
            for fingerprint in {self.of(shard)[stage.name] for shard in shards}:
                listed[fingerprint] = stage.store(self.storage, fingerprint).done_shards()
            result[stage.name] = {shard for shard in shards if shard in listed[self.of(shard)[stage.name]]}
        return result

    def store(self, stage: Stage, shard_id: str) -> ShardStore:
        return stage.store(self.storage, self.of(shard_id)[stage.name], self.settings)


def leaf_stages(pipeline: str, settings: JobSettings) -> list[str]:
    """Stages no other enabled stage of the pipeline reads: a shard is finished when all of them are committed."""
    stages = pipeline_stages(pipeline, settings)
    read = {name for stage in stages for name in stage.upstream + stage.optional_upstream}
    return [stage.name for stage in stages if stage.name not in read]


# -- planning ---------------------------------------------------------------------------------------------


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
    settings.check_references(max((len(sample.references) for sample in samples), default=0), pipeline)
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


# -- running ----------------------------------------------------------------------------------------------

RunStage = Callable[[Stage, StageContext, str], dict]


def run_stage_here(stage: Stage, ctx: StageContext, shard_id: str) -> dict:
    return stage.run_shard(ctx, shard_id)


def make_context(output_uri: str, pipeline: str, settings: JobSettings,
                 loaded: LoadedModels | None = None) -> StageContext:
    routes = route_fingerprints(pipeline, settings)
    return StageContext(Storage(output_uri), settings, routes["single"], ModelPool(settings, loaded), STAGES,
                        routes=routes if routes["single"] != routes["multi"] else {})


def run_pipeline(output_uri: str, pipeline: str, shard_ids: list[str], settings: JobSettings,
                 run_stage: RunStage = run_stage_here, progress: bool = True,
                 loaded: LoadedModels | None = None) -> dict[str, int]:
    """Runs every enabled stage of `pipeline` over the shards, stage-major. Returns the model counts (of `loaded`,
    the models this run draws from: its own unless given; pass one to share models across runs).

    `run_stage` runs one stage on one shard: directly by default; the Prefect flow passes one that calls
    the stage's task (cache policy, retries). A corrupt or missing upstream shard is recomputed once.
    """
    from bridgecore.console import bar

    ctx = make_context(output_uri, pipeline, settings, loaded)
    stages = pipeline_stages(pipeline, settings)

    def run(stage: Stage, shard_id: str, attempts: int = len(stages) + 1) -> dict:
        try:
            return run_stage(stage, ctx, shard_id)
        except CorruptShardError as error:
            prints = ctx.for_shard(shard_id).fingerprints
            if attempts <= 0 or error.stage not in prints:
                raise
            logger.warning("%s of %s is corrupt or missing (%s): recomputing it", error.stage, shard_id, error)
            STAGES[error.stage].store(ctx.storage, prints[error.stage]).invalidate(shard_id)
            if error.stage != stage.name:
                run(STAGES[error.stage], shard_id, attempts - 1)
            return run(stage, shard_id, attempts - 1)

    for stage in stages:
        ctx.models.release(keep=stage.models)
        busy = []  # shards another worker is computing right now: their results are awaited, not redone
        for shard_id in bar(shard_ids, desc=stage.name, unit="shard", disable=not progress or not shard_ids):
            try:
                run(stage, shard_id)
            except ShardBusyError:
                busy.append(shard_id)
        while busy:
            logger.info("%s: waiting for %d shards that another worker is computing", stage.name, len(busy))
            time.sleep(BUSY_POLL_SECONDS)
            still = []
            for shard_id in busy:
                try:
                    run(stage, shard_id)  # committed meanwhile (skipped), or the lease expired (taken over)
                except ShardBusyError:
                    still.append(shard_id)
            busy = still
    return ctx.models.counts


# -- summary ----------------------------------------------------------------------------------------------


def run_id(job: str, pipeline: str, settings: JobSettings) -> str:
    routes = route_fingerprints(pipeline, settings)
    prints = routes if routes["single"] != routes["multi"] else routes["single"]
    return hashlib.sha256(json.dumps([job, pipeline, prints], sort_keys=True).encode()).hexdigest()[:16]


def summarize(output_uri: str, job: str, pipeline: str, settings: JobSettings, verify: bool = False) -> dict[str, Any]:
    """Each sample's final state under these settings: done, failed (with the stage and the reason) or pending.

    The last committed stage's table carries every earlier failure forward, so one table per shard decides.
    Output objects (edited images) are checked to exist with their recorded size; with `verify`, by checksum.
    A table or object found damaged is forgotten (its marker removed) and listed under "damaged", for the
    caller to recompute. Writes runs/<run>/summary.parquet + summary.json, and the same as the output's latest summary.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage = Storage(output_uri)
    members = read_job(storage, job)
    prints = ShardFingerprints(storage, pipeline, settings, sorted(members))
    stages = prints.stages
    done_shards = prints.committed(sorted(members))
    rows, damaged, empty_rewrites = [], [], 0
    for shard_id, wanted in sorted(members.items()):
        stores = {stage.name: prints.store(stage, shard_id) for stage in stages}
        states = {sample_id: {"id": sample_id, "shard": shard_id, "status": "pending", "stage": None, "error": None,
                              "output": None, "metrics": None, "rewrite": None} for sample_id in wanted}
        committed = [stage for stage in stages if shard_id in done_shards[stage.name]]
        # Tables carry earlier failures forward: the last committed stage knows every failure so far.
        # ... and the rewrite arm's table holds the rewritten instructions, for people to read.
        readable = committed[-1:] + [stage for stage in committed[:-1] if stage.layout == "files" or stage.name == "rewrites"]
        if verify:  # every committed stage's data, checksums included (the caches too: damage found before training)
            readable = committed[-1:] + committed[:-1]
        try:
            tables = {stage.name: {row["id"]: row for row in stores[stage.name].table(shard_id)} for stage in readable}
            for stage in readable:
                stores[stage.name].check_files(shard_id, list(tables[stage.name].values()), full=verify)
        except CorruptShardError as error:  # forget it: the shard is pending, and the next run recomputes it
            logger.warning("%s (shard %s): %s; it will be recomputed", error.stage, shard_id, error)
            stores[error.stage].invalidate(shard_id)
            damaged.append(shard_id)
            tables, committed = {}, []
        complete = len(committed) == len(stages)
        for sample_id, state in states.items():
            rows_of = {name: table[sample_id] for name, table in tables.items() if sample_id in table}
            failed = next((row for row in rows_of.values() if row["status"] == "failed"), None)
            if failed is not None:
                state.update(status="failed", stage=json.loads(failed["info"]).get("failed_at"), error=failed["error"])
            elif complete:
                state.update(status="done", metrics=rows_of["metrics"]["info"] if "metrics" in rows_of else None)
            for name, row in rows_of.items():
                state["output"] = stores[name].file_url(shard_id, row) or state["output"]
            if "rewrites" in rows_of and rows_of["rewrites"]["status"] == "done":
                info = json.loads(rows_of["rewrites"]["info"])
                state["rewrite"] = info.get("rewrite")
                empty_rewrites += bool(info.get("empty_rewrite"))
        rows.extend(states.values())
    counts = {state: sum(r["status"] == state for r in rows) for state in ("done", "failed", "pending")}
    capabilities: dict[str, list[float]] = {}
    for row in rows:
        metrics = json.loads(row["metrics"]) if row["metrics"] else {}
        if "capability" in metrics:
            capabilities.setdefault(metrics["capability"], []).append(metrics["edit_success"])
    run = run_id(job, pipeline, settings)
    summary = {"run": run, "job": job, "pipeline": pipeline, "settings": settings.to_dict(),
               "fingerprints": prints.routes["single"],
               "counts": counts, "shards": len({r["shard"] for r in rows}), "damaged": damaged,
               "failures": [{"id": r["id"], "stage": r["stage"], "error": r["error"]} for r in rows
                            if r["status"] == "failed"],
               "capabilities": {name: {"samples": len(v), "edit_success": float(np.mean(v))}
                                for name, v in sorted(capabilities.items())}}
    if prints.differ:  # the multi-image shards' stages run the Edit-Plus model: other fingerprints
        summary["multi_image_fingerprints"] = prints.routes["multi"]
    if settings.rewrites:
        summary["rewrites"] = {"samples": sum(r["rewrite"] is not None for r in rows),
                               "empty_kept_the_instruction": empty_rewrites}
    summary["stats"] = stage_stats(storage, stages, prints, sorted({r["shard"] for r in rows}))
    for stage, reasons in failure_reasons(summary["failures"]).items():  # what failed, grouped, per stage
        summary["stats"].setdefault(stage, {"failed": sum(reasons.values())})["failure_reasons"] = reasons
    # every row says which run and arm it belongs to: summaries of several arms concatenate into one table
    from bridgecore.evaluation.capabilities import arm_label

    arm = "" if pipeline in ("build-caches", "training-data") else arm_label({**settings.to_dict(),
                                                                             "editor": settings.family})
    for row in rows:
        row.update(run=run, arm=arm, pipeline=pipeline)
    schema = pa.schema([(name, pa.string()) for name in ("id", "shard", "status", "stage", "error", "output", "metrics",
                                                         "rewrite", "run", "arm", "pipeline")])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    text = json.dumps(summary, indent=1).encode()
    for folder in (("runs", run), ()):
        storage.write_bytes(buffer.getvalue(), *folder, "summary.parquet")
        storage.write_bytes(text, *folder, "summary.json")
    storage.write_json(summary["stats"], "runs", run, "stats.json")
    return summary


def failure_reason(error: str | None) -> str:
    """An error message with its sample-specific parts (quoted names, paths and URLs, numbers) blanked, so that the
    same cause counts once: "file not found: /in/a.png" and "... /in/b.png" are one reason."""
    text = (error or "unknown").strip().splitlines()[0] if (error or "").strip() else "unknown"
    text = re.sub(r"(?<!\w)'[^']*'(?!\w)|\"[^\"]*\"", "'…'", text)  # quoted names (not "can't ... isn't")
    text = re.sub(r"\b[a-z][a-z0-9+.-]*://\S+|\S*/\S+", "<path>", text)  # URLs, absolute and relative paths
    text = re.sub(r"\S*~[0-9a-f]{8,}\S*|\b[0-9a-f]{12,}\b", "<key>", text)  # storage keys, hashes
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text[:160]


def failure_reasons(failures: list[dict[str, Any]], top: int = 20) -> dict[str, dict[str, int]]:
    """{stage: {reason: samples}} over a summary's failures, the `top` most frequent reasons of each stage."""
    from collections import Counter

    by_stage: dict[str, Counter] = {}
    for failure in failures:
        by_stage.setdefault(failure["stage"] or "unknown", Counter())[failure_reason(failure["error"])] += 1
    return {stage: dict(counts.most_common(top)) for stage, counts in sorted(by_stage.items())}


def stage_stats(storage: Storage, stages: list[Stage], prints: ShardFingerprints, shards: list[str]) -> dict[str, Any]:
    """Per stage, from the committed markers of the run's shards (so relaunches merge by themselves): shards,
    samples done/failed, seconds, samples/s, the workers that did it and their peak memory."""
    stats = {}
    for stage in stages:
        markers = storage.read_many([(prints.store(stage, shard).folder, "_done", f"{shard}.json") for shard in shards])
        parsed = []
        for data in markers.values():
            try:
                parsed.append(json.loads(data)) if data else None
            except ValueError:
                continue
        seconds = sum(m.get("seconds") or 0.0 for m in parsed)
        done = sum(m["counts"]["done"] for m in parsed if "counts" in m)
        stats[stage.name] = {
            "shards": len(parsed), "done": done, "failed": sum(m["counts"]["failed"] for m in parsed if "counts" in m),
            "seconds": round(seconds, 3), "samples_per_s": round(done / seconds, 3) if seconds else None,
            "workers": sorted({m.get("worker", "?") for m in parsed}),
            "peak_rss_mb": max((m.get("peak_rss_mb") or 0 for m in parsed), default=None),
            "peak_gpu_mb": max((m.get("peak_gpu_mb") or 0 for m in parsed), default=None)}
    return stats
