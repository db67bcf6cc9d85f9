"""A run's summary: each sample's final state (done, failed with its stage and reason, or pending), per-stage
statistics from the committed markers, failure reasons grouped; written as runs/<run>/summary.parquet + .json."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

from bridgecore.storage import Storage
from bridgecore.batch.fingerprints import ShardFingerprints, run_id
from bridgecore.batch.job_plan import read_job
from bridgecore.batch.pipelines import get_pipeline
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.shard_store import CorruptShardError
from bridgecore.batch.stage import Stage

logger = logging.getLogger(__name__)


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

    arm = "" if not get_pipeline(pipeline).scored else arm_label({**settings.to_dict(),
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
