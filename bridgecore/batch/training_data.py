"""Training the bridge from the pipeline's data: (caches, condition latents, target latents) per triplet, all cached.

`--data` is either a manifest with a `target` column (the batch pipeline's format; the evaluation
benchmark writes one) or an output location written by `build-caches`. Both go through the batch
executor's `training-data` pipeline (stages `caches` and `latents`): committed shards are reused under
the same settings, so training itself never runs a VLM when caches exist. `run_training` then trains.
"""

from __future__ import annotations

import logging
from pathlib import Path


from bridgecore.batch.pipeline import JOBS, STAGES, fingerprints, plan_job, read_job, run_pipeline
from bridgecore.batch.settings import JobSettings, LoadedModels, ModelPool
from bridgecore.model.bridge import BridgeConfig
from bridgecore.model.cache_format import cache_from_bytes
from bridgecore.model.payloads import latents_from_bytes
from bridgecore.storage import Storage
from bridgecore.training.examples import TrainingExample
from bridgecore.training.trainer import BridgeTrainer, TrainConfig

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


def prepare_examples(data_uri: str, work_uri: str, settings: JobSettings, shard_size: int = 64,
                     loaded: LoadedModels | None = None) -> list[TrainingExample]:
    """Caches and latents for every triplet of `data_uri`, computed once; refuses bad data. With `loaded`, the
    models stay there for the trainer (the VLMs freed, the DiT kept)."""
    import json

    if _is_manifest(data_uri):
        output = work_uri
        plan = plan_job(data_uri, output, settings, PIPELINE, shard_size=shard_size)
        job, shards = plan.job, plan.shards
    else:
        output = data_uri
        storage = Storage(output)
        caches_fp = fingerprints(PIPELINE, settings)["caches"]
        if not STAGES["caches"].store(storage, caches_fp).done_shards():
            raise ValueError(f"{data_uri}: no committed caches for these models and condition area "
                             f"(looked in caches/{caches_fp}); found: {storage.list('caches') or 'none'}")
        job = _latest_job(storage, data_uri)
        shards = sorted(read_job(storage, job))
    loaded = loaded if loaded is not None else LoadedModels()
    run_pipeline(output, PIPELINE, shards, settings, loaded=loaded)
    ModelPool(settings, loaded).release(keep=("dit",))
    storage, prints = Storage(output), fingerprints(PIPELINE, settings)
    problems, examples = [], []
    for shard_id in shards:
        caches = STAGES["caches"].store(storage, prints["caches"]).read(shard_id)
        latents = STAGES["latents"].store(storage, prints["latents"]).read(shard_id)
        for sample_id, row in latents.rows.items():
            cache_row = caches.rows[sample_id]
            if cache_row["status"] != "done" or row["status"] != "done":
                problems.append(f"{sample_id}: {cache_row['error'] or row['error']}")
                continue
            condition, target = latents_from_bytes(latents.payloads[sample_id]["safetensors"])
            info = json.loads(row["info"])
            examples.append(TrainingExample(sample_id, cache_from_bytes(caches.payloads[sample_id]["safetensors"]),
                                            condition, target, tuple(info["latent_hw"]),
                                            tuple(tuple(hw) for hw in info.get("condition_hw", []))))
    size_problems = [p for p in problems if "differs from source" in p]
    if size_problems:
        raise ValueError("triplets whose target size differs from the source: " + "; ".join(size_problems[:10]))
    if problems:
        logger.warning("%d samples are not usable for training: %s", len(problems), "; ".join(problems[:5]))
    if not examples:
        raise ValueError(f"no usable training triplets in {data_uri}" + (f" ({problems[0]})" if problems else ""))
    return examples


def run_training(data_uri: str, out_dir: str | Path, settings, config: TrainConfig = TrainConfig(),
                 bridge_overrides: dict | None = None, progress: bool = True) -> dict:
    """Prepares (or reuses) caches and latents under `out_dir/data`, then trains; returns the metrics.

    `out_dir` may be an fsspec URL (`s3://bucket/ckpt`): the run is mirrored in a local staging folder
    (an earlier run there is downloaded first, so training resumes), and uploaded after every checkpoint."""
    import hashlib

    from bridgecore.storage import is_remote, mirror_down, mirror_up

    remote = str(out_dir) if is_remote(out_dir) else None
    if remote:
        staging = Path(".vision-bridge/staging") / hashlib.sha256(remote.encode()).hexdigest()[:16]
        out_dir = Path(mirror_down(remote, str(staging), exclude=("data",)))  # data stay remote
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = LoadedModels()  # the data preparation's DiT serves the training
    examples = prepare_examples(data_uri, f"{remote}/data" if remote else str(out_dir / "data"), settings,
                                loaded=loaded)
    first = examples[0].cache
    bridge_config = BridgeConfig.from_caches(first.qwen3, first.qwen25, **(bridge_overrides or {}))
    trainer = BridgeTrainer(ModelPool(settings, loaded).editor.pipe, examples, out_dir, config, bridge_config)
    if remote:
        trainer.after_checkpoint = lambda: mirror_up(str(out_dir), remote, exclude=("data",))
    metrics = trainer.train(progress=progress)
    if remote:
        mirror_up(str(out_dir), remote, exclude=("data",))
    return metrics
