"""Committed shards of one stage: data objects, a Parquet manifest, and a marker written last.

    STAGE/<shard>.tar       WebDataset tar, one `<key>.<ext>` entry per done sample   (kind "tar")
    STAGE/<shard>/<key>.png one object per done sample                                (kind "png")
    STAGE/<shard>.parquet   one row per sample: key, source, content_sha256, status (done|failed),
                            error, info (shapes, JSON), bytes, sha256, model ids/revisions, ...
    STAGE/<shard>.done      marker: checksums of the manifest and the tar, counts

A shard without its marker does not exist for readers. Reads verify every checksum and raise
`CorruptShardError` on a mismatch; callers recompute such a shard instead of using it.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

from .sharding import Sample
from .storage import MarkerExistsError, Storage, sha256_bytes

MARKER_SUFFIX = ".done"


def worker_id() -> str:
    """Who committed a shard: the worker's name when set (VISION_BRIDGE_WORKER), else host:pid."""
    return os.environ.get("VISION_BRIDGE_WORKER") or f"{socket.gethostname()}:{os.getpid()}"


class CorruptShardError(RuntimeError):
    """A committed shard's objects do not match their recorded checksums."""


@dataclass
class SampleRecord:
    """The outcome of one sample in one stage."""

    sample: Sample
    status: str  # "done" or "failed"
    error: str | None = None
    payload: bytes | None = None
    info: dict[str, Any] = field(default_factory=dict)
    extra_payloads: dict[str, bytes] = field(default_factory=dict)  # more tar entries: extension -> bytes

    @classmethod
    def failed(cls, sample: Sample, error: str) -> "SampleRecord":
        return cls(sample, "failed", error)


class ShardStore:
    """Reads and commits the shards of one stage under a storage root."""

    def __init__(self, storage: Storage, stage: str, kind: str = "tar", extension: str = "safetensors"):
        if kind not in ("tar", "png"):
            raise ValueError(f"kind must be 'tar' or 'png'; got {kind!r}")
        self.storage, self.stage, self.kind, self.extension = storage, stage, kind, extension

    def is_done(self, shard_id: str) -> bool:
        return self.storage.exists(self.stage, shard_id + MARKER_SUFFIX)

    def done_shards(self) -> list[str]:
        return [name[: -len(MARKER_SUFFIX)] for name in self.storage.list(self.stage, suffix=MARKER_SUFFIX)]

    def _tar_bytes(self, records: list[SampleRecord]) -> bytes:
        import webdataset as wds

        buffer = io.BytesIO()
        # No encoder (payloads are bytes already); a fixed mtime makes the tar reproducible byte for byte.
        with wds.TarWriter(buffer, encoder=False, mtime=0.0) as writer:
            for record in records:
                if record.status == "done" and record.payload is not None:
                    writer.write({"__key__": record.sample.key, self.extension: record.payload, **record.extra_payloads})
        return buffer.getvalue()

    def commit(self, shard_id: str, records: list[SampleRecord], common: dict[str, Any] | None = None) -> dict:
        """Writes data, then manifest, then the marker. Returns the marker."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        data_sha = None
        if self.kind == "tar":
            tar = self._tar_bytes(records)
            self.storage.write_bytes(tar, self.stage, shard_id + ".tar")
            data_sha = sha256_bytes(tar)
        else:
            for record in records:
                if record.status == "done" and record.payload is not None:
                    self.storage.write_bytes(record.payload, self.stage, shard_id, f"{record.sample.key}.{self.extension}")
        rows = [{
            "key": r.sample.key, "shard": shard_id, "source": json.dumps(r.sample.images),
            "instruction": r.sample.instruction, "target": r.sample.target, "content_sha256": r.sample.content_sha256,
            "status": r.status, "error": r.error, "info": json.dumps(r.info, sort_keys=True),
            "bytes": len(r.payload) if r.payload is not None else 0,
            "sha256": sha256_bytes(r.payload) if r.payload is not None else None,
            "extra": json.dumps(r.sample.extra, sort_keys=True, default=str),
            **(common or {}),
        } for r in records]
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        manifest = buffer.getvalue()
        self.storage.write_bytes(manifest, self.stage, shard_id + ".parquet")
        counts = {"done": sum(r.status == "done" for r in records), "failed": sum(r.status == "failed" for r in records)}
        marker = {"shard": shard_id, "stage": self.stage, "manifest_sha256": sha256_bytes(manifest), "worker": worker_id(),
                  "data_sha256": data_sha, "counts": counts, "created": time.time()}
        try:
            self.storage.create_marker(marker, self.stage, shard_id + MARKER_SUFFIX)
        except MarkerExistsError:
            pass  # another worker committed the same deterministic shard first: identical content
        return marker

    def marker(self, shard_id: str) -> dict:
        return self.storage.read_json(self.stage, shard_id + MARKER_SUFFIX)

    def manifest(self, shard_id: str, verify: bool = True) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        data = self.storage.read_bytes(self.stage, shard_id + ".parquet")
        if verify and sha256_bytes(data) != self.marker(shard_id)["manifest_sha256"]:
            raise CorruptShardError(f"{self.storage.url(self.stage, shard_id + '.parquet')}: checksum mismatch")
        return pq.read_table(io.BytesIO(data)).to_pylist()

    def payloads(self, shard_id: str, extension: str | None = None) -> dict[str, bytes]:
        """{key: bytes} of the shard's done samples (the `extension` entries of a tar), checksums verified."""
        extension = extension or self.extension
        rows = {row["key"]: row for row in self.manifest(shard_id) if row["status"] == "done" and row["sha256"]}
        if self.kind == "tar":
            data = self.storage.read_bytes(self.stage, shard_id + ".tar")
            if sha256_bytes(data) != self.marker(shard_id)["data_sha256"]:
                raise CorruptShardError(f"{self.storage.url(self.stage, shard_id + '.tar')}: checksum mismatch")
            payloads = {}
            try:
                tar = tarfile.open(fileobj=io.BytesIO(data))
            except tarfile.TarError as error:
                raise CorruptShardError(f"{self.storage.url(self.stage, shard_id + '.tar')}: unreadable tar ({error})") from error
            with tar:
                for member in tar.getmembers():
                    key, _, member_extension = member.name.partition(".")
                    if member_extension == extension:
                        payloads[key] = tar.extractfile(member).read()
            if extension != self.extension:
                return payloads
        else:
            payloads = {key: self.storage.read_bytes(self.stage, shard_id, f"{key}.{self.extension}") for key in rows}
        for key, row in rows.items():
            # A verified tar vouches for its entries; loose objects are checked one by one.
            if key not in payloads or (self.kind != "tar" and sha256_bytes(payloads[key]) != row["sha256"]):
                raise CorruptShardError(f"{self.stage}/{shard_id}: sample {key} is missing or corrupt (checksum mismatch)")
        return payloads

    def invalidate(self, shard_id: str) -> None:
        """Forgets a corrupt shard (removes its marker) so that it is recomputed."""
        path = self.storage.path(self.stage, shard_id + MARKER_SUFFIX)
        if self.storage.fs.exists(path):
            self.storage.fs.rm(path)
