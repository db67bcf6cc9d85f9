"""Stage 3, edit: a committed fused shard -> edited PNGs with their manifest (`edits/`).

Only the DiT (and VAE) run here: the prompt embeddings come from the fused shard. Each sample's noise
seed derives from the job seed and the sample key, so an edit does not depend on its shard or worker.
"""

from __future__ import annotations

import io


from .edit_pipeline import EnhancedQwenImageEdit
from .edit_prompt import pad_prompt_embeds
from .images import ImageLoadError, load_image
from .shard_store import SampleRecord, ShardStore
from .sharding import sample_seed
from .stage_extract import load_plan
from .stage_fuse import STAGE as FUSED_STAGE
from .stage_fuse import fused_from_bytes
from .storage import Storage

STAGE = "edits"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def edit_shard(storage: Storage, shard_id: str, editor: EnhancedQwenImageEdit, num_inference_steps: int = 50,
               seed: int = 0, batch_size: int = 4, true_cfg_scale: float = 1.0) -> dict:
    """Edits the done samples of one fused shard and commits the PNGs (skips if committed)."""
    store = ShardStore(storage, STAGE, kind="png", extension="png")
    if store.is_done(shard_id):
        return {**store.marker(shard_id), "skipped": True}
    fused = ShardStore(storage, FUSED_STAGE)
    rows = {row["key"]: row for row in fused.manifest(shard_id)}
    payloads = fused.payloads(shard_id)
    records, ready = {}, []
    for sample in load_plan(storage, shard_id):
        if rows[sample.key]["status"] != "done":
            records[sample.key] = SampleRecord.failed(sample, rows[sample.key]["error"])
            continue
        try:
            ready.append((sample, [load_image(uri) for uri in sample.images], fused_from_bytes(payloads[sample.key])))
        except ImageLoadError as error:
            records[sample.key] = SampleRecord.failed(sample, str(error))
    for start in range(0, len(ready), batch_size):
        batch = ready[start:start + batch_size]
        embeds, mask = pad_prompt_embeds([positive for _, _, (positive, _) in batch])
        negatives = [negative for _, _, (_, negative) in batch]
        negative = pad_prompt_embeds(negatives) if true_cfg_scale > 1 and all(n is not None for n in negatives) else None
        seeds = [sample_seed(seed, s.key) for s, _, _ in batch]
        try:
            images = editor.denoise([imgs for _, imgs, _ in batch], embeds, mask, seeds, num_inference_steps,
                                    true_cfg_scale, negative)
            for (sample, _, _), image in zip(batch, images):
                records[sample.key] = SampleRecord(sample, "done", payload=_png(image),
                                                   info={"width": image.width, "height": image.height})
        except Exception as error:  # noqa: BLE001 - a bad batch must not fail the shard
            for sample, _, _ in batch:
                records[sample.key] = SampleRecord.failed(sample, f"edit failed: {type(error).__name__}: {error}")
    ordered = [records[s.key] for s in load_plan(storage, shard_id)]
    return store.commit(shard_id, ordered, {"steps": num_inference_steps, "seed": seed, "true_cfg_scale": true_cfg_scale,
                                             "bridge_checksum": next(iter(rows.values()))["bridge_checksum"]})
