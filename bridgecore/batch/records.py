"""One sample, one outcome, one row schema: the shapes a sample takes from manifest row to scored edit.

A `Sample` is what the user asked for (its `id` exactly as given). Inside tars and object names it is
known by `key`, a storage-safe form of the id (WebDataset splits keys at the first dot, and an id must
never become a path). Every stage writes one row per sample with the same Arrow schema, whether the
sample passed or failed, so stock readers (pyarrow.dataset, pandas, duckdb, datasets) can concatenate
the tables of any shards.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def storage_key(sample_id: str) -> str:
    """The id itself when it is short and made of `[A-Za-z0-9_-]`; otherwise a readable prefix plus a hash.

    Injective: escaped keys always contain `~`, which a safe id never does. Never contains `.`, `/` or NUL.
    """
    if _SAFE_KEY.fullmatch(sample_id):
        return sample_id
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", sample_id)[:40]
    return f"{readable}~{hashlib.sha256(sample_id.encode()).hexdigest()[:16]}"


@dataclass(frozen=True, slots=True)
class Sample:
    """One edit request.

    Args:
        id: the manifest's `id`, or a hash of the inputs when it has none.
        images: URIs of the condition images (several for Edit-Plus).
        instruction: the edit instruction.
        input_hash: identity of the inputs (image URIs with their size and modification stamp, the
            instruction, the target): a changed input is a new sample.
        target: URI of the expected result, when known (training, benchmarks).
        error: set when the sample is known to be bad before any stage runs (e.g. escapes the input root).
        extra: the manifest's other columns.
        references: URIs of reference pictures only Qwen3-VL reads (column `reference_images`): the DiT's own
            conditioning never sees them, so only a bridge trained for them carries them into the edit.
    """

    id: str
    images: tuple[str, ...]
    instruction: str
    input_hash: str
    target: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    references: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return storage_key(self.id)

    @property
    def multi_image(self) -> bool:
        return len(self.images) > 1

    def to_dict(self) -> dict[str, Any]:
        value = {"id": self.id, "images": list(self.images), "instruction": self.instruction,
                 "input_hash": self.input_hash, "target": self.target, "error": self.error, "extra": self.extra}
        if self.references:  # absent otherwise: plans written before references read the same
            value["references"] = list(self.references)
        return value

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "Sample":
        return cls(value["id"], tuple(value["images"]), value["instruction"], value["input_hash"],
                   value.get("target"), value.get("error"), value.get("extra") or {}, tuple(value.get("references") or ()))


# A shard's route: "multi" when it holds a multi-image sample (those an Edit-Plus `plus_model` takes), else
# "single". New shards hold one route only, so each route is fingerprinted by its own pipeline.
ROUTES = ("single", "multi")


def shard_route(samples: list[Sample]) -> str:
    return "multi" if any(sample.multi_image for sample in samples) else "single"


@dataclass
class SampleResult:
    """The outcome of one sample in one stage: `done` with its payload(s), or `failed` with the reason."""

    sample: Sample
    status: str  # "done" or "failed"
    error: str | None = None
    payloads: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes (one tar entry / object each)
    info: dict[str, Any] = field(default_factory=dict)  # small JSON-able facts (shapes, metrics)

    @classmethod
    def failed(cls, sample: Sample, error: str) -> "SampleResult":
        return cls(sample, "failed", error)

    @classmethod
    def done(cls, sample: Sample, payloads: dict[str, bytes] | None = None, **info: Any) -> "SampleResult":
        return cls(sample, "done", None, payloads or {}, info)


# The table every stage writes per shard. Types are fixed: `error` is a string even in clean shards.
STAGE_TABLE_SCHEMA = pa.schema([
    ("id", pa.string()), ("key", pa.string()), ("shard", pa.string()), ("stage", pa.string()),
    ("fingerprint", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("images", pa.list_(pa.string())), ("instruction", pa.string()), ("target", pa.string()),
    ("input_hash", pa.string()), ("info", pa.string()), ("files", pa.list_(pa.string())),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("extra", pa.string()),
])


def result_row(result: SampleResult, shard: str, stage: str, fingerprint: str, files: list[str], size: int,
               sha256: str | None) -> dict[str, Any]:
    sample = result.sample
    return {"id": sample.id, "key": sample.key, "shard": shard, "stage": stage, "fingerprint": fingerprint,
            "status": result.status, "error": result.error, "images": list(sample.images),
            "instruction": sample.instruction, "target": sample.target, "input_hash": sample.input_hash,
            "info": json.dumps(result.info, sort_keys=True, default=float), "files": files, "bytes": size,
            "sha256": sha256, "extra": json.dumps(sample.extra, sort_keys=True, default=str)}
