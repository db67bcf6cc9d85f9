"""Stage 1, extract: one shard of samples -> a committed shard of vision caches (`caches/`).

Each sample ends `done` (its `SampleCache` safetensors blob in the shard's tar) or `failed` with the
reason; a bad sample never fails its shard. Samples go through the VLMs in batches; a batch that
fails is retried one sample at a time so that only the culprit is marked failed.
"""

from __future__ import annotations

import logging

from .cache_format import cache_to_bytes
from .extraction import VisionCacheExtractor
from .images import ImageLoadError, load_image
from .shard_store import SampleRecord, ShardStore
from .sharding import Sample
from .storage import Storage

logger = logging.getLogger(__name__)
STAGE = "caches"
NEGATIVE = "neg.safetensors"  # the negative prompt's caches, beside the sample's own (true CFG)


def load_plan(storage: Storage, shard_id: str) -> list[Sample]:
    return [Sample.from_dict(s) for s in storage.read_json("plan", shard_id + ".json")["samples"]]


def _info(cache) -> dict:
    return {"qwen25.prompt_embeds": list(cache.qwen25.prompt_embeds.shape),
            "qwen3.levels": list(next(iter(cache.qwen3.levels.values())).shape),
            "qwen3.vision_tokens": cache.qwen3.num_vision_tokens, "qwen25.vision_tokens": cache.qwen25.num_vision_tokens}


def _extract_batch(extractor: VisionCacheExtractor, batch: list[tuple[Sample, list]],
                   negative_prompt: str | None = None) -> list[SampleRecord]:
    images = [images for _, images in batch]
    try:
        caches = extractor.extract(images, [s.instruction for s, _ in batch])
        negatives = extractor.extract(images, [negative_prompt] * len(batch)) if negative_prompt is not None else None
    except Exception as error:  # noqa: BLE001 - isolate the culprit below
        if len(batch) == 1:
            return [SampleRecord.failed(batch[0][0], f"extraction failed: {type(error).__name__}: {error}")]
        return [record for item in batch for record in _extract_batch(extractor, [item], negative_prompt)]
    records = []
    for index, ((sample, _), cache) in enumerate(zip(batch, caches)):
        cache.extra = {"key": sample.key, "content_sha256": sample.content_sha256}
        extra = {NEGATIVE: cache_to_bytes(negatives[index])} if negatives is not None else {}
        records.append(SampleRecord(sample, "done", payload=cache_to_bytes(cache), info=_info(cache), extra_payloads=extra))
    return records


def extract_shard(storage: Storage, shard_id: str, extractor: VisionCacheExtractor, batch_size: int = 8,
                  progress=None, negative_prompt: str | None = None) -> dict:
    """Extracts and commits one shard unless it is already committed. Returns its marker."""
    store = ShardStore(storage, STAGE)
    if store.is_done(shard_id):
        return {**store.marker(shard_id), "skipped": True}
    records: dict[str, SampleRecord] = {}
    ready: list[tuple[Sample, list]] = []
    for sample in load_plan(storage, shard_id):
        if sample.error:
            records[sample.key] = SampleRecord.failed(sample, sample.error)
            continue
        try:
            ready.append((sample, [load_image(uri) for uri in sample.images]))
        except ImageLoadError as error:
            records[sample.key] = SampleRecord.failed(sample, str(error))
    for start in range(0, len(ready), batch_size):
        for record in _extract_batch(extractor, ready[start:start + batch_size], negative_prompt):
            records[record.sample.key] = record
        if progress is not None:
            progress(min(start + batch_size, len(ready)))
    ordered = [records[s.key] for s in load_plan(storage, shard_id)]
    common = {"qwen3_model": extractor.qwen3_name, "qwen25_model": extractor.edit_name,
              "negative_prompt": negative_prompt, **extractor.revisions}
    return store.commit(shard_id, ordered, common)
