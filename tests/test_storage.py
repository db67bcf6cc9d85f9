"""Storage and committed shards, locally and on a real S3 server (SeaweedFS on loopback)."""

import io
import threading
import time

import pyarrow.parquet as pq
import pytest

from bridgecore.shard_store import CorruptShardError, SampleRecord, ShardStore
from bridgecore.sharding import Sample
from bridgecore.storage import MarkerExistsError, Storage


def _records(n=3, fail=1):
    samples = [Sample(f"k{i}", [f"/in/{i}.png"], f"edit {i}", f"sha{i}") for i in range(n)]
    return [SampleRecord.failed(s, "bad input") if i < fail else
            SampleRecord(s, "done", payload=f"payload-{i}".encode() * 100, info={"shape": [i, 2]})
            for i, s in enumerate(samples)]


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    root = request.getfixturevalue("s3_root")
    store = Storage(root)
    store.ensure_root()
    return store


def test_commit_and_read_back(storage):
    store = ShardStore(storage, "caches")
    assert not store.is_done("shard-a")
    marker = store.commit("shard-a", _records(), {"qwen3_model": "m"})
    assert store.is_done("shard-a") and marker["counts"] == {"done": 2, "failed": 1}
    assert store.payloads("shard-a") == {"k1": b"payload-1" * 100, "k2": b"payload-2" * 100}
    rows = store.manifest("shard-a")
    assert [r["status"] for r in rows] == ["failed", "done", "done"] and rows[0]["error"] == "bad input"
    assert rows[1]["qwen3_model"] == "m" and rows[1]["bytes"] == 900


def test_readable_by_webdataset_and_pandas(tmp_path):
    import pandas as pd
    import webdataset as wds

    storage = Storage(str(tmp_path / "out"))
    ShardStore(storage, "caches").commit("shard-a", _records())
    samples = list(wds.WebDataset(str(tmp_path / "out" / "caches" / "shard-a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["k1", "k2"] and samples[0]["safetensors"] == b"payload-1" * 100
    assert list(pd.read_parquet(tmp_path / "out" / "caches" / "shard-a.parquet")["key"]) == ["k0", "k1", "k2"]


@pytest.mark.parametrize("offset", [600, 1600])  # a tar header byte, a payload byte
def test_corruption_is_detected_not_used(storage, offset):
    store = ShardStore(storage, "caches")
    store.commit("shard-a", _records())
    data = bytearray(storage.read_bytes("caches", "shard-a.tar"))
    data[offset] ^= 0xFF
    storage.write_bytes(bytes(data), "caches", "shard-a.tar")
    with pytest.raises(CorruptShardError, match="checksum mismatch"):
        store.payloads("shard-a")
    store.invalidate("shard-a")
    assert not store.is_done("shard-a")


def test_corrupt_png_object_is_detected(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    store = ShardStore(storage, "edits", kind="png", extension="png")
    store.commit("shard-a", _records())
    storage.write_bytes(b"tampered", "edits", "shard-a", "k2.png")
    with pytest.raises(CorruptShardError, match="k2"):
        store.payloads("shard-a")


def test_marker_is_exclusive(storage):
    storage.create_marker({"a": 1}, "caches", "x.done")
    with pytest.raises(MarkerExistsError):
        storage.create_marker({"a": 2}, "caches", "x.done")
    assert storage.read_json("caches", "x.done") == {"a": 1}


def test_parquet_manifest_is_plain_parquet(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    ShardStore(storage, "caches").commit("shard-a", _records())
    table = pq.read_table(io.BytesIO(storage.read_bytes("caches", "shard-a.parquet")))
    assert {"key", "source", "content_sha256", "status", "error", "info", "bytes", "sha256"} <= set(table.column_names)


def test_object_store_away_for_a_moment_is_retried(s3_server, s3_root):
    storage = Storage(s3_root)
    storage.ensure_root()
    s3_server.stop()
    restarter = threading.Thread(target=lambda: (time.sleep(2), s3_server.start()))
    restarter.start()
    try:
        storage.write_bytes(b"survives an outage", "objects", "a.bin")  # retried until the server is back
    finally:
        restarter.join()
    assert Storage(s3_root).read_bytes("objects", "a.bin") == b"survives an outage"
