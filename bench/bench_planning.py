"""Planning at scale: `plan_job` over a large manifest (default 1,000,000 rows), wall time and peak memory.

    python bench/bench_planning.py [--rows 1000000] [--images 1000000] [--shard-size 16] [--content-hash]

Writes N distinct small image files (in folders of 1000) and a JSONL manifest referencing them (setup, not
timed), then plans a bulk-edit job in a fresh process: reading the manifest, resolving paths, stamping
every file (one folder listing per 1000 files), cutting shards and writing the plan. Prints seconds and
peak RSS against the goals (<= 60 s, <= 2 GiB), then the same for a second planning run (all assigned).
With `--content-hash` the same run also plans with every local file identified by the SHA-256 of its bytes
(every file read), and prints this machine's SHA-256 throughput to price real-sized images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAN_ONE = """
import json, resource, sys, time
from bridgecore.batch.job_plan import plan_job
from bridgecore.batch.settings import JobSettings
start = time.perf_counter()
plan = plan_job(sys.argv[1], sys.argv[2], JobSettings(sys.argv[3], sys.argv[4]), shard_size=int(sys.argv[5]),
                content_hash=sys.argv[6] == "1")
print(json.dumps({"seconds": time.perf_counter() - start, "samples": plan.samples, "shards": len(plan.shards),
                  "pending": len(plan.pending),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def write_inputs(folder: Path, rows: int, images: int) -> Path:
    png = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c63f8cf"
                        "c0f01f0005000201e2b0b9f30000000049454e44ae426082")  # a 1x1 PNG
    for index in range(images):
        sub = folder / f"{index // 1000:04d}"
        if index % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{index:07d}.png").write_bytes(png)
    manifest = folder / "manifest.jsonl"
    with manifest.open("w") as handle:
        for row in range(rows):
            image = row % images
            handle.write(json.dumps({"id": f"s{row:07d}", "image": f"{image // 1000:04d}/{image:07d}.png",
                                     "instruction": f"make object {row % 97} blue"}) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=None, help="distinct image files (default: one per row)")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--content-hash", action="store_true", help="also plan with content hashes (a fresh output)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    zoo = build_tiny_zoo(".vision-bridge/tiny-zoo")
    work = Path(tempfile.mkdtemp(prefix="vb-plan-"))
    start = time.perf_counter()
    manifest = write_inputs(work / "in", args.rows, args.images or args.rows)
    print(f"setup: {args.rows} rows, {args.images or args.rows} image files in {time.perf_counter() - start:.0f} s")
    runs = [("first plan", "out", "0"), ("second plan (everything already assigned)", "out", "0")]
    if args.content_hash:
        runs += [("first plan, --content-hash", "out-hashed", "1"), ("second plan, --content-hash", "out-hashed", "1")]
    for label, out, hashed in runs:
        command = [sys.executable, "-c", PLAN_ONE, str(manifest), str(work / out), str(zoo["qwen3-vl"]),
                   str(zoo["qwen-image-edit"]), str(args.shard_size), hashed]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if result.returncode:
            sys.exit(result.stderr[-3000:])
        stats = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{label}: {stats['samples']} samples -> {stats['shards']} shards in {stats['seconds']:.1f} s "
              f"(goal <= 60 s: {stats['seconds'] / 60:.2f}x), peak RSS {stats['peak_rss_gib']:.2f} GiB "
              f"(goal <= 2 GiB: {stats['peak_rss_gib'] / 2:.2f}x)")
    if args.content_hash:
        import hashlib

        block = os.urandom(64 << 20)
        start = time.perf_counter()
        hashlib.sha256(block).hexdigest()
        rate = len(block) / (time.perf_counter() - start) / 2**30
        print(f"SHA-256 on this machine: {rate:.2f} GiB/s of one core; 100,000 images of 1.5 MB (1 MP JPEG/PNG) add "
              f"about {100_000 * 1.5e6 / 2**30 / rate:.0f} s of hashing, plus reading 150 GB from their storage")


if __name__ == "__main__":
    main()
