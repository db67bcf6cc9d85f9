"""Batch pipeline costs. Prints numbers and ratios; asserts nothing.

    python bench/bench_pipeline.py [--samples 32] [--shard-size 16] [--s3]

1. cache shard write+read MB/s vs a raw fsspec copy of the same bytes (local; SeaweedFS with --s3,
   which starts `weed mini` on loopback);
2. Prefect overhead per shard: the `process-shards` flow vs the same stage calls without Prefect;
3. second run of a finished job vs the first;
4. work (model forwards) after a kill at 50% plus the rerun, vs an uninterrupted run.
Tiny models on CPU: the ratios, not the absolute times, are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_manifest(folder: Path, count: int) -> str:
    from conftest import make_image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        make_image(200, 120, i % 13).resize((200 + i, 120)).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "instruction": f"make shape {i} blue"})
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(folder / "manifest.jsonl")


def storage_throughput(root: str, payload_mib: int = 64) -> tuple[float, float]:
    """(cache shard MB/s, raw copy MB/s) for writing then reading `payload_mib` of cache-like blobs."""
    import fsspec

    from bridgecore.batch.records import Sample, SampleResult
    from bridgecore.batch.shard_store import ShardStore
    from bridgecore.storage import Storage

    storage = Storage(root)
    storage.ensure_root()
    blob = os.urandom(1 << 20)
    records = [SampleResult.done(Sample(f"k{i:04d}", (), "", ""), {"safetensors": blob}) for i in range(payload_mib)]
    start = time.perf_counter()
    ShardStore(storage, "bench", "fp").commit("shard-x", records)
    ShardStore(storage, "bench", "fp").read("shard-x")
    cache_s = time.perf_counter() - start
    raw = b"".join(r.payloads["safetensors"] for r in records)
    fs, path = fsspec.core.url_to_fs(storage.url("raw.bin"))
    start = time.perf_counter()
    fs.pipe_file(path, raw)
    fs.cat_file(path)
    raw_s = time.perf_counter() - start
    return 2 * payload_mib / cache_s, 2 * payload_mib / raw_s


def run_direct(output: str, shards: list[str], settings) -> tuple[float, int]:
    """(seconds, model forwards) of one run, which loads its own models as a flow run does."""
    from bridgecore.batch.executor import run_pipeline

    start = time.perf_counter()
    counts = run_pipeline(output, "bulk-edit", shards, settings, progress=False)
    return time.perf_counter() - start, counts["vlm_forwards"] + counts["dit_calls"]


def gray_image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (120, 120, 120))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--s3", action="store_true", help="also measure on SeaweedFS (weed mini on loopback)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vb-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # 1. storage (a first small round pays the imports)
    storage_throughput(str(work / "warmup"), 1)
    cache, raw = storage_throughput(str(work / "store"))
    print(f"1. local storage: cache shard {cache:.0f} MB/s vs raw copy {raw:.0f} MB/s -> {cache / raw:.0%}")
    if args.s3:
        from s3_server import SeaweedServer

        server = SeaweedServer(work / "weed")
        server.start()
        os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="b", AWS_SECRET_ACCESS_KEY="b")
        try:
            storage_throughput("s3://warmup", 1)
            cache, raw = storage_throughput("s3://bench")
            print(f"   SeaweedFS:     cache shard {cache:.0f} MB/s vs raw copy {raw:.0f} MB/s -> {cache / raw:.0%}")
        finally:
            server.stop()

    from bridgecore.batch.job_plan import plan_job
    from bridgecore.batch.model_pool import ModelPool
    from bridgecore.batch.settings import JobSettings
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    zoo = build_tiny_zoo(".vision-bridge/tiny-zoo")
    settings = JobSettings(str(zoo["qwen3-vl"]), str(zoo["qwen-image-edit"]), condition_area=64 * 64, steps=4)
    manifest = make_manifest(work / "in", args.samples)
    ModelPool(settings).extractor.extract(gray_image(), "warm up")  # file caches warm: the runs load from memory

    # 2. Prefect overhead
    direct_plan = plan_job(manifest, str(work / "direct"), settings, shard_size=args.shard_size)
    direct_s, _ = run_direct(str(work / "direct"), direct_plan.pending, settings)
    from vision_bridge.flows.process_shards import process_shards

    process_shards(str(work / "flow"), [], settings.to_dict())  # starts the ephemeral Prefect server
    flow_plan = plan_job(manifest, str(work / "flow"), settings, shard_size=args.shard_size)
    start = time.perf_counter()
    process_shards(str(work / "flow"), flow_plan.pending, settings.to_dict())
    flow_s = time.perf_counter() - start
    shards = len(direct_plan.shards)
    print(f"2. Prefect: {flow_s / shards:.2f} s/shard in the flow vs {direct_s / shards:.2f} s/shard direct "
          f"(shard size {args.shard_size}) -> overhead {(flow_s - direct_s) / direct_s:+.1%}")

    # 3. second run of a finished job
    start = time.perf_counter()
    again = plan_job(manifest, str(work / "flow"), settings, shard_size=args.shard_size)
    process_shards(str(work / "flow"), again.pending, settings.to_dict())
    second_s = time.perf_counter() - start
    print(f"3. rerun of the finished job: {second_s:.2f} s vs first {flow_s:.2f} s -> {second_s / flow_s:.3f}x")

    # 4. kill at 50%: the in-flight shard's work is lost, committed shards are not redone
    kill_shard_size = max(1, args.samples // 16)  # 16 shards: at most one shard's work is lost to the kill
    full_plan = plan_job(manifest, str(work / "full"), settings, shard_size=kill_shard_size)
    _, uninterrupted = run_direct(str(work / "full"), full_plan.pending, settings)
    killed_plan = plan_job(manifest, str(work / "killed"), settings, shard_size=kill_shard_size)
    half = len(killed_plan.pending) // 2
    _, before_kill = run_direct(str(work / "killed"), killed_plan.pending[:half], settings)
    # The shard in flight when the kill came: all its work is lost (an upper bound), done in a scratch root.
    in_flight = killed_plan.pending[half]
    plan_job(manifest, str(work / "scratch"), settings, shard_size=kill_shard_size)
    _, lost = run_direct(str(work / "scratch"), [in_flight], settings)
    rerun_plan = plan_job(manifest, str(work / "killed"), settings, shard_size=kill_shard_size)
    _, after_kill = run_direct(str(work / "killed"), rerun_plan.pending, settings)
    killed_total = before_kill + lost + after_kill
    print(f"4. kill at 50% ({len(full_plan.shards)} shards of {kill_shard_size}, the in-flight shard lost whole) "
          f"+ rerun: {killed_total} model forwards vs {uninterrupted} uninterrupted -> {killed_total / uninterrupted:.2f}x")

if __name__ == "__main__":
    main()
