"""Flow `build-caches`: extraction only, incremental (new or changed inputs only); meant for a nightly cron.

The caches it writes (`OUTPUT/caches/<fingerprint>/`) feed the bulk-edit runs with the same models and
condition area, and the bridge training; with `rewrite_with` it also writes the rewrite arm's rewritten
instructions (`OUTPUT/rewrites/<fingerprint>/`). With a Qwen-Image-2.1 `edit_model` it builds that model's own
conditioning instead (`OUTPUT/qwen21-caches/<fingerprint>/`), for the native arm.
"""

from __future__ import annotations

from prefect import flow

from bridgecore.batch.settings import JobSettings
from bridgecore.loading import DEFAULT_EDIT_MODEL, DEFAULT_QWEN3_MODEL
from flows.scale_out import run_and_report
from tasks.shard_inputs import shard_inputs


@flow(name="build-caches")
def build_caches(input: str, output: str, prompt: str | None = None, qwen3: str = DEFAULT_QWEN3_MODEL,
                 edit_model: str = DEFAULT_EDIT_MODEL, shard_size: int = 64, condition_area: int = 1024 * 1024,
                 batch_size: int = 8, device: str = "auto", retry_failed: bool = False,
                 workers_deployment: str | None = None, shards_per_run: int | None = None,
                 deadline_s: float = 6 * 3600, verify: bool = False, create_bucket: bool = False,
                 content_hash: bool = False, rewrite_with: str = "none", rewrite_system_prompt: str | None = None,
                 rewrite_max_tokens: int = 256) -> dict:
    # plan
    settings = JobSettings(qwen3, edit_model, None, device, condition_area, batch_size=batch_size,
                           rewrite_with=rewrite_with, rewrite_system_prompt=rewrite_system_prompt,
                           rewrite_max_tokens=rewrite_max_tokens).to_dict()
    plan = shard_inputs(input, output, settings, "build-caches", prompt, shard_size, retry_failed, create_bucket,
                        content_hash)
    # run and report
    return run_and_report(output, "build-caches", plan, settings, shard_size, workers_deployment, shards_per_run,
                          deadline_s, verify)
