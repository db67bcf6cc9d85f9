"""Training data for the bridge: (caches, condition latents, target latents) per triplet, all cached.

`--data` is either a manifest with a `target` column (the batch pipeline's format; the evaluation
benchmark writes one) or a location written by `build-caches`. Missing caches are extracted with the
batch stages (committed shards, reused by later runs); VAE latents of the condition and target images
are cached the same way, in a `latents/` stage. Training itself never runs a VLM when caches exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .batch_job import JobSettings, plan_job
from .cache_format import SampleCache, cache_from_bytes
from .images import load_image
from .shard_store import SampleRecord, ShardStore
from .stage_extract import STAGE as CACHE_STAGE
from .stage_extract import extract_shard, load_plan
from .storage import Storage

logger = logging.getLogger(__name__)
LATENT_STAGE = "latents"


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


@torch.no_grad()
def encode_latents(pipe, image, width: int, height: int) -> torch.Tensor:
    """The edit pipeline's own VAE encoding (resize, normalise, argmax latents, pack): `[N, 4C]`."""
    pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(image, height, width), height, width)
    pixels = pixels.unsqueeze(2).to(pipe.vae.device, pipe.vae.dtype)  # [1, 3, 1, H, W]
    latents = pipe._encode_vae_image(pixels, generator=None)  # [1, C, 1, h, w], normalised
    _, channels, _, h, w = latents.shape
    return pipe._pack_latents(latents, 1, channels, h, w)[0]


def _latents_shard(storage: Storage, shard_id: str, editor, condition_area: int) -> dict:
    from .edit_prompt import condition_size

    store = ShardStore(storage, LATENT_STAGE)
    if store.is_done(shard_id):
        return store.marker(shard_id)
    caches = {row["key"]: row for row in ShardStore(storage, CACHE_STAGE).manifest(shard_id)}
    records = []
    for sample in load_plan(storage, shard_id):
        if caches[sample.key]["status"] != "done":
            records.append(SampleRecord.failed(sample, caches[sample.key]["error"]))
            continue
        if not sample.target:
            records.append(SampleRecord.failed(sample, "no target image: not a training triplet"))
            continue
        # Every condition image is VAE-encoded at its own size, as the pipelines do (Edit-Plus: several);
        # the output takes the size of the last one (Edit-Plus sizes its output from `image[-1]`).
        sources, target = [load_image(uri) for uri in sample.images], load_image(sample.target)
        if sources[-1].size != target.size:
            records.append(SampleRecord.failed(sample, f"target size {target.size} differs from source size {sources[-1].size}"))
            continue
        sizes = [condition_size(source, condition_area) for source in sources]
        conditions = [encode_latents(editor.pipe, source, w, h) for source, (w, h) in zip(sources, sizes)]
        width, height = sizes[-1]
        tensors = {"condition": torch.cat(conditions), "target": encode_latents(editor.pipe, target, width, height)}
        records.append(SampleRecord(sample, "done", payload=save_tensors({k: v.cpu().contiguous() for k, v in tensors.items()}),
                                    info={"latent_hw": [height // 16, width // 16],
                                          "condition_hw": [[h // 16, w // 16] for w, h in sizes]}))
    return store.commit(shard_id, records)


def prepare_examples(data_uri: str, work_uri: str, settings: JobSettings, shard_size: int = 64) -> list[TrainingExample]:
    """Caches and latents for every triplet of `data_uri`, computed once under `work_uri`; refuses bad data."""
    import json

    is_cache_location = not data_uri.rstrip("/").endswith((".csv", ".jsonl", ".parquet"))
    if is_cache_location:
        storage = Storage(data_uri)
        shards = [name[: -len(".done")] for name in storage.list(CACHE_STAGE, suffix=".done")]
        if not shards:
            raise ValueError(f"{data_uri}: no committed cache shards (expected a build-caches output or a manifest)")
    else:
        storage = Storage(work_uri)
        shards = plan_job(data_uri, work_uri, shard_size=shard_size, final_stage=CACHE_STAGE).shards
    editor = settings.editor()
    for shard_id in shards:
        extract_shard(storage, shard_id, editor.extractor)
    editor.extractor.unload()
    problems, examples = [], []
    for shard_id in shards:
        _latents_shard(storage, shard_id, editor, settings.condition_area)
        caches = ShardStore(storage, CACHE_STAGE).payloads(shard_id)
        latents_store = ShardStore(storage, LATENT_STAGE)
        latents = latents_store.payloads(shard_id)
        for row in latents_store.manifest(shard_id):
            if row["status"] != "done":
                problems.append(f"{row['key']}: {row['error']}")
                continue
            tensors, info = load_tensors(latents[row["key"]]), json.loads(row["info"])
            examples.append(TrainingExample(row["key"], cache_from_bytes(caches[row["key"]]), tensors["condition"],
                                            tensors["target"], tuple(info["latent_hw"]),
                                            tuple(tuple(hw) for hw in info.get("condition_hw", []))))
    size_problems = [p for p in problems if "differs from source" in p]
    if size_problems:
        raise ValueError("triplets whose target size differs from the source: " + "; ".join(size_problems[:10]))
    if problems:
        logger.warning("%d samples are not usable for training: %s", len(problems), "; ".join(problems[:5]))
    if not examples:
        raise ValueError(f"no usable training triplets in {data_uri}" + (f" ({problems[0]})" if problems else ""))
    return examples
