"""Committed shards of one stage under one fingerprint: data, a table, and a marker written last.

    STAGE/FP/settings.json              what FP stands for: the stage's settings and its upstream fingerprints
    STAGE/FP/data/<shard>.tar           layout "tar": WebDataset, one `<key>.<ext>` entry per payload
    STAGE/FP/data/<shard>/<key>.<ext>   layout "files": one object per done sample (e.g. edited PNGs), and a
                                        metadata.parquet (file_name, id, instruction, ...) for `imagefolder`
                                        layout "table": no data objects (e.g. metrics live in the table)
    STAGE/FP/table/<shard>.parquet      one row per sample (records.STAGE_TABLE_SCHEMA), failed ones too
    STAGE/FP/_done/<shard>.json         marker: fingerprint, checksums, counts, timings, worker
    STAGE/FP/_lease/<shard>.json        while a worker computes the shard: who, and until when

FP is the stage's fingerprint (see fingerprints.py): a different setting is a different folder, so settings
coexist in one output and a reader never sees another setting's results. A shard without its marker
does not exist for readers; reads verify every checksum and raise `CorruptShardError`, on which the
executor recomputes the shard.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import tarfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from bridgecore.storage import MarkerExistsError, Storage, sha256_bytes
from bridgecore.batch.records import STAGE_TABLE_SCHEMA, SampleResult, result_row

logger = logging.getLogger(__name__)

LAYOUTS = ("tar", "files", "table")


def worker_id() -> str:
    """Who committed a shard: the worker's name when set (VISION_BRIDGE_WORKER), else host:pid."""
    return os.environ.get("VISION_BRIDGE_WORKER") or f"{socket.gethostname()}:{os.getpid()}"


# A lease lives this long unless its holder renews it (every third of it, from a thread, while the shard computes):
# a lost or frozen machine's shard is taken over within this bound, however long the shard takes to compute.
LEASE_SECONDS = float(os.environ.get("VISION_BRIDGE_LEASE_SECONDS", "180"))


def _lease_is_live(holder: Any) -> bool:
    if not isinstance(holder, dict) or float(holder.get("expires", 0) or 0) <= time.time():
        return False
    if holder.get("worker") == worker_id() and os.environ.get("VISION_BRIDGE_WORKER"):
        return False  # this named worker restarted: its earlier run is gone
    if holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False  # a killed run of this machine
        except (PermissionError, ValueError, TypeError):
            pass
    return holder.get("pid") != os.getpid() or holder.get("host") != socket.gethostname()


class ShardBusyError(RuntimeError):
    """Another worker holds a live lease on the shard: come back later (its result will be committed)."""


class CorruptShardError(RuntimeError):
    """A committed shard (or its plan) is unreadable or does not match its checksums; or it is missing.

    `stage` and `shard` say which one, so that the executor can recompute exactly that.
    """

    def __init__(self, message: str, stage: str, shard: str):
        super().__init__(message)
        self.stage, self.shard = stage, shard


@dataclass
class ShardContents:
    rows: dict[str, dict[str, Any]]  # sample id -> table row
    payloads: dict[str, dict[str, bytes]]  # sample id -> extension -> bytes (done samples)


