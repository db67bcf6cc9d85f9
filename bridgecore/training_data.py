"""Training data for the bridge: (caches, condition latents, target latents) per triplet, all cached.

`--data` is either a manifest with a `target` column (the batch pipeline's format; the evaluation
benchmark writes one) or an output location written by `build-caches`. Both go through the batch
executor's `training-data` pipeline (stages `caches` and `latents`): committed shards are reused under
the same settings, so training itself never runs a VLM when caches exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_tensors

from .batch.pipeline import JOBS, STAGES, fingerprints, plan_job, read_job, run_pipeline
from .batch.settings import JobSettings, ModelPool
from .cache_format import SampleCache, cache_from_bytes
from .storage import Storage

logger = logging.getLogger(__name__)
PIPELINE = "training-data"


@dataclass
class TrainingExample:
    """One triplet, ready for the loss.

    Args:
        cache: the sample's Qwen3/Qwen2.5 caches.
        condition (`torch.Tensor` of shape `[sum N_i, 4C]`): packed, normalised VAE latents of every
            condition image, concatenated in order, as the edit pipelines feed them to the DiT.
        target (`torch.Tensor` of shape `[N, 4C]`): the same for the target image.
        latent_hw: (h, w) of the target's packed latent grid (2x2 latent patches).
        condition_hw: (h, w) of each condition image's packed grid; empty means one, of `latent_hw`.
    """

    key: str
    cache: SampleCache
    condition: torch.Tensor
    target: torch.Tensor
    latent_hw: tuple[int, int]
    condition_hw: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        self.condition_hw = tuple(tuple(hw) for hw in self.condition_hw) or (tuple(self.latent_hw),)
        if sum(h * w for h, w in self.condition_hw) != self.condition.shape[0]:
            raise ValueError(f"{self.key}: condition latents have {self.condition.shape[0]} tokens but the grids "
                             f"{self.condition_hw} give {sum(h * w for h, w in self.condition_hw)}")


def _is_manifest(uri: str) -> bool:
    return uri.rstrip("/").lower().endswith((".csv", ".jsonl", ".parquet"))


def _latest_job(storage: Storage, data_uri: str) -> str:
    """The most recent job planned in a build-caches output (its sample list)."""
    jobs = storage.list(JOBS, suffix=".parquet")
    if not jobs:
        raise ValueError(f"{data_uri}: no planned jobs (expected a build-caches output or a manifest)")
    newest = max(jobs, key=lambda name: storage.mtime_and_size(JOBS, name)[0] or 0)
    return newest[: -len(".parquet")]


def prepare_examples(data_uri: str, work_uri: str, settings: JobSettings, shard_size: int = 64) -> list[TrainingExample]:
    """Caches and latents for every triplet of `data_uri`, computed once; refuses bad data."""
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
    run_pipeline(output, PIPELINE, shards, settings)
    ModelPool(settings).release(keep=("dit",))
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
            tensors, info = load_tensors(latents.payloads[sample_id]["safetensors"]), json.loads(row["info"])
            examples.append(TrainingExample(sample_id, cache_from_bytes(caches.payloads[sample_id]["safetensors"]),
                                            tensors["condition"], tensors["target"], tuple(info["latent_hw"]),
                                            tuple(tuple(hw) for hw in info.get("condition_hw", []))))
    size_problems = [p for p in problems if "differs from source" in p]
    if size_problems:
        raise ValueError("triplets whose target size differs from the source: " + "; ".join(size_problems[:10]))
    if problems:
        logger.warning("%d samples are not usable for training: %s", len(problems), "; ".join(problems[:5]))
    if not examples:
        raise ValueError(f"no usable training triplets in {data_uri}" + (f" ({problems[0]})" if problems else ""))
    return examples
