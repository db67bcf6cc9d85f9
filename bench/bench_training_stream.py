"""Training at scale from committed caches: memory bounded by the shuffle buffer, not by the data, and the cache
read throughput from local disk and from S3. Prints numbers and ratios; asserts nothing.

    python bench/bench_training_stream.py [--base 32] [--sizes 1000 10000] [--steps 250] [--s3]

1. Builds `--base` real triplets (caches + latents) with the tiny zoo through the training-data pipeline, then
   replicates the committed shards (the samples renamed) up to each size: 1,000 and 10,000 by default.
2. For each size, in a fresh process: trains `--steps` steps streaming from those shards (the held-out set capped
   at `--max-heldout`, read once) and reports the highest RSS while training (sampled every 20 ms, so model
   loading's transient peak is left out); then, for comparison, the RSS of holding every example in memory,
   which is what training did before it streamed.
3. Cache read throughput in samples/s and MB/s: every shard of the smallest size read through the trainer's
   source (checksums verified), from local disk and, with `--s3`, from SeaweedFS on loopback (`weed mini`).

Tiny models on CPU: the flatness and the ratios are the point, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

AREA = 64 * 64


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """The highest resident set size seen while a block runs (sampled every 20 ms): ru_maxrss would also count
    transient peaks of model loading, before the data matter."""

    def __init__(self):
        import threading

        self.peak, self._stop = current_rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, current_rss_mib())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mib())


def settings_for(zoo: Path):
    from bridgecore.batch.settings import JobSettings

    return JobSettings(str(zoo / "qwen3-vl"), str(zoo / "qwen-image-edit"), condition_area=AREA)


def build_base(folder: Path, count: int):
    """`count` triplets' caches and latents committed under `folder/data`; returns (zoo, output, shards)."""
    from bridgecore.batch.training_data import prepare_data
    from bridgecore.zoo.synthetic_triplets import write_triplets
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    zoo = Path(build_tiny_zoo(folder / "zoo")["qwen3-vl"]).parent
    manifest = write_triplets(folder / "triplets", count, seed=0)
    source = prepare_data(str(manifest), str(folder / "data"), settings_for(zoo), shard_size=16)
    return zoo, source.output, source.shards


def replicate(zoo: Path, base_output: str, base_shards: list[str], output: str, count: int,
              shard_size: int = 16) -> list[str]:
    """Commits `count` samples under `output`, copies of the base samples under new ids, `shard_size` a shard."""
    from bridgecore.batch.fingerprints import fingerprints
    from bridgecore.batch.pipelines import STAGES
    from bridgecore.batch.records import Sample, SampleResult
    from bridgecore.batch.stages.outputs import CACHES, LATENTS
    from bridgecore.batch.training_data import PIPELINE
    from bridgecore.storage import Storage

    prints = fingerprints(PIPELINE, settings_for(zoo))
    source, target = Storage(base_output), Storage(output)
    target.ensure_root()
    originals = {}
    for stage in (CACHES.stage, LATENTS.stage):
        store = STAGES[stage].store(source, prints[stage])
        originals[stage] = [(row, contents.payloads[sample_id]) for shard in base_shards
                            for contents in [store.read(shard)] for sample_id, row in contents.rows.items()
                            if row["status"] == "done"]
    shards = []
    for first in range(0, count, shard_size):
        shard = f"copy-{first // shard_size:06d}"
        for stage in (CACHES.stage, LATENTS.stage):
            results = []
            for index in range(first, min(count, first + shard_size)):
                row, payloads = originals[stage][index % len(originals[stage])]
                sample = Sample(f"{row['id']}-copy{index}", tuple(row["images"]), row["instruction"],
                                f"{row['input_hash']}-{index}", row["target"])
                results.append(SampleResult.done(sample, payloads, **json.loads(row["info"])))
            STAGES[stage].store(target, prints[stage]).commit(shard, results)
        shards.append(shard)
    return shards


def child(arguments: argparse.Namespace) -> None:
    """One measurement in a fresh process (peak RSS is per process)."""
    from bridgecore.batch.model_pool import LoadedModels, ModelPool
    from bridgecore.batch.training_data import CommittedShards
    from bridgecore.training.data import read_refs
    from bridgecore.training.trainer import BridgeTrainer, TrainConfig

    zoo = Path(arguments.zoo)
    shards = json.loads(Path(arguments.shards).read_text())
    source = CommittedShards(arguments.output, settings_for(zoo), shards)
    if arguments.child == "read":
        refs = source.refs()
        by_shard: dict[str, set[str]] = {}
        for ref in refs:
            by_shard.setdefault(ref.shard, set()).add(ref.key)
        start, samples = time.perf_counter(), 0
        for shard, keys in by_shard.items():
            samples += len(source.read(shard, keys))
        seconds = time.perf_counter() - start
        print(json.dumps({"samples": samples, "seconds": seconds}))
        return
    pipe = ModelPool(settings_for(zoo), LoadedModels()).editor.pipe
    models_mib = current_rss_mib()
    if arguments.child == "in-memory":
        with RssSampler() as rss:
            examples = read_refs(source, source.refs())
        print(json.dumps({"examples": len(examples), "models_rss_mib": models_mib, "peak_rss_mib": rss.peak}))
        return
    config = TrainConfig(steps=arguments.steps, batch_size=4, eval_every=arguments.steps,
                         checkpoint_every=arguments.steps, max_heldout=arguments.max_heldout, shuffle_buffer=64,
                         gradient_checkpointing=False)
    start = time.perf_counter()
    with RssSampler() as rss:
        metrics = BridgeTrainer(pipe, source, arguments.out, config).train(progress=False)
    print(json.dumps({"examples": metrics["train_examples"] + metrics["heldout_examples"],
                      "heldout": metrics["heldout_examples"], "models_rss_mib": models_mib,
                      "peak_rss_mib": rss.peak, "process_peak_rss_mib": peak_rss_mib(),
                      "seconds": time.perf_counter() - start,
                      "samples_per_s": metrics["samples_per_s"], "data_wait_share": metrics["data_wait_share"]}))


