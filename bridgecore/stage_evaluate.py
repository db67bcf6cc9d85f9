"""Stage 4, evaluate: per-sample metrics of an edits shard (`metrics/`), and the run summary.

Benchmark samples (a `capability` column, from `make-benchmark`) get their capability metrics (OCR,
spatial, detail, multi-image); every sample also gets generic ones: PSNR of the edit against the
target (when it has one) and against the source, and the mean absolute change.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

from .capability_metrics import psnr, score_sample
from .images import ImageLoadError, load_image
from .shard_store import SampleRecord, ShardStore
from .stage_edit import STAGE as EDIT_STAGE
from .stage_extract import load_plan
from .storage import Storage

STAGE = "metrics"
STAGES = ("caches", "fused", "edits", "metrics")


def _metrics(edited: Image.Image, source: Image.Image, target: Image.Image | None) -> dict[str, float]:
    edited_array = np.asarray(edited)
    source_array = np.asarray(source.resize(edited.size, Image.BICUBIC))
    values = {"psnr_vs_source": psnr(edited_array, source_array),
              "mean_abs_change": float(np.abs(edited_array.astype(float) - source_array).mean() / 255)}
    if target is not None:
        values["psnr_vs_target"] = psnr(edited_array, np.asarray(target.resize(edited.size, Image.BICUBIC)))
    return values


def evaluate_shard(storage: Storage, shard_id: str) -> dict:
    store = ShardStore(storage, STAGE)
    if store.is_done(shard_id):
        return {**store.marker(shard_id), "skipped": True}
    edits = ShardStore(storage, EDIT_STAGE, kind="png", extension="png")
    rows = {row["key"]: row for row in edits.manifest(shard_id)}
    payloads = edits.payloads(shard_id)
    records = []
    for sample in load_plan(storage, shard_id):
        if rows[sample.key]["status"] != "done":
            records.append(SampleRecord.failed(sample, rows[sample.key]["error"]))
            continue
        try:
            edited = Image.open(io.BytesIO(payloads[sample.key])).convert("RGB")
            target = load_image(sample.target) if sample.target else None
            sources = [load_image(uri) for uri in sample.images]
            metrics = _metrics(edited, sources[0], target)
            if sample.extra.get("capability") and target is not None:
                meta = {**sample.extra, "id": sample.key, "instruction": sample.instruction}
                metrics.update(score_sample(meta, edited, sources, target), capability=sample.extra["capability"])
            records.append(SampleRecord(sample, "done", info=metrics))
        except ImageLoadError as error:
            records.append(SampleRecord.failed(sample, f"evaluation failed: {error}"))
    return store.commit(shard_id, records)


def summarize(storage: Storage, shard_ids: list[str], last_stage: str = "metrics") -> dict[str, Any]:
    """Each sample's final state (done, or failed with the stage and reason); writes summary.parquet/json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for shard_id in shard_ids:
        for sample in load_plan(storage, shard_id):
            rows.append({"key": sample.key, "shard": shard_id, "status": "pending", "error": None, "stage": None,
                         "output": None, "metrics": None})
        by_key = {row["key"]: row for row in rows if row["shard"] == shard_id}
        for stage in STAGES[: STAGES.index(last_stage) + 1]:
            store = ShardStore(storage, stage)
            if not store.is_done(shard_id):
                break
            for entry in store.manifest(shard_id):
                row = by_key[entry["key"]]
                if row["status"] == "failed":
                    continue
                row["status"], row["stage"] = entry["status"], stage
                if entry["status"] == "failed":
                    row["error"] = entry["error"]
                if stage == "edits" and entry["status"] == "done":
                    row["output"] = storage.url("edits", shard_id, f"{entry['key']}.png")
                if stage == "metrics" and entry["status"] == "done":
                    row["metrics"] = entry["info"]
        for row in by_key.values():
            if row["status"] == "done" and row["stage"] != last_stage:
                row["status"] = "pending"
    # A sample retried in a later shard (--retry-failed) keeps its best outcome.
    rank = {"done": 2, "pending": 1, "failed": 0}
    best: dict[str, dict] = {}
    for row in rows:
        if row["key"] not in best or rank[row["status"]] > rank[best[row["key"]]["status"]]:
            best[row["key"]] = row
    rows = list(best.values())
    counts = {state: sum(r["status"] == state for r in rows) for state in ("done", "failed", "pending")}
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())}), buffer)
    storage.write_bytes(buffer.getvalue(), "summary.parquet")
    summary = {"counts": counts, "shards": len(shard_ids),
               "failures": [{"key": r["key"], "stage": r["stage"], "error": r["error"]} for r in rows if r["status"] == "failed"]}
    capabilities: dict[str, list[float]] = {}
    for row in rows:
        metrics = json.loads(row["metrics"]) if row["metrics"] else {}
        if "capability" in metrics:
            capabilities.setdefault(metrics["capability"], []).append(metrics["edit_success"])
    summary["capabilities"] = {name: {"samples": len(values), "edit_success": float(np.mean(values))}
                               for name, values in sorted(capabilities.items())}
    storage.write_bytes(json.dumps(summary, indent=1).encode(), "summary.json")
    return summary
