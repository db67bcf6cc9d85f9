"""Storage and committed shards, locally and on a real S3 server (SeaweedFS on loopback)."""

import io
import threading
import time

import pyarrow.parquet as pq
import pytest

from bridgecore.batch.records import STAGE_TABLE_SCHEMA, Sample, SampleResult
from bridgecore.batch.shard_store import CorruptShardError, ShardStore
from bridgecore.storage import MarkerExistsError, Storage, read_uri

IDS = ["k0", "photo.001", "photo.002"]  # WebDataset would merge the dotted ids if they were keys


def _results(fail=1):
    samples = [Sample(sample_id, (f"/in/{i}.png",), f"edit {i}", f"hash{i}") for i, sample_id in enumerate(IDS)]
    return [SampleResult.failed(s, "bad input") if i < fail else
            SampleResult.done(s, {"safetensors": f"payload-{i}".encode() * 100}, shape=[i, 2])
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
    store = ShardStore(storage, "caches", "fp1")
    assert not store.is_done("shard-a")
    marker = store.commit("shard-a", _results(), {"seconds": 1.5})
    assert store.is_done("shard-a") and marker["counts"] == {"done": 2, "failed": 1} and marker["seconds"] == 1.5
    contents = store.read("shard-a")
    assert contents.payloads == {"photo.001": {"safetensors": b"payload-1" * 100},
                                 "photo.002": {"safetensors": b"payload-2" * 100}}
    assert [r["status"] for r in contents.rows.values()] == ["failed", "done", "done"]
    assert contents.rows["k0"]["error"] == "bad input" and contents.rows["photo.001"]["bytes"] == 900
    # another fingerprint is another folder: a reader never sees it
    assert not ShardStore(storage, "caches", "fp2").is_done("shard-a")


def test_readable_by_webdataset_and_pandas(tmp_path):
    import pandas as pd
    import webdataset as wds

    storage = Storage(str(tmp_path / "out"))
    ShardStore(storage, "caches", "fp").commit("shard-a", _results())
    samples = list(wds.WebDataset(str(tmp_path / "out" / "caches" / "fp" / "data" / "shard-a.tar"), shardshuffle=False))
    assert len(samples) == 2 and samples[0]["safetensors"] == b"payload-1" * 100  # dotted ids stay apart
    table = pd.read_parquet(tmp_path / "out" / "caches" / "fp" / "table")
    assert list(table["id"]) == IDS and list(table["status"]) == ["failed", "done", "done"]


def test_table_schema_is_fixed_whether_samples_pass_or_fail(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    store = ShardStore(storage, "caches", "fp")
    store.commit("all-done", _results(fail=0))
    store.commit("all-failed", _results(fail=3))
    for shard in ("all-done", "all-failed"):
        table = pq.read_table(io.BytesIO(storage.read_bytes("caches", "fp", "table", f"{shard}.parquet")))
        assert table.schema.equals(STAGE_TABLE_SCHEMA, check_metadata=False)


@pytest.mark.parametrize("offset", [600, 1600])  # a tar header byte, a payload byte
def test_corruption_is_detected_not_used(storage, offset):
    store = ShardStore(storage, "caches", "fp")
    store.commit("shard-a", _results())
    data = bytearray(storage.read_bytes("caches", "fp", "data", "shard-a.tar"))
    data[offset] ^= 0xFF
    storage.write_bytes(bytes(data), "caches", "fp", "data", "shard-a.tar")
    with pytest.raises(CorruptShardError, match="checksum mismatch") as raised:
        store.read("shard-a")
    assert raised.value.stage == "caches" and raised.value.shard == "shard-a"
    store.invalidate("shard-a")
    assert not store.is_done("shard-a")


def test_corrupt_file_object_and_garbage_marker_are_detected(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    store = ShardStore(storage, "edits", "fp", layout="files")
    results = _results()
    for result in results:
        result.payloads = {"png": result.payloads["safetensors"]} if result.payloads else {}
    store.commit("shard-a", results)
    key = results[2].sample.key
    storage.write_bytes(b"tampered", "edits", "fp", "data", "shard-a", f"{key}.png")
    with pytest.raises(CorruptShardError, match="photo.002"):
        store.read("shard-a")
    storage.write_bytes(b"\x00garbage", "edits", "fp", "_done", "shard-a.json")
    with pytest.raises(CorruptShardError, match="_done/shard-a.json"):
        store.read("shard-a")


def test_marker_is_exclusive(storage):
    storage.create_marker({"a": 1}, "caches", "x.done")
    with pytest.raises(MarkerExistsError):
        storage.create_marker({"a": 2}, "caches", "x.done")
    assert storage.read_json("caches", "x.done") == {"a": 1}


def test_reads_are_bounded(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * 1000)
    assert read_uri(str(tmp_path / "big.bin"), max_bytes=1000) == b"x" * 1000
    with pytest.raises(ValueError, match="larger than the input limit of 999 bytes"):
        read_uri(str(tmp_path / "big.bin"), max_bytes=999)
    with pytest.raises(ValueError, match="is a device, not a regular file"):
        read_uri("/dev/zero", max_bytes=10_000)  # never read at all


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


def test_the_test_object_store_has_a_volume_for_every_bucket(s3_server):
    """Each test bucket takes one SeaweedFS volume; a disk-sized default let a nearly full CI disk fail late
    S3 tests with InternalError. The count is fixed, whatever the free space."""
    from s3_server import MAX_VOLUMES

    assert s3_server.volume_slots() == MAX_VOLUMES


# -- hostile local outputs: links planted where the job writes ---------------------------------------------


def test_writes_never_follow_links_planted_in_the_output(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious")
    storage = Storage(str(tmp_path / "out"))
    storage.write_bytes(b"first", "edits", "fp", "data", "shard-a", "k0.png")
    data = tmp_path / "out" / "edits" / "fp" / "data" / "shard-a"
    # a data folder replaced by a link to an outside folder: refused, naming the link; the outside untouched
    from bridgecore.storage import UnsafeOutputError

    for child in data.iterdir():
        child.unlink()
    data.rmdir()
    data.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeOutputError, match="shard-a is a symbolic link .* never writes through links"):
        storage.write_bytes(b"second", "edits", "fp", "data", "shard-a", "k0.png")
    with pytest.raises(UnsafeOutputError):
        storage.create_marker({"x": 1}, "edits", "fp", "data", "shard-a", "marker.json")
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"] and victim.read_text() == "precious"
    data.unlink()
    storage.write_bytes(b"second", "edits", "fp", "data", "shard-a", "k0.png")
    assert (data / "k0.png").read_bytes() == b"second"
    # links at the file's own name, at the old predictable temporary names and at a marker's name: never followed
    import os

    (data / "k1.png").symlink_to(victim)
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        (data / f"k2.png.tmp-{pid}").symlink_to(victim)
    storage.write_bytes(b"k1", "edits", "fp", "data", "shard-a", "k1.png")
    storage.write_bytes(b"k2", "edits", "fp", "data", "shard-a", "k2.png")
    assert (data / "k1.png").read_bytes() == b"k1" and not (data / "k1.png").is_symlink()
    (tmp_path / "out" / "edits" / "fp" / "_done").mkdir()
    (tmp_path / "out" / "edits" / "fp" / "_done" / "shard-a.json").symlink_to(victim)
    with pytest.raises(MarkerExistsError):
        storage.create_marker({"x": 1}, "edits", "fp", "_done", "shard-a.json")
    assert victim.read_text() == "precious"
    with pytest.raises(ValueError, match="not a plain path"):
        storage.write_bytes(b"x", "edits", "..", "escape.bin")


def test_a_lease_is_released_only_by_its_holder(tmp_path):
    """Expiry, takeover, and the old holder's late release: the new holder keeps its lease, so a third worker
    finds the shard busy instead of computing it again."""
    import json

    from bridgecore.batch.shard_store import ShardBusyError

    storage = Storage(str(tmp_path / "out"))
    old, new, third = (ShardStore(storage, "caches", "fp") for _ in range(3))
    old.acquire_lease("shard-a", seconds=60)
    lease = tmp_path / "out" / "caches" / "fp" / "_lease" / "shard-a.json"
    record = json.loads(lease.read_text())
    record.update(expires=time.time() - 1, host="another-host")  # the old holder stalled past its lease
    lease.write_text(json.dumps(record))
    new.acquire_lease("shard-a", seconds=60)  # takes over the expired lease
    taken = json.loads(lease.read_text())
    assert taken["token"] != record["token"]
    taken["host"] = "yet-another-host"  # the new holder is another machine, alive
    lease.write_text(json.dumps(taken))
    old.release_lease("shard-a")  # late: must not delete the new holder's lease
    assert json.loads(lease.read_text()) == taken
    with pytest.raises(ShardBusyError):
        third.acquire_lease("shard-a")
    new.release_lease("shard-a")
    assert not lease.exists()


def _race_worker(root: str, rounds: int, start, done, results) -> None:
    """One worker process of the race battery: at each round, takes over the shard's expired lease if it can."""
    from bridgecore.batch.shard_store import ShardBusyError, ShardStore

    store = ShardStore(Storage(root), "caches", "fp")
    for number in range(rounds):
        start.wait()
        try:
            store.acquire_lease(f"shard-{number}", seconds=600)
            results.put((number, 1))
        except ShardBusyError:
            results.put((number, 0))
        done.wait()


@pytest.mark.slow  # processes (a Prefect server / spawned workers): not the in-process tier
def test_lease_takeover_races_leave_exactly_one_holder(tmp_path):
    """The timed race battery: an expired lease and three processes taking it over at the same instant, 200 times.
    Each round exactly one must hold the shard (a read-compare-delete takeover let a second one in: 1 in 200; a rename-aside takeover, 1 in 100)."""
    import json
    import multiprocessing

    rounds, workers = 200, 3
    root = str(tmp_path / "out")
    Storage(root).create_marker({"worker": "gone", "host": "another-host", "pid": 1, "expires": 0, "token": "x"},
                                "caches", "fp", "_lease", "probe.json")  # makes the folders
    folder = tmp_path / "out" / "caches" / "fp" / "_lease"
    for number in range(rounds):  # every round's shard starts with an expired lease of a lost machine
        (folder / f"shard-{number}.json").write_text(json.dumps(
            {"worker": "lost", "host": "another-host", "pid": 1, "expires": time.time() - 1, "token": f"old{number}"},
            sort_keys=True))
    context = multiprocessing.get_context("spawn")
    start, done, results = context.Barrier(workers), context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_race_worker, args=(root, rounds, start, done, results)) for _ in range(workers)]
    for process in processes:
        process.start()
    wins: dict[int, int] = {}
    for _ in range(rounds * workers):
        number, won = results.get(timeout=120)
        wins[number] = wins.get(number, 0) + won
    for process in processes:
        process.join(timeout=60)
    assert all(process.exitcode == 0 for process in processes)
    assert sorted(wins) == list(range(rounds))
    assert {n: count for n, count in wins.items() if count != 1} == {}
    holders = {json.loads((folder / f"shard-{n}.json").read_text())["token"] for n in range(rounds)}
    assert len(holders) == rounds and not any(t.startswith("old") for t in holders)
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]  # nothing left aside


