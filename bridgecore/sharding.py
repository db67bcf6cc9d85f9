"""Inputs -> samples -> deterministic shards.

Inputs are a folder or glob of images with one instruction for all, or a manifest (CSV, JSONL or
Parquet) with columns `image` (or `images`, a list, for multi-image), `instruction`, optional `target`
and `id`, plus any extra columns (kept in the sample's `extra`). Relative paths resolve against the
manifest's folder; an entry escaping it (`../`) becomes a failed sample with that reason.

A sample's `key` is its `id` or a content hash; its `content_sha256` covers the image bytes and the
instruction, so a changed input is a new sample. Pending samples (not already done) are sorted by key
and cut into shards of `shard_size`; a shard's id hashes its members, so the same pending set always
gives the same shards, whatever ran before.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import fsspec

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".parquet")
_KNOWN_COLUMNS = {"id", "image", "images", "instruction", "target"}


@dataclass
class Sample:
    """One edit request: its images (URIs), instruction, optional target, and where it came from."""

    key: str
    images: list[str]
    instruction: str
    content_sha256: str
    target: str | None = None
    error: str | None = None  # set when the sample is already known to be bad (e.g. escapes the root)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "Sample":
        return cls(**value)


def _read_rows(url: str) -> list[dict[str, Any]]:
    with fsspec.open(url, "rb") as handle:
        data = handle.read()
    if url.endswith(".jsonl"):
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    if url.endswith(".csv"):
        import csv

        return list(csv.DictReader(io.StringIO(data.decode())))
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data)).to_pylist()


def _resolve(root: str, reference: str) -> tuple[str, str | None]:
    """(absolute URI, error) of a manifest reference; relative references must stay under `root`."""
    if "://" in reference or reference.startswith("/"):
        return reference, None
    joined = posixpath.normpath(posixpath.join(root.split("://", 1)[-1], reference))
    base = posixpath.normpath(root.split("://", 1)[-1])
    if not (joined == base or joined.startswith(base.rstrip("/") + "/")):
        return reference, f"path {reference!r} points outside the input root {root}"
    scheme = root.split("://", 1)[0] + "://" if "://" in root else ""
    return scheme + joined, None


def _image_list(row: dict[str, Any]) -> list[str]:
    if row.get("images") not in (None, ""):
        images = row["images"]
        if isinstance(images, str):
            images = json.loads(images) if images.strip().startswith("[") else images.split("|")
        return [str(i) for i in images]
    if row.get("image") in (None, ""):
        raise ValueError("row has neither 'image' nor 'images'")
    return [str(row["image"])]


def content_hash(images: Iterable[str], instruction: str) -> str:
    """sha256 over the image bytes and the instruction; an unreadable image hashes its URI instead."""
    digest = hashlib.sha256()
    for uri in images:
        try:
            with fsspec.open(uri, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
        except Exception:  # noqa: BLE001 - any backend error means unreadable; extraction reports why
            digest.update(f"unreadable:{uri}".encode())
    digest.update(instruction.encode())
    return digest.hexdigest()


def _make_sample(images: list[str], instruction: str, target: str | None, given_id: str | None,
                 error: str | None, extra: dict[str, Any]) -> Sample:
    sha = content_hash(images if error is None else [], instruction + "\0".join(images))
    key = str(given_id) if given_id not in (None, "") else sha[:20]
    return Sample(key, images, instruction, sha, target, error, extra)


def read_inputs(source: str, prompt: str | None = None) -> list[Sample]:
    """Samples from a manifest, or from a folder/glob of images with one `prompt` for all."""
    source = str(source).rstrip("/")
    if source.endswith(MANIFEST_EXTENSIONS):
        root = posixpath.dirname(source)
        samples = []
        for number, row in enumerate(_read_rows(source)):
            instruction = row.get("instruction", prompt)
            if instruction is None:
                raise ValueError(f"{source} row {number}: no 'instruction' and no --prompt given")
            resolved, errors = [], []
            for reference in _image_list(row):
                uri, error = _resolve(root, reference)
                resolved.append(uri)
                errors.extend([error] if error else [])
            target = row.get("target")
            if target not in (None, ""):
                target, target_error = _resolve(root, str(target))
                errors.extend([target_error] if target_error else [])
            extra = {k: v for k, v in row.items() if k not in _KNOWN_COLUMNS}
            samples.append(_make_sample(resolved, str(instruction), target or None,
                                        row.get("id"), "; ".join(errors) or None, extra))
    else:
        if prompt is None:
            raise ValueError(f"input {source!r} is a folder or glob of images: give the instruction with --prompt "
                             "(or use a manifest .csv/.jsonl/.parquet with an 'instruction' column)")
        fs, path = fsspec.core.url_to_fs(source)
        pattern = path if any(c in path for c in "*?[") else posixpath.join(path, "**")
        scheme = source.split("://", 1)[0] + "://" if "://" in source else ""
        files = sorted(p for p in fs.glob(pattern) if p.lower().endswith(IMAGE_EXTENSIONS))
        samples = [_make_sample([scheme + p], prompt, None, None, None, {}) for p in files]
    if not samples:
        raise ValueError(f"no samples found in {source!r}")
    keys = [s.key for s in samples]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate sample ids in {source!r}: {duplicates[:5]}")
    return samples


def shard_id_for(samples: list[Sample]) -> str:
    digest = hashlib.sha256("\n".join(f"{s.key}:{s.content_sha256}" for s in samples).encode())
    return "shard-" + digest.hexdigest()[:16]


def plan_shards(samples: list[Sample], shard_size: int, done: set[tuple[str, str]] | None = None) -> dict[str, list[Sample]]:
    """Shards of the samples not in `done` ({(key, content_sha256)}), `shard_size` each, sorted by key."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}")
    done = done or set()
    pending = sorted((s for s in samples if (s.key, s.content_sha256) not in done), key=lambda s: s.key)
    chunks = [pending[i:i + shard_size] for i in range(0, len(pending), shard_size)]
    return {shard_id_for(chunk): chunk for chunk in chunks}


def sample_seed(job_seed: int, key: str) -> int:
    """The noise seed of one sample: depends on the job seed and the sample, not on shard or worker."""
    return int.from_bytes(hashlib.sha256(f"{job_seed}:{key}".encode()).digest()[:4], "little")
