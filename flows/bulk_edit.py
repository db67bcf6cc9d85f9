"""Flow `bulk-edit`: shard -> extract -> (negatives) -> (rewrites) -> fuse -> edit -> evaluate over a whole input
set (with `editor="qwen-image-2.1"`: shard -> 2.1's own conditioning -> 2.1 edits -> evaluate). `rewrite_with="qwen3"`
is the rewrite arm: Qwen3-VL rewrites each instruction and Qwen-Image-Edit's encoder reads the rewrite.

    prefect deployment run bulk-edit/default --param input=s3://bucket/in/manifest.jsonl --param output=s3://bucket/out

Runs the stages in this process, or, with `workers_deployment` (e.g. "process-shards/gpu"), sends
batches of shards to the GPU work pool so that N workers share the job. Outputs are scoped by settings:
a rerun with other settings (a bridge, more steps) reuses every stage it does not change. Every default of
the job (its edit model, its steps, the Edit-Plus routing) is decided by `JobSettings.for_job`, as for the CLI.
`limit` runs the first N samples only (a trial: the full job reuses what it committed); `dry_run` plans and returns
the pending work with its GPU-hours estimate, dispatching nothing (the estimate is also logged before every dispatch).
"""

from __future__ import annotations

from prefect import flow

from bridgecore.batch.settings import JOB_DEFAULTS as D
from bridgecore.batch.settings import settings_for_job
from bridgecore.batch.sharding import EDIT_SHARD_SIZE
from vision_bridge.flows.naming import job_tags, run_name, speaks_in_parameters, tag_this_run
from vision_bridge.flows.scale_out import STALL_SECONDS, run_and_report
from vision_bridge.tasks.shard_inputs import shard_inputs


@flow(name="bulk-edit", flow_run_name=run_name("bulk-edit"))
@speaks_in_parameters
def bulk_edit(input: str, output: str, prompt: str | None = None, qwen3: str | None = None,
              edit_model: str | None = None, bridge: str | None = None, multi_image: bool = False,
              shard_size: int = EDIT_SHARD_SIZE, steps: int | None = None, seed: int = D["seed"], cfg: float = D["cfg"],
              negative_prompt: str = D["negative_prompt"], condition_area: int = D["condition_area"],
              batch_size: int = D["batch_size"], device: str = D["device"], retry_failed: bool = False,
              workers_deployment: str | None = None, shards_per_run: int | None = None, deadline_s: float = 6 * 3600,
              verify: bool = False, create_bucket: bool = False, content_hash: bool = False,
              load_in_8bit: bool = D["load_in_8bit"], lora: list[str] | None = None, scheduler: str = D["scheduler"],
              compile: bool = D["compile"], attention_backend: str | None = None, dit_offload: bool = D["dit_offload"],
              editor: str = D["editor"], plus_model: str | None = None, rewrite_with: str = D["rewrite_with"],
              rewrite_system_prompt: str | None = None, rewrite_max_tokens: int = D["rewrite_max_tokens"],
              edits_format: str = D["edits_format"], cache_dtype: str = D["cache_dtype"],
              cache_deepstack: bool = D["cache_deepstack"], qwen3_area: int | None = D["qwen3_area"],
              step_cache: float = D["step_cache"],
              batch_cfg: bool = D["batch_cfg"], fp8: str = D["fp8"], limit: int | None = None, dry_run: bool = False,
              stall_s: float = STALL_SECONDS) -> dict:
    # plan
    from bridgecore.zoo.tiny_zoo import tiny_plus_model_beside

    settings = settings_for_job(dict(
        qwen3=qwen3, edit_model=edit_model, editor=editor, multi_image=multi_image, steps=steps, plus_model=plus_model,
        bridge=bridge, device=device, condition_area=condition_area, seed=seed, batch_size=batch_size, cfg=cfg,
        negative_prompt=negative_prompt, load_in_8bit=load_in_8bit, lora=lora, scheduler=scheduler, compile=compile,
        attention_backend=attention_backend, dit_offload=dit_offload, rewrite_with=rewrite_with,
        rewrite_system_prompt=rewrite_system_prompt, rewrite_max_tokens=rewrite_max_tokens,
        edits_format=edits_format, cache_dtype=cache_dtype, cache_deepstack=cache_deepstack, qwen3_area=qwen3_area,
        step_cache=step_cache, batch_cfg=batch_cfg,
        fp8=fp8), plus_model_beside=tiny_plus_model_beside).to_dict()
    tag_this_run(job_tags("bulk-edit", output, settings))
    plan = shard_inputs(input, output, settings, "bulk-edit", prompt, shard_size, retry_failed, create_bucket,
                        content_hash, limit)
    if dry_run:  # planned (plan/ written), nothing dispatched: what would run and what it would cost
        return {"dry_run": True, **plan}
    # run and report
    return run_and_report(output, "bulk-edit", plan, settings, shard_size, workers_deployment, shards_per_run,
                          deadline_s, verify, stall_s)
