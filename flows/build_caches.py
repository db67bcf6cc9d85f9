"""Flow `build-caches`: extraction only, incremental (new or changed inputs only); meant for a nightly cron.

The caches it writes (`OUTPUT/caches/<fingerprint>/`) feed the bulk-edit runs with the same models and
condition area, and the bridge training; with `rewrite_with` it also writes the rewrite arm's rewritten
instructions (`OUTPUT/rewrites/<fingerprint>/`). With a Qwen-Image-2.1 `edit_model` it builds that model's own
conditioning instead (`OUTPUT/qwen21-caches/<fingerprint>/`), for the native arm.
`limit` runs the first N samples only (a trial: the full job reuses what it committed); `dry_run` plans and returns
the pending work with its GPU-hours estimate, dispatching nothing (the estimate is also logged before every dispatch).
"""

from __future__ import annotations

from prefect import flow

from bridgecore.batch.settings import JOB_DEFAULTS as D
from bridgecore.batch.settings import settings_for_job
from bridgecore.batch.sharding import CACHE_SHARD_SIZE
from vision_bridge.flows.naming import job_tags, run_name, speaks_in_parameters, tag_this_run
from vision_bridge.flows.scale_out import STALL_SECONDS, run_and_report
from vision_bridge.tasks.shard_inputs import shard_inputs


@flow(name="build-caches", flow_run_name=run_name("build-caches"))
@speaks_in_parameters
def build_caches(input: str, output: str, prompt: str | None = None, qwen3: str | None = None,
                 edit_model: str | None = None, shard_size: int = CACHE_SHARD_SIZE, condition_area: int = D["condition_area"],
                 batch_size: int = 8, device: str = D["device"], retry_failed: bool = False,
                 workers_deployment: str | None = None, shards_per_run: int | None = None,
                 deadline_s: float = 6 * 3600, verify: bool = False, create_bucket: bool = False,
                 content_hash: bool = False, load_in_8bit: bool = D["load_in_8bit"], rewrite_with: str = D["rewrite_with"],
                 rewrite_system_prompt: str | None = None, rewrite_max_tokens: int = D["rewrite_max_tokens"],
                 limit: int | None = None, dry_run: bool = False, cache_dtype: str = D["cache_dtype"],
                 cache_deepstack: bool = D["cache_deepstack"], qwen3_area: int | None = D["qwen3_area"],
                 stall_s: float = STALL_SECONDS) -> dict:
    # plan
    settings = settings_for_job(dict(
        qwen3=qwen3, edit_model=edit_model, device=device, condition_area=condition_area, batch_size=batch_size,
        load_in_8bit=load_in_8bit, rewrite_with=rewrite_with, rewrite_system_prompt=rewrite_system_prompt,
        rewrite_max_tokens=rewrite_max_tokens, cache_dtype=cache_dtype, cache_deepstack=cache_deepstack,
        qwen3_area=qwen3_area),
        route_multi_image=False).to_dict()
    tag_this_run(job_tags("build-caches", output))
    plan = shard_inputs(input, output, settings, "build-caches", prompt, shard_size, retry_failed, create_bucket,
                        content_hash, limit)
    if dry_run:  # planned (plan/ written), nothing dispatched: what would run and what it would cost
        return {"dry_run": True, **plan}
    # run and report
    return run_and_report(output, "build-caches", plan, settings, shard_size, workers_deployment, shards_per_run,
                          deadline_s, verify, stall_s)
