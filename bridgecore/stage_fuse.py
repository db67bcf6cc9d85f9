"""Stage 2, fuse: a committed cache shard -> a shard of Qwen2.5-compatible prompt embeddings (`fused/`).

The bridge (trained checkpoint, or untrained = exact baseline) runs on each done sample's caches; the
edit stage then needs only the DiT. Samples that failed extraction stay failed with their reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .bridge import BridgeConfig, VisionCacheBridge
from .cache_format import cache_from_bytes
from .shard_store import SampleRecord, ShardStore
from .stage_extract import NEGATIVE
from .stage_extract import STAGE as CACHE_STAGE
from .stage_extract import load_plan
from .storage import Storage

STAGE = "fused"
UNTRAINED = "untrained"


def bridge_checksum(bridge_dir: str | Path | None) -> str:
    """sha256 of a bridge checkpoint (config + weights); 'untrained' for the zero-gated default."""
    if bridge_dir is None:
        return UNTRAINED
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        digest.update(Path(bridge_dir, name).read_bytes())
    return digest.hexdigest()


def load_bridge_for(bridge_dir: str | Path | None, cache) -> VisionCacheBridge:
    expected = BridgeConfig.from_caches(cache.qwen3, cache.qwen25)
    if bridge_dir is None:
        return VisionCacheBridge(expected).eval()
    return VisionCacheBridge.from_pretrained(bridge_dir, expect=expected).eval()


def fused_to_bytes(prompt_embeds: torch.Tensor, meta: dict, negative: torch.Tensor | None = None) -> bytes:
    tensors = {"prompt_embeds": prompt_embeds}
    if negative is not None:
        tensors["negative_prompt_embeds"] = negative
    return save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                        metadata={"vision_bridge": json.dumps(meta)})


def fused_from_bytes(data: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds [L, D], negative_prompt_embeds [L', D] or None)."""
    tensors = load_tensors(data)
    return tensors["prompt_embeds"], tensors.get("negative_prompt_embeds")


@torch.no_grad()
def fuse_shard(storage: Storage, shard_id: str, bridge_dir: str | Path | None = None, device: str = "cpu") -> dict:
    """Runs the bridge over one committed cache shard and commits the fused shard (skips if committed)."""
    store = ShardStore(storage, STAGE)
    if store.is_done(shard_id):
        return {**store.marker(shard_id), "skipped": True}
    caches = ShardStore(storage, CACHE_STAGE)
    rows = {row["key"]: row for row in caches.manifest(shard_id)}
    payloads = caches.payloads(shard_id)
    negatives = caches.payloads(shard_id, NEGATIVE)
    checksum = bridge_checksum(bridge_dir)
    bridge, records = None, []
    for sample in load_plan(storage, shard_id):
        row = rows[sample.key]
        if row["status"] != "done":
            records.append(SampleRecord.failed(sample, row["error"]))
            continue
        cache = cache_from_bytes(payloads[sample.key])
        try:
            bridge = bridge or load_bridge_for(bridge_dir, cache).to(device)
            embeds = bridge(cache.qwen3, cache.qwen25).prompt_embeds[0]
            negative = None
            if sample.key in negatives:
                negative_cache = cache_from_bytes(negatives[sample.key])
                negative = bridge(negative_cache.qwen3, negative_cache.qwen25).prompt_embeds[0]
        except ValueError as error:  # mismatched or non-finite caches: this sample only
            records.append(SampleRecord.failed(sample, f"fuse failed: {error}"))
            continue
        records.append(SampleRecord(sample, "done", payload=fused_to_bytes(embeds, {"bridge": checksum}, negative),
                                    info={"prompt_embeds": list(embeds.shape)}))
    return store.commit(shard_id, records, {"bridge_checksum": checksum})