class ShardStore:
    """Reads and commits the shards of one stage for one fingerprint under a storage root."""

    def __init__(self, storage: Storage, stage: str, fingerprint: str, layout: str = "tar"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
        self.storage, self.stage, self.fingerprint, self.layout = storage, stage, fingerprint, layout
        self.folder = f"{stage}/{fingerprint}"
        self._tokens: dict[str, str] = {}  # shard -> the token of the lease this store holds

    # -- markers --------------------------------------------------------------------------------------------

    def _corrupt(self, shard_id: str, what: str) -> CorruptShardError:
        return CorruptShardError(what, self.stage, shard_id)

    def is_done(self, shard_id: str) -> bool:
        return self.storage.exists(self.folder, "_done", shard_id + ".json")

    def done_shards(self) -> set[str]:
        return {name[: -len(".json")] for name in self.storage.list(self.folder, "_done", suffix=".json")}

    def marker(self, shard_id: str) -> dict[str, Any]:
        """The shard's marker, checked to be one of ours for this fingerprint."""
        url = self.storage.url(self.folder, "_done", shard_id + ".json")
        try:
            marker = self.storage.read_json(self.folder, "_done", shard_id + ".json")
        except FileNotFoundError:
            raise self._corrupt(shard_id, f"{url}: missing (the shard is not committed)") from None
        except ValueError as error:
            raise self._corrupt(shard_id, f"{url}: unreadable marker ({error})") from error
        if not isinstance(marker, dict) or marker.get("fingerprint") != self.fingerprint or "table_sha256" not in marker:
            raise self._corrupt(shard_id, f"{url}: not a marker of fingerprint {self.fingerprint}")
        return marker

    # -- leases: concurrent or resubmitted runs share work instead of doing it twice ---------------------

    def acquire_lease(self, shard_id: str, seconds: float = LEASE_SECONDS) -> None:
        """Takes the shard's lease (exclusive create), or takes over a stale one (expired, unreadable, or held by
        a dead process of this host or by an earlier run of this same named worker); raises `ShardBusyError`
        while another live worker holds it. A lease only saves work: two workers that do compute the same
        shard write identical objects and one marker."""
        token = os.urandom(16).hex()  # what makes this holder's lease its own
        lease = {"worker": worker_id(), "host": socket.gethostname(), "pid": os.getpid(),
                 "expires": time.time() + seconds, "token": token}
        for _ in range(2):
            try:
                self.storage.create_marker(lease, self.folder, "_lease", shard_id + ".json")
                self._tokens[shard_id] = token
                return
            except MarkerExistsError:
                holder = self._lease(shard_id)
                if _lease_is_live(holder):
                    raise ShardBusyError(f"{self.stage}/{shard_id} is being computed by {holder['worker']}") from None
                self._remove_lease_if(shard_id, holder)  # a stale lease: taken over (unless it changed meanwhile)
        raise ShardBusyError(f"{self.stage}/{shard_id}: another worker took the lease first")

    @contextlib.contextmanager
    def leased(self, shard_id: str, seconds: float | None = None):
        """Holds the shard's lease while the block runs, renewing it every third of `seconds` from a daemon thread (a
        frozen or lost holder stops renewing, and its lease expires); released at the end."""
        seconds = LEASE_SECONDS if seconds is None else seconds
        self.acquire_lease(shard_id, seconds)
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(seconds / 3):
                try:
                    if not self.renew_lease(shard_id, seconds):
                        logger.warning("%s/%s: the lease was taken over by another worker; finishing anyway (the "
                                       "same objects and one marker are written)", self.stage, shard_id)
                        return
                except Exception as error:  # noqa: BLE001 - storage away: try again at the next tick
                    logger.warning("%s/%s: could not renew the lease (%s)", self.stage, shard_id, error)

        keeper = threading.Thread(target=keep, name=f"lease-{self.stage}-{shard_id}", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join(timeout=seconds)
            self.release_lease(shard_id)

    def renew_lease(self, shard_id: str, seconds: float = LEASE_SECONDS) -> bool:
        """Pushes this holder's lease `seconds` into the future; False when it is no longer this holder's."""
        token = self._tokens.get(shard_id)
        with self.storage.folder_lock(self.folder, "_lease", shard_id + ".json"):  # no takeover between read and write
            holder = self._lease(shard_id)
            if token is None or not isinstance(holder, dict) or holder.get("token") != token:
                return False
            self.storage.write_json({**holder, "expires": time.time() + seconds}, self.folder, "_lease", shard_id + ".json")
        return True

    def _lease(self, shard_id: str) -> Any:
        try:
            return self.storage.read_json(self.folder, "_lease", shard_id + ".json")
        except (FileNotFoundError, ValueError):
            return None

    def _remove_lease_if(self, shard_id: str, expected: Any) -> bool:
        """Deletes the lease only if it is still `expected`.

        Local storage: read, compare and delete happen under a lock of the lease folder, so two workers taking over
        one stale lease cannot both delete (the second one reads the first one's new lease and stops), and creation
        stays an exclusive link. (An earlier rename-aside-and-put-back let a third worker create a lease in the
        instant the path was empty: 2 holders in about 1 of 100 three-way races.) Object storage has no lock: read,
        compare, delete, a window of one round trip against leases that live for `LEASE_SECONDS`. Either way a
        lost race costs duplicate work, never data: two workers computing one shard write identical objects and one
        marker (exclusive create)."""
        with self.storage.folder_lock(self.folder, "_lease", shard_id + ".json"):
            try:
                current = self.storage.read_json(self.folder, "_lease", shard_id + ".json")
            except FileNotFoundError:
                return False  # never "removed" when missing: a worker may be creating one now (creation takes no lock)
            except ValueError:
                current = None  # unreadable: stale, as `_lease` reads it
            if current != expected:
                return False
            self.storage.remove(self.folder, "_lease", shard_id + ".json")
            return True

    def release_lease(self, shard_id: str) -> None:
        """Gives back this holder's lease; a lease that expired and was taken over by another worker is left to it."""
        token = self._tokens.pop(shard_id, None)
        holder = self._lease(shard_id)
        if token is not None and isinstance(holder, dict) and holder.get("token") == token:
            self._remove_lease_if(shard_id, holder)

    def invalidate(self, shard_id: str) -> None:
        """Forgets a shard (removes its marker) so that it is recomputed; its objects are overwritten then."""
        self.storage.remove(self.folder, "_done", shard_id + ".json")

    # -- writing --------------------------------------------------------------------------------------------

    def _tar_bytes(self, results: list[SampleResult]) -> bytes:
        import webdataset as wds

        buffer = io.BytesIO()
        # No encoder (payloads are bytes already); a fixed mtime makes the tar reproducible byte for byte.
        with wds.TarWriter(buffer, encoder=False, mtime=0.0) as writer:
            for result in results:
                if result.status == "done" and result.payloads:
                    writer.write({"__key__": result.sample.key, **result.payloads})
        return buffer.getvalue()

    def write_settings(self, record: dict[str, Any]) -> None:
        """`settings.json` of this fingerprint, once (identical for every writer)."""
        if not self.storage.exists(self.folder, "settings.json"):
            self.storage.write_json(record, self.folder, "settings.json")

    def _write_file_index(self, shard_id: str, rows: list[dict[str, Any]]) -> None:
        """`metadata.parquet` beside the objects: Hugging Face `imagefolder` joins it on `file_name`, so the edits
        load with their id, instruction and sources (`load_dataset("imagefolder", data_dir=...)`)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        done = [row for row in rows if row["status"] == "done" and row["files"]]
        if not done:
            return
        index = pa.table({"file_name": [f"{r['key']}.{r['files'][0]}" for r in done], "id": [r["id"] for r in done],
                          "instruction": [r["instruction"] for r in done], "images": [r["images"] for r in done],
                          "target": pa.array([r["target"] for r in done], pa.string()),
                          "input_hash": [r["input_hash"] for r in done], "sha256": [r["sha256"] for r in done]})
        buffer = io.BytesIO()
        pq.write_table(index, buffer)
        self.storage.write_bytes(buffer.getvalue(), self.folder, "data", shard_id, "metadata.parquet")

    def commit(self, shard_id: str, results: list[SampleResult], stats: dict[str, Any] | None = None) -> dict:
        """Writes the data, then the table, then the marker (exclusive create). Returns the marker."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        data_sha = None
        if self.layout == "tar" and any(r.status == "done" and r.payloads for r in results):  # never an empty tar
            tar = self._tar_bytes(results)
            self.storage.write_bytes(tar, self.folder, "data", shard_id + ".tar")
            data_sha = sha256_bytes(tar)
        rows = []
        for result in results:
            payloads = result.payloads if result.status == "done" else {}
            if self.layout == "table" and payloads:
                raise ValueError(f"stage {self.stage}: layout 'table' stores no payloads; got {sorted(payloads)}")
            if self.layout == "files" and len(payloads) > 1:
                raise ValueError(f"stage {self.stage}: layout 'files' takes one payload per sample; got {sorted(payloads)}")
            for extension, data in payloads.items():
                if self.layout == "files":
                    self.storage.write_bytes(data, self.folder, "data", shard_id, f"{result.sample.key}.{extension}")
            joined = b"".join(sha256_bytes(payloads[e]).encode() for e in sorted(payloads))
            sha = (sha256_bytes(next(iter(payloads.values()))) if len(payloads) == 1 else sha256_bytes(joined)) if payloads else None
            rows.append(result_row(result, shard_id, self.stage, self.fingerprint, sorted(payloads),
                                   sum(len(d) for d in payloads.values()), sha))
        if self.layout == "files":
            self._write_file_index(shard_id, rows)
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=STAGE_TABLE_SCHEMA), buffer)
        table = buffer.getvalue()
        self.storage.write_bytes(table, self.folder, "table", shard_id + ".parquet")
        counts = {"done": sum(r.status == "done" for r in results), "failed": sum(r.status == "failed" for r in results)}
        marker = {"shard": shard_id, "stage": self.stage, "fingerprint": self.fingerprint, "layout": self.layout,
                  "table_sha256": sha256_bytes(table), "data_sha256": data_sha, "counts": counts,
                  "worker": worker_id(), "committed": time.time(), **(stats or {})}
        try:
            self.storage.create_marker(marker, self.folder, "_done", shard_id + ".json")
        except MarkerExistsError:
            pass  # another worker committed the same deterministic shard first: identical content
        return marker

    # -- reading --------------------------------------------------------------------------------------------

    def table(self, shard_id: str, marker: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        marker = marker or self.marker(shard_id)
        url = self.storage.url(self.folder, "table", shard_id + ".parquet")
        try:
            data = self.storage.read_bytes(self.folder, "table", shard_id + ".parquet")
        except FileNotFoundError:
            raise self._corrupt(shard_id, f"{url}: missing") from None
        if sha256_bytes(data) != marker["table_sha256"]:
            raise self._corrupt(shard_id, f"{url}: checksum mismatch")
        return pq.read_table(io.BytesIO(data)).to_pylist()

    def _tar_payloads(self, shard_id: str, marker: dict[str, Any]) -> dict[str, dict[str, bytes]]:
        if marker["data_sha256"] is None:  # no sample was done: no tar was written
            return {}
        url = self.storage.url(self.folder, "data", shard_id + ".tar")
        try:
            data = self.storage.read_bytes(self.folder, "data", shard_id + ".tar")
        except FileNotFoundError:
            raise self._corrupt(shard_id, f"{url}: missing") from None
        if sha256_bytes(data) != marker["data_sha256"]:
            raise self._corrupt(shard_id, f"{url}: checksum mismatch")
        payloads: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                payloads.setdefault(key, {})[extension] = tar.extractfile(member).read()
        return payloads

    def read(self, shard_id: str) -> ShardContents:
        """The shard's rows and the payloads of its done samples, every checksum verified."""
        marker = self.marker(shard_id)
        rows = {row["id"]: row for row in self.table(shard_id, marker)}
        by_key = self._tar_payloads(shard_id, marker) if self.layout == "tar" else {}
        payloads = {}
        for sample_id, row in rows.items():
            if row["status"] != "done" or not row["files"]:
                continue
            if self.layout == "files":
                (extension,) = row["files"]
                try:
                    data = self.storage.read_bytes(self.folder, "data", shard_id, f"{row['key']}.{extension}")
                except FileNotFoundError:
                    data = b""
                if sha256_bytes(data) != row["sha256"]:
                    raise self._corrupt(shard_id, f"{self.stage}/{shard_id}: sample {sample_id!r} is missing or corrupt")
                payloads[sample_id] = {extension: data}
            else:
                entry = by_key.get(row["key"], {})
                if sorted(entry) != sorted(row["files"]):
                    raise self._corrupt(shard_id, f"{self.stage}/{shard_id}: sample {sample_id!r} is missing from the tar")
                payloads[sample_id] = entry
        return ShardContents(rows, payloads)

    def check_files(self, shard_id: str, rows: list[dict[str, Any]], full: bool = False) -> None:
        """Layout "files": every done sample's object exists with its recorded size (one listing), and with
        `full`, its checksum. Layout "tar" (a stage whose outputs users read, e.g. edits as a WebDataset): the tar
        exists, and with `full` matches the marker's checksum. Raises `CorruptShardError` naming the damage."""
        if self.layout == "tar" and any(row["status"] == "done" and row["files"] for row in rows):
            if full:
                self._tar_payloads(shard_id, self.marker(shard_id))  # reads it, checksum verified
            elif not self.storage.exists(self.folder, "data", shard_id + ".tar"):
                raise self._corrupt(shard_id, f"{self.storage.url(self.folder, 'data', shard_id + '.tar')}: missing")
            return
        if self.layout != "files":
            return
        sizes = self.storage.sizes(self.folder, "data", shard_id)
        for row in rows:
            if row["status"] != "done" or not row["files"]:
                continue
            name = f"{row['key']}.{row['files'][0]}"
            damaged = sizes.get(name) != row["bytes"] or (
                full and sha256_bytes(self.storage.read_bytes(self.folder, "data", shard_id, name)) != row["sha256"])
            if damaged:
                raise self._corrupt(shard_id, f"{self.storage.url(self.folder, 'data', shard_id, name)}: "
                                              f"sample {row['id']!r} is missing or corrupt")

    def file_url(self, shard_id: str, row: dict[str, Any]) -> str | None:
        """Where a done sample's image lives: its object (layout "files"), or its member of the shard's tar as an
        fsspec URL (`tar://<key>.png::<tar URL>`: `fsspec.open` and `load_image` read it as they read a file)."""
        if row["status"] != "done" or not row["files"]:
            return None
        if self.layout == "files":
            return self.storage.url(self.folder, "data", shard_id, f"{row['key']}.{row['files'][0]}")
        if self.layout == "tar" and "png" in row["files"]:
            return f"tar://{row['key']}.png::{self.storage.url(self.folder, 'data', shard_id + '.tar')}"
        return None
