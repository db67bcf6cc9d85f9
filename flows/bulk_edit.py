"""Flow `bulk-edit`: shard -> extract -> (negatives) -> (rewrites) -> fuse -> edit -> evaluate over a whole input
set (with `editor="qwen-image-2.1"`: shard -> 2.1's own conditioning -> 2.1 edits -> evaluate). `rewrite_with="qwen3"`
is the rewrite arm: Qwen3-VL rewrites each instruction and Qwen-Image-Edit's encoder reads the rewrite.

    prefect deployment run bulk-edit/default --param input=s3://bucket/in/manifest.jsonl --param output=s3://bucket/out

Runs the stages in this process, or, with `workers_deployment` (e.g. "process-shards/gpu"), sends
batches of shards to the GPU work pool so that N workers share the job. Outputs are scoped by settings:
a rerun with other settings (a bridge, more steps) reuses every stage it does not change.
"""

from __future__ import annotations

from prefect import flow

from bridgecore.batch.settings import JobSettings
from bridgecore.loading import DEFAULT_EDIT_MODEL, DEFAULT_EDIT_PLUS_MODEL, DEFAULT_MODEL_OF_FAMILY, DEFAULT_QWEN3_MODEL
from flows.scale_out import run_and_report
from tasks.shard_inputs import shard_inputs


@flow(name="bulk-edit")
def bulk_edit(input: str, output: str, prompt: str | None = None, qwen3: str = DEFAULT_QWEN3_MODEL,
              edit_model: str | None = None, bridge: str | None = None, multi_image: bool = False,
              shard_size: int = 16, steps: int | None = None, seed: int = 0, cfg: float = 1.0, negative_prompt: str = " ",
              condition_area: int = 1024 * 1024, batch_size: int = 4, device: str = "auto",
              retry_failed: bool = False, workers_deployment: str | None = None, shards_per_run: int | None = None,
              deadline_s: float = 6 * 3600, verify: bool = False, create_bucket: bool = False,
              content_hash: bool = False, load_in_8bit: bool = False, lora: list[str] | None = None,
              scheduler: str = "auto", compile: bool = False, attention_backend: str | None = None, dit_offload: bool = False, editor: str = "auto",
              plus_model: str | None = None, rewrite_with: str = "none", rewrite_system_prompt: str | None = None,
              rewrite_max_tokens: int = 256) -> dict:
    # plan
    edit_model = edit_model or DEFAULT_MODEL_OF_FAMILY.get(editor) or (
        DEFAULT_EDIT_PLUS_MODEL if multi_image else DEFAULT_EDIT_MODEL)
    if steps is None:  # each family's own default: 40 for Qwen-Image-2.1, 50 for Qwen-Image-Edit
        steps = 40 if JobSettings(qwen3, edit_model, editor=editor).native else 50
    settings = JobSettings(qwen3, edit_model, bridge, device, condition_area, steps, seed, batch_size,
                           cfg=cfg, negative_prompt=negative_prompt, load_in_8bit=load_in_8bit, lora=tuple(lora or ()),
                           scheduler=scheduler, compile=compile, attention_backend=attention_backend,
                           dit_offload=dit_offload, editor=editor, plus_model=plus_model, rewrite_with=rewrite_with,
                           rewrite_system_prompt=rewrite_system_prompt, rewrite_max_tokens=rewrite_max_tokens).to_dict()
    plan = shard_inputs(input, output, settings, "bulk-edit", prompt, shard_size, retry_failed, create_bucket,
                        content_hash)
    # run and report
    return run_and_report(output, "bulk-edit", plan, settings, shard_size, workers_deployment, shards_per_run,
                          deadline_s, verify)