_HOLDER = """
import sys, time
from bridgecore.storage import Storage
from bridgecore.batch.shard_store import ShardStore
store = ShardStore(Storage(sys.argv[1]), "caches", "fp")
with store.leased("shard-a", seconds=float(sys.argv[2])):
    print("holding", flush=True)
    time.sleep(60)  # a shard that computes far longer than its lease
"""


@pytest.mark.slow  # processes (a Prefect server / spawned workers): not the in-process tier
def test_a_computing_holder_keeps_its_lease_and_a_frozen_one_loses_it_within_the_lease(tmp_path):
    """Leases are short and renewed while the shard computes: a live worker on a long shard keeps it past its
    duration, and a frozen (SIGSTOP: the process alive, the machine silent) or lost one loses it within one lease,
    instead of holding the shard for an hour."""
    import signal
    import subprocess
    import sys

    from bridgecore.batch.shard_store import ShardBusyError

    root, seconds = str(tmp_path / "out"), 1.5
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, root, str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        store = ShardStore(Storage(root), "caches", "fp")
        deadline = time.monotonic() + 3 * seconds
        while time.monotonic() < deadline:  # two lease durations and more: still renewed, still busy
            with pytest.raises(ShardBusyError):
                store.acquire_lease("shard-a", seconds=60)
            time.sleep(0.2)
        holder.send_signal(signal.SIGSTOP)  # frozen: its pid is alive, so only the expiry can free the shard
        frozen = time.monotonic()
        while True:
            try:
                store.acquire_lease("shard-a", seconds=60)
                break
            except ShardBusyError:
                assert time.monotonic() - frozen < seconds + 1.0, "the frozen holder's lease was not taken over"
                time.sleep(0.1)
    finally:
        holder.kill()
        holder.wait()
