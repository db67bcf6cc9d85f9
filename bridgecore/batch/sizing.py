"""How many shards one child run (one GPU worker, models loaded once) should take.

A child run pays one model load (about 70 GB of bf16 weights at real scale) and then computes. To keep
loading at most `max_load_fraction` of the child's time, each child needs enough samples; to keep every
worker busy, no child may take more than its share. Compute comes from the planner's FLOPs at the job's
condition size and sustained throughputs; the defaults are what a lent H200 measured (bench/results:
VLM extraction ~120 TFLOP/s, DiT ~400 TFLOP/s, cold load from local safetensors 1.3 GB/s).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

from bridgecore.batch.settings import JobSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildRunCost:
    load_seconds: float  # loading every model once
    sample_seconds: float  # extraction + bridge + every DiT step of one sample


@functools.lru_cache(maxsize=8)
def _real_scale_plan(condition_area: int, rewrite_tokens: int = 256) -> dict:
    from bridgecore.planning.planner import plan

    side = int(math.sqrt(condition_area))
    return plan(side, side, condition_area=condition_area, rewrite_tokens=rewrite_tokens)


def child_run_cost(settings: JobSettings, pipeline: str, vlm_tflops: float = 120.0, dit_tflops: float = 400.0,
                   load_gb_per_s: float = 1.3, decode_gb_per_s: float = 3360.0) -> ChildRunCost:
    """Real-scale estimate from the planner (real configs on the meta device), whatever models the job names.
    The rewrite arm adds Qwen3-VL's prefill, its decoding (memory-bound: the weights read once per step of a
    batch, at `decode_gb_per_s`, 70% of an H200's 4.8 TB/s) and the rewrite's Qwen2.5-VL encoding."""
    report = _real_scale_plan(settings.condition_area, settings.rewrite_max_tokens)
    models, flops = report["models"], report["flops"]
    weights = models["qwen3_vl"]["bytes_bf16"] + models["qwen25_vl"]["bytes_bf16"]
    vlm_work = flops["qwen3_extraction"]["total"] + flops["qwen25_extraction"]["total"]
    if settings.uses_cfg:
        vlm_work += flops["qwen25_extraction"]["total"]  # the negative prompt, Qwen2.5-VL only
    if settings.rewrite_with != "none":
        rewrite = report["rewrite"]
        vlm_work += rewrite["reencode"]
        if settings.rewrite_with == "qwen3":
            vlm_work += rewrite["prefill"]
    seconds = vlm_work / (vlm_tflops * 1e12)
    if settings.rewrite_with == "qwen3":
        steps = report["rewrite"]["new_tokens"] - 1
        seconds += steps * report["rewrite"]["decode_weight_bytes"] / (decode_gb_per_s * 1e9) / settings.batch_size
    if pipeline == "bulk-edit":
        weights += models["transformer"]["bytes_bf16"] + models["vae"]["bytes_bf16"]
        dit_work = flops["dit_step"] * settings.steps * (2 if settings.uses_cfg else 1) + flops["bridge"]
        seconds += dit_work / (dit_tflops * 1e12)
    return ChildRunCost(weights / 1e9 / load_gb_per_s, seconds)


def shards_per_run(shards: int, shard_size: int, workers: int, cost: ChildRunCost,
                   max_load_fraction: float = 0.05) -> int:
    """Shards per child run: enough that loading stays under `max_load_fraction` of the child's time, but
    never so many that a worker would sit idle while another holds two children's worth of shards."""
    if shards < 1:
        return 1
    if workers < 1 or shard_size < 1 or not 0 < max_load_fraction < 1:
        raise ValueError(f"need workers >= 1, shard_size >= 1, 0 < max_load_fraction < 1; got {workers}, "
                         f"{shard_size}, {max_load_fraction}")
    # load <= f * (load + n * sample)  <=>  n >= load * (1 - f) / (f * sample)
    samples_needed = cost.load_seconds * (1 - max_load_fraction) / (max_load_fraction * cost.sample_seconds)
    wanted = max(1, math.ceil(samples_needed / shard_size))
    fair_share = max(1, math.ceil(shards / workers))
    chosen = min(wanted, fair_share)
    load_fraction = cost.load_seconds / (cost.load_seconds + chosen * shard_size * cost.sample_seconds)
    logger.info("%d shards per child run (%d wanted for <= %.0f%% loading, fair share %d of %d shards over %d "
                "workers): estimated loading %.1f%% of each child", chosen, wanted, 100 * max_load_fraction,
                fair_share, shards, workers, 100 * load_fraction)
    return chosen


def pending_gpu_hours(samples: int, settings: JobSettings, pipeline: str) -> float:
    """GPU-hours of `samples` samples at real scale (the planner's FLOPs at `child_run_cost`'s throughputs), whatever
    models the job names: what the pending work would cost on the real models, printed before dispatch."""
    return samples * child_run_cost(settings, pipeline).sample_seconds / 3600
