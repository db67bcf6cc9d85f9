"""Training the bridge from the pipeline's data: (caches, condition latents, target latents) per triplet, all cached.

`--data` is either a manifest with a `target` column (the batch pipeline's format; the evaluation
benchmark writes one) or an output location written by `build-caches`. Both go through the batch
executor's `training-data` pipeline (stages `caches` and `latents`): committed shards are reused under
the same settings, so training itself never runs a VLM when caches exist.

`CommittedShards` is the trainer's `ExampleSource` over those shards, local or on object storage: which
examples exist comes from the stage tables (small), the payloads are read shard by shard as the data
streams need them. `run_training` trains in this process, or on N local GPUs (`nproc_per_node`): it
prepares the data once, then launches one rank per GPU through torch's elastic launcher (what `torchrun`
runs), each rank loading the frozen DiT and reading only its own data streams.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from bridgecore.batch.executor import run_pipeline
from bridgecore.batch.fingerprints import fingerprints
from bridgecore.batch.job_plan import JOBS, plan_job, read_job
from bridgecore.batch.pipelines import STAGES
from bridgecore.batch.model_pool import LoadedModels, ModelPool
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.sharding import CACHE_SHARD_SIZE
from bridgecore.batch.stages.outputs import CACHES, LATENTS, StageOutput
from bridgecore.model.bridge import BridgeConfig
from bridgecore.storage import Storage
from bridgecore.training.data import ExampleRef, read_refs
from bridgecore.training.examples import TrainingExample
from bridgecore.training.trainer import BridgeTrainer, Ranks, TrainConfig

logger = logging.getLogger(__name__)
PIPELINE = "training-data"


def _is_manifest(uri: str) -> bool:
    return uri.rstrip("/").lower().endswith((".csv", ".jsonl", ".parquet"))


def _latest_job(storage: Storage, data_uri: str) -> str:
    """The most recent job planned in a build-caches output (its sample list)."""
    jobs = storage.list(JOBS, suffix=".parquet")
    if not jobs:
        raise ValueError(f"{data_uri}: no planned jobs (expected a build-caches output or a manifest)")
    newest = max(jobs, key=lambda name: storage.mtime_and_size(JOBS, name)[0] or 0)
    return newest[: -len(".parquet")]


class CommittedShards:
    """The training examples committed by the `training-data` pipeline under `output`: an `ExampleSource`.

    Constructed from plain values, so every rank of a distributed run builds its own. Refuses bad data before
    training (from the tables alone): triplets whose target size differs from the source; samples that failed
    are skipped with a warning.
    """

    def __init__(self, output: str, settings: JobSettings, shards: list[str]):
        self.output, self.settings, self.shards = output, settings, sorted(shards)
        self.prints = fingerprints(PIPELINE, settings)
        self._stores: tuple[int, dict] | None = None
        self._refs: list[ExampleRef] | None = None

    def _store(self, output: StageOutput):
        """The stage's shard store, opened in this process: a DataLoader worker forked from the trainer must not use
        the parent's filesystem object (s3fs's event loop is not fork-safe)."""
        import os

        if self._stores is None or self._stores[0] != os.getpid():
            storage = Storage(self.output)
            self._stores = (os.getpid(), {stage: STAGES[stage].store(storage, self.prints[stage])
                                          for stage in (CACHES.stage, LATENTS.stage)})
        return self._stores[1][output.stage]

    @property
    def caches(self):
        return self._store(CACHES)

    @property
    def latents(self):
        return self._store(LATENTS)

    def refs(self) -> list[ExampleRef]:
        import json

        if self._refs is not None:
            return list(self._refs)
        problems, refs = [], []
        for shard in self.shards:
            caches = {row["id"]: row for row in self.caches.table(shard)}
            for row in self.latents.table(shard):
                cache_row = caches.get(row["id"])
                if cache_row is None or cache_row["status"] != "done" or row["status"] != "done":
                    problems.append(f"{row['id']}: {(cache_row or {}).get('error') or row['error']}")
                    continue
                info = json.loads(row["info"])
                hw = tuple(info["latent_hw"])
                condition_hw = tuple(tuple(g) for g in info.get("condition_hw", [])) or (hw,)
                refs.append(ExampleRef(shard, row["id"], (hw, condition_hw), len(row["images"])))
        size_problems = [p for p in problems if "differs from source" in p]
        if size_problems:
            raise ValueError("triplets whose target size differs from the source: " + "; ".join(size_problems[:10]))
        if problems:
            logger.warning("%d samples are not usable for training: %s", len(problems), "; ".join(problems[:5]))
        if not refs:
            raise ValueError(f"no usable training triplets in {self.output}" + (f" ({problems[0]})" if problems else ""))
        self._refs = refs
        return list(refs)

    def max_references(self) -> int:
        """The most reference pictures (read by Qwen3-VL only) any usable example has: what the bridge is built for."""
        import json

        usable = {(ref.shard, ref.key) for ref in self.refs()}
        return max((json.loads(row["info"]).get("reference_images", 0) for shard in self.shards
                    for row in self.caches.table(shard) if (shard, row["id"]) in usable), default=0)

    def read(self, shard: str, keys: set[str]) -> dict[str, TrainingExample]:
        import json

        from bridgecore.batch.shard_store import CorruptShardError

        try:
            caches, latents = self.caches.read(shard), self.latents.read(shard)  # checksums verified
        except CorruptShardError as error:
            (self.caches if error.stage == CACHES.stage else self.latents).invalidate(shard)
            raise DamagedDataError(f"training data shard {shard} is damaged ({str(error).splitlines()[0]}): it is "
                                   "uncommitted now; run the same `vision-bridge train` command again (with --data "
                                   "a manifest it recomputes that shard; with --data a cache location, rerun "
                                   "build-caches first)") from None
        examples = {}
        for key in keys:
            condition, target = LATENTS.read(latents.payloads[key])
            info = json.loads(latents.rows[key]["info"])
            examples[key] = TrainingExample(key, CACHES.read(caches.payloads[key]), condition, target,
                                            tuple(info["latent_hw"]),
                                            tuple(tuple(hw) for hw in info.get("condition_hw", [])))
        return examples


def prepare_data(data_uri: str, work_uri: str, settings: JobSettings, shard_size: int = CACHE_SHARD_SIZE,
                 loaded: LoadedModels | None = None) -> CommittedShards:
    """Caches and latents for every triplet of `data_uri`, computed once (committed shards are reused). With
    `loaded`, the models stay there for the trainer (the VLMs freed, the DiT kept)."""
    if _is_manifest(data_uri):
        output = work_uri
        plan = plan_job(data_uri, output, settings, PIPELINE, shard_size=shard_size)
        shards = plan.shards
    else:
        output = data_uri
        storage = Storage(output)
        caches_fp = fingerprints(PIPELINE, settings)["caches"]
        if not STAGES["caches"].store(storage, caches_fp).done_shards():
            raise ValueError(f"{data_uri}: no committed caches for these models and condition area "
                             f"(looked in caches/{caches_fp}); found: {storage.list('caches') or 'none'}")
        shards = sorted(read_job(storage, _latest_job(storage, data_uri)))
    loaded = loaded if loaded is not None else LoadedModels()
    run_pipeline(output, PIPELINE, shards, settings, loaded=loaded)
    ModelPool(settings, loaded).release(keep=("dit",))
    source = CommittedShards(output, settings, shards)
    source.refs()  # refuses bad data now, before any model is trained
    return source


def prepare_examples(data_uri: str, work_uri: str, settings: JobSettings, shard_size: int = CACHE_SHARD_SIZE,
                     loaded: LoadedModels | None = None) -> list[TrainingExample]:
    """Every triplet of `data_uri` in memory (small sets: research code and tests; training streams instead)."""
    source = prepare_data(data_uri, work_uri, settings, shard_size, loaded)
    return read_refs(source, source.refs())


def check_ranks(nproc_per_node: int) -> None:
    """One rank per GPU: more ranks than visible GPUs is refused before any work (on a machine without CUDA, ranks
    run on the CPU with gloo: the tests' way)."""
    import torch

    if torch.cuda.is_available() and nproc_per_node > torch.cuda.device_count():
        raise ValueError(f"{nproc_per_node} training ranks but {torch.cuda.device_count()} visible GPU(s) "
                         "(CUDA_VISIBLE_DEVICES): one rank per GPU")


def streamable_shard_size(manifest: str, shard_size: int, data_streams: int) -> int:
    """The shard size for training data built from a manifest so that each of `data_streams` streams gets at least
    one shard (a data stream reads whole shards); refused in one line when there are fewer samples than streams."""
    from bridgecore.batch.sharding import read_inputs

    count = len(read_inputs(manifest))
    if count < data_streams:
        raise ValueError(f"{manifest} has {count} samples for {data_streams} data streams: every stream needs at least "
                         "one; use fewer streams (--data-streams) or more data")
    fitted = min(shard_size, max(1, count // data_streams))
    if fitted < shard_size:
        logger.info("%d samples for %d data streams: %d samples per shard (not %d), so every stream has data",
                    count, data_streams, fitted, shard_size)
    return fitted


class DamagedDataError(ValueError):
    """A committed training-data shard failed its checksums while training read it."""


def staging_root() -> Path:
    """Where a remote training run is mirrored while it trains: VISION_BRIDGE_STAGING_DIR, else the user's cache
    (never the code directory: a worker's code may be read-only, and its checkout is not a scratch disk)."""
    import os

    return Path(os.environ.get("VISION_BRIDGE_STAGING_DIR") or Path.home() / ".cache" / "vision-bridge" / "staging")


def run_training(data_uri: str, out_dir: str | Path, settings, config: TrainConfig = TrainConfig(),
                 bridge_overrides: dict | None = None, progress: bool = True, nproc_per_node: int = 1,
                 shard_size: int = CACHE_SHARD_SIZE) -> dict:
    """Prepares (or reuses) caches and latents under `out_dir/data` (`shard_size` triplets a shard, for a
    manifest), then trains (on `nproc_per_node` local processes, one per GPU); returns the metrics.

    `out_dir` may be an fsspec URL (`s3://bucket/ckpt`): the run is mirrored in a local staging folder
    (an earlier run there is downloaded first, so training resumes), and uploaded after every checkpoint."""
    import hashlib

    from bridgecore.storage import is_remote, mirror_down, mirror_up

    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be at least 1; got {nproc_per_node}")
    check_ranks(nproc_per_node)
    if _is_manifest(data_uri):  # train builds the data itself: every data stream must get a shard
        shard_size = streamable_shard_size(data_uri, shard_size, config.data_streams)
    if config.data_streams % nproc_per_node:
        raise ValueError(f"{config.data_streams} data streams cannot be shared by {nproc_per_node} processes: use a "
                         "multiple of the number of GPUs")
    remote = str(out_dir) if is_remote(out_dir) else None
    if remote:
        staging = staging_root() / hashlib.sha256(remote.encode()).hexdigest()[:16]
        out_dir = Path(mirror_down(remote, str(staging), exclude=("data",)))  # data stay remote
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = LoadedModels()  # the data preparation's DiT serves the training
    source = prepare_data(data_uri, f"{remote}/data" if remote else str(out_dir / "data"), settings, shard_size,
                          loaded)
    first = read_refs(source, source.refs()[:1])[0].cache
    bridge_config = BridgeConfig.from_caches(first.qwen3, first.qwen25, **{"reference_images": source.max_references(),
                                                                            **(bridge_overrides or {})})
    if nproc_per_node > 1:
        ModelPool(settings, loaded).release(keep=())  # every rank loads its own DiT
        metrics = launch_ranks(nproc_per_node, source, out_dir, config, bridge_config, remote)
    else:
        trainer = BridgeTrainer(ModelPool(settings, loaded).editor.pipe, source, out_dir, config, bridge_config)
        if remote:
            trainer.after_checkpoint = lambda: mirror_up(str(out_dir), remote, exclude=("data",))
        metrics = trainer.train(progress=progress)
    if remote:
        mirror_up(str(out_dir), remote, exclude=("data",))
    return metrics


# -- N processes -----------------------------------------------------------------------------------------


RANK_WAIT_SECONDS = 4 * 3600  # how long ranks wait for each other (rank 0's evaluations and uploads included)


class RankFailedError(RuntimeError):
    """A training rank died; the others were stopped. Checkpoints already written are complete (each is written
    to a temporary folder and renamed), so the run resumes from the last one."""


def launch_ranks(nproc: int, source: CommittedShards, out_dir: Path, config: TrainConfig,
                 bridge_config: BridgeConfig, remote: str | None) -> dict:
    """One process per rank on this machine, through torch's elastic launcher (`torchrun`'s engine); returns rank 0's
    metrics, or raises `RankFailedError` naming the first rank that failed and why."""
    import dataclasses
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn")
    with forwarded_logs() as log_queue:
        arguments = (source.output, source.settings.to_dict(), source.shards, str(out_dir),
                     dataclasses.asdict(config), dataclasses.asdict(bridge_config), remote, log_queue)
        try:
            results = elastic_launch(launch, train_rank)(*arguments)
        except ChildFailedError as error:
            failed = error
        else:
            return results[0]
    raise _rank_failure(failed, nproc, out_dir)


def _rank_failure(error, nproc: int, out_dir: Path) -> RankFailedError:
    rank, failure = error.get_first_failure()
    message = failure.message if isinstance(failure.message, str) else (failure.message or {}).get(
        "message", f"exit code {failure.exitcode}")
    reason = str(message).strip().splitlines()[-1] if str(message).strip() else f"exit code {failure.exitcode}"
    return RankFailedError(f"training rank {rank} of {nproc} failed: {reason}; the other ranks were stopped "
                           f"(checkpoints in {out_dir} are complete: rerun to resume)")


@contextlib.contextmanager
def forwarded_logs():
    """A queue the ranks send their `bridgecore` log records to; a thread of this process hands each to the logger
    of the same name here, in this context (so a Prefect task's handlers take the ranks' progress lines to the UI)."""
    import contextvars
    import multiprocessing
    import threading

    with multiprocessing.get_context("spawn").Manager() as manager:
        queue = manager.Queue()

        def drain() -> None:
            while (record := queue.get()) is not None:
                logging.getLogger(record.name).handle(record)

        thread = threading.Thread(target=contextvars.copy_context().run, args=(drain,), daemon=True)
        thread.start()
        try:
            yield queue
        finally:
            queue.put(None)
            thread.join(timeout=10)


def train_rank(output: str, settings: dict, shards: list[str], out_dir: str, config: dict, bridge_config: dict,
               remote: str | None, log_queue=None) -> dict:
    """One rank of `launch_ranks` (a process of its own): joins the group, loads the frozen DiT on its GPU, trains
    on its data streams. Rank 0 writes and uploads; it alone returns the metrics."""
    import datetime
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import record

    @record  # the error and its traceback reach the launcher, which names the rank
    def run() -> dict:
        from bridgecore.storage import mirror_up

        if log_queue is not None:  # progress lines and warnings go to the launching process
            from logging.handlers import QueueHandler

            library = logging.getLogger("bridgecore")
            library.addHandler(QueueHandler(log_queue))
            library.setLevel(logging.INFO)
            library.propagate = False
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        job = JobSettings.from_dict(settings)
        cuda = torch.cuda.is_available() and (job.device == "auto" or job.device.startswith("cuda"))
        if cuda:  # one GPU per rank, whatever device the job named
            torch.cuda.set_device(local_rank)
            job = JobSettings.from_dict({**settings, "device": f"cuda:{local_rank}"})
        # rank 0 evaluates and uploads checkpoints while the others wait in the next all-reduce: a long timeout
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=RANK_WAIT_SECONDS))
        try:
            source = CommittedShards(output, job, shards)
            trainer = BridgeTrainer(ModelPool(job, LoadedModels()).editor.pipe, source, out_dir, TrainConfig(**config),
                                    BridgeConfig(**bridge_config), Ranks.current())
            if remote and trainer.ranks.main:
                trainer.after_checkpoint = lambda: mirror_up(out_dir, remote, exclude=("data",))
            return trainer.train(progress=False)
        finally:
            dist.destroy_process_group()

    return run()