def measure(mode: str, zoo: Path, output: str, shards: list[str], folder: Path, arguments) -> dict:
    listing = folder / f"shards-{len(shards)}.json"
    listing.write_text(json.dumps(shards))
    command = [sys.executable, __file__, "--child", mode, "--zoo", str(zoo), "--output", output, "--shards",
               str(listing), "--out", str(folder / f"ckpt-{mode}-{len(shards)}-{time.time_ns()}"),
               "--steps", str(arguments.steps), "--max-heldout", str(arguments.max_heldout)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise RuntimeError(f"{mode} on {len(shards)} shards failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=32, help="real triplets built with the tiny zoo")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="training set sizes")
    parser.add_argument("--steps", type=int, default=250, help="training steps per size (batch 4)")
    parser.add_argument("--max-heldout", type=int, default=64, help="held-out examples (read once, kept)")
    parser.add_argument("--s3", action="store_true", help="also read the caches from SeaweedFS on loopback")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--child", choices=["train", "in-memory", "read"], help=argparse.SUPPRESS)
    for name in ("--zoo", "--output", "--shards", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        return child(arguments)

    results: dict = {"steps": arguments.steps, "batch_size": 4, "shuffle_buffer": 64,
                     "max_heldout": arguments.max_heldout, "sizes": {}}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        zoo, base_output, base_shards = build_base(folder, arguments.base)
        sets = {}
        for size in arguments.sizes:
            output = str(folder / f"set-{size}")
            sets[size] = (output, replicate(zoo, base_output, base_shards, output, size))
            data_mib = sum(f.stat().st_size for f in Path(output).rglob("*") if f.is_file()) / 2**20
            train = measure("train", zoo, *sets[size], folder, arguments)
            held = measure("in-memory", zoo, *sets[size], folder, arguments)
            results["sizes"][size] = {"data_mib": data_mib, "streaming": train, "in_memory": held}
            print(f"{size:>6} samples ({data_mib:7.1f} MiB of caches+latents): streaming peak RSS "
                  f"{train['peak_rss_mib']:7.1f} MiB ({train['peak_rss_mib'] - train['models_rss_mib']:+.1f} over the "
                  f"loaded models; {train['samples_per_s']:.1f} samples/s, data wait "
                  f"{100 * (train['data_wait_share'] or 0):.0f}%); everything in memory "
                  f"{held['peak_rss_mib']:7.1f} MiB", flush=True)
        smallest, largest = min(sets), max(sets)
        if smallest != largest:
            grow = results["sizes"][largest]["streaming"]["peak_rss_mib"] / results["sizes"][smallest]["streaming"]["peak_rss_mib"]
            held = results["sizes"][largest]["in_memory"]["peak_rss_mib"] / results["sizes"][smallest]["in_memory"]["peak_rss_mib"]
            print(f"peak RSS x{largest / smallest:g} data: streaming x{grow:.2f}, everything in memory x{held:.2f}")
            results["peak_rss_ratio"] = {"streaming": grow, "in_memory": held}

        output, shards = sets[smallest]
        local = measure("read", zoo, output, shards, folder, arguments)
        results["read_local"] = local
        print(f"cache read, local disk: {local['samples'] / local['seconds']:.0f} samples/s "
              f"({results['sizes'][smallest]['data_mib'] / local['seconds']:.1f} MiB/s)")
        if arguments.s3:
            from s3_server import SeaweedServer

            server = SeaweedServer(folder / "seaweed" / "data")
            server.start()
            try:
                os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="test",
                                  AWS_SECRET_ACCESS_KEY="test")
                import s3fs

                s3fs.S3FileSystem().mkdir("bench-training")
                remote = "s3://bench-training/data"
                shards = replicate(zoo, base_output, base_shards, remote, smallest)
                s3 = measure("read", zoo, remote, shards, folder, arguments)
                results["read_s3"] = s3
                print(f"cache read, S3 (SeaweedFS, loopback): {s3['samples'] / s3['seconds']:.0f} samples/s "
                      f"({results['sizes'][smallest]['data_mib'] / s3['seconds']:.1f} MiB/s); "
                      f"local/S3 x{s3['seconds'] / local['seconds']:.1f}")
            finally:
                server.stop()
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
