"""Job cost planner: GPU-hours, storage and money for a bulk job, from the planner's FLOPs and an efficiency.

    vision-bridge plan --images 10000000 --resolution 1024 --steps 50 --gpu h100 --price 2.5 [--cfg] [--json]

Time per stage = FLOPs (analytic matmul count of the real models, `planner.py`) / (efficiency x the card's
dense bf16 peak). The efficiency is one number (`--efficiency`) or, with `--measured FILE`, the model FLOP
utilisation that `bench/gpu_realdim.py` measured per stage. The default comes from the public anchor:
Qwen-Image-Edit at 1024^2, 50 steps, no CFG, 17.78 s on one H200 is ~9.93 PFLOP, i.e. 0.56 of the H200's
989 TFLOP/s. Element-wise work and the VAE are not in the FLOP count; with `--measured` the VAE's measured
seconds are added. Storage counts what the batch job writes per image: vision caches (bf16), fused
embeddings and the edited PNG.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    bf16_dense_flops: float  # datasheet dense bf16 tensor-core peak, FLOP/s
    memory_gib: int
    memory_bandwidth: float  # datasheet HBM/GDDR bandwidth, bytes/s (prices memory-bound decoding)


GPUS = {
    "h100": GpuSpec("NVIDIA H100 SXM", 989.4e12, 80, 3.35e12),
    "h200": GpuSpec("NVIDIA H200 SXM", 989.4e12, 141, 4.8e12),
    "a100": GpuSpec("NVIDIA A100 SXM", 312e12, 80, 2.039e12),
    "l40s": GpuSpec("NVIDIA L40S", 362.05e12, 48, 0.864e12),
}
BANDWIDTH_EFFICIENCY = 0.7  # fraction of the datasheet bandwidth a decoding step reaches (estimate, not measured)
ANCHOR_H200_EDIT_SECONDS = 17.78  # Qwen-Image-Edit, 1024^2, 50 steps, guidance 1.0, warm, one H200 (vLLM-Omni)
ANCHOR_SGLANG_STEP_SECONDS = 0.605  # Qwen-Image-Edit-2511 on SGLang, seconds per denoising step
DEFAULT_EFFICIENCY = 0.55  # the H200 anchor implies 0.56 of peak; rounded down for the uncounted VAE and overheads
PNG_BYTES_PER_PIXEL = 1.5  # edited natural images as PNG (raw RGB is 3)
CACHE_BYTES_PER_VALUE = 2  # caches are written in the models' dtype: bf16 on GPU
FP8_BYTES_PER_VALUE, FP8_SCALE_BYTES = 1, 4  # cache_dtype "fp8": float8 E4M3 values, one float32 scale per token
# cache_dtype "int8": int8 values, a float32 scale per token and group of channels (model/cache_format.py's
# INT8_GROUP), a float32 mean per channel
INT8_BYTES_PER_VALUE, INT8_SCALE_BYTES, INT8_MEAN_BYTES = 1, 4, 4
TRAIN_DIT_PASSES = 3  # forward + checkpoint recompute + input-gradient backward (the frozen DiT has no weight grads)


def gpu_spec(name: str) -> GpuSpec:
    if name.lower() not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}; got {name!r}")
    return GPUS[name.lower()]


def gpu_key_for(device_name: str) -> str | None:
    """`h100` for 'NVIDIA H100 80GB HBM3', ...; None for a card not in `GPUS`."""
    lowered = device_name.lower()
    return next((key for key in GPUS if key in lowered), None)


def implied_efficiency(seconds: float, flops: float, gpu: str) -> float:
    """The efficiency at which `flops` take `seconds` on `gpu`."""
    return flops / seconds / gpu_spec(gpu).bf16_dense_flops


def _read_json(path: str | Path, expected: str) -> dict[str, Any]:
    """A measurement file's JSON object, or one error naming the file and what it should be."""
    try:
        value = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not JSON ({error}); expected {expected}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object; expected {expected}")
    return value


def measured_efficiencies(path: str | Path) -> dict[str, Any]:
    """Per-stage model FLOP utilisation, VAE seconds and bulk-edit's throughput from a `bench/gpu_realdim.py` JSON.

    The edit's efficiency is the whole edit's as the pipeline runs it at bulk-edit's defaults (eager, the default
    attention: its DiT FLOPs over its time less the VAE); the isolated `dit_step` is the fallback for older files.
    The extraction's is bulk-edit's batch (`*_extract_batch`) when measured, else one sample's."""
    data = _read_json(path, "a bench/gpu_realdim.py --json file")
    stages = data.get("stages", {})

    def mfu(stage: str) -> float | None:
        return stages.get(stage, {}).get("mfu")

    extract = [mfu(f"{name}_batch") or mfu(name) for name in ("qwen25_extract", "qwen3_extract")]
    extract = [value for value in extract if value]
    vae = sum(stages.get(s, {}).get("seconds", 0.0) for s in ("vae_encode", "vae_decode"))
    edit, edit_source = mfu("dit_step"), "dit_step"
    row = stages.get("denoise_and_decode", {})
    in_edit_vae = (row.get("vae_encode_s") or 0) + (row.get("vae_decode_s") or 0)
    if row.get("tflop") and data.get("peak_bf16_tflops") and row["seconds"] > in_edit_vae:
        edit = row["tflop"] / (row["seconds"] - in_edit_vae) / data["peak_bf16_tflops"]
        edit_source = "the whole eager edit (the pipeline's own loop, VAE excluded)"
    if not edit or not extract:
        raise ValueError(f"{path}: no measured dit_step / extraction MFU in it (is it gpu_realdim.py output "
                         "from a full run on a GPU?)")
    return {"edit": edit, "edit_source": edit_source, "extract": sum(extract) / len(extract), "vae_seconds": vae,
            "vae_pixels": data.get("condition_pixels"), "gpu": data.get("gpu_key"), "device": data.get("device"),
            "throughput": data.get("throughput"), "real_depth": data.get("real_depth", True),
            "steps": data.get("steps")}


def plan_job_cost(images: int, resolution: int = 1024, steps: int = 50, gpu: str = "h100", cfg: bool = False,
                  efficiency: float | None = None, price_per_gpu_hour: float | None = None,
                  measured: str | Path | None = None, train_steps: int = 0, train_batch_size: int = 4,
                  train_resolution: int | None = None, gpus: int = 1, rewrite: bool = False,
                  rewrite_tokens: int = 256, rewrite_batch: int = 4,
                  train_measured: str | Path | None = None, cache_dtype: str = "native",
                  cache_deepstack: bool = False, qwen3_area: int | None = None) -> dict[str, Any]:
    """GPU-hours (`*_gpu_hours`), storage (`*_gb`) and cost of editing `images` images at `resolution`^2.
    `rewrite` adds the rewrite arm: Qwen3-VL generating `rewrite_tokens` per sample (the cap: an upper bound)
    in batches of `rewrite_batch`, and Qwen2.5-VL encoding the rewrite.

    Training costs `train_steps x train_batch_size` samples (the global batch) at 3 DiT passes each; with
    `train_measured` (a training run's metrics.json) at the seconds per sample per GPU that run measured
    (world size / its samples/s: data parallelism adds GPUs, not GPU-hours). `gpus` divides the wall clock.
    Caches are priced as the caches stage writes them: `cache_dtype` "native" (bf16), "fp8" (one byte a value plus
    a 4-byte scale a token) or "int8" (one byte a value, a 4-byte scale a token and 128 channels, a 4-byte mean a
    channel), with Qwen3-VL's DeepStack taps only with `cache_deepstack`."""
    from bridgecore.planning.planner import plan

    if images < 0 or resolution < 64 or steps < 1 or gpus < 1 or train_steps < 0 or train_batch_size < 1:
        raise ValueError(f"need images >= 0, resolution >= 64, steps >= 1, gpus >= 1, train_steps >= 0, "
                         f"train_batch_size >= 1; got {images}, {resolution}, {steps}, {gpus}, {train_steps}, "
                         f"{train_batch_size}")
    if rewrite and (rewrite_tokens < 1 or rewrite_batch < 1):
        raise ValueError(f"need rewrite_tokens >= 1 and rewrite_batch >= 1; got {rewrite_tokens}, {rewrite_batch}")
    if price_per_gpu_hour is not None and not (math.isfinite(price_per_gpu_hour) and price_per_gpu_hour >= 0):
        raise ValueError(f"price must be a finite number >= 0 (USD per GPU-hour); got {price_per_gpu_hour}")
    if efficiency is not None and not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1]; got {efficiency}")
    spec = gpu_spec(gpu)
    eff = {"extract": efficiency or DEFAULT_EFFICIENCY, "edit": efficiency or DEFAULT_EFFICIENCY}
    vae_seconds, notes = 0.0, []
    if measured is not None:
        found = measured_efficiencies(measured)
        if efficiency is None:
            eff = {"extract": found["extract"], "edit": found["edit"]}
        if found["vae_pixels"]:
            vae_seconds = found["vae_seconds"] * resolution**2 / found["vae_pixels"]
        if found["gpu"] != gpu.lower():
            notes.append(f"efficiencies measured on {found['device']}, applied to {spec.name}")
        notes.append(f"edit efficiency from {found['edit_source']}")
    report = plan(resolution, resolution, condition_area=resolution**2, rewrite_tokens=rewrite_tokens,
                  qwen3_area=qwen3_area)
    flops = report["flops"]
    branches = 2 if cfg else 1  # true CFG: the DiT runs twice per step
    # true CFG's negative prompt is encoded by Qwen2.5-VL only (stage `negatives`): it is never bridged
    extract_flops = branches * flops["qwen25_extraction"]["total"] + flops["qwen3_extraction"]["total"]
    edit_flops = steps * branches * flops["dit_step"] + branches * flops["bridge"]
    peak = spec.bf16_dense_flops
    extract_s, edit_s = extract_flops / (eff["extract"] * peak), edit_flops / (eff["edit"] * peak) + vae_seconds
    train_resolution = train_resolution or resolution
    train_report = report if train_resolution == resolution else plan(train_resolution, train_resolution,
                                                                      condition_area=train_resolution**2)
    train_sample_s = TRAIN_DIT_PASSES * train_report["flops"]["dit_step"] / (eff["edit"] * peak)
    train_source = "FLOPs at the edit efficiency"
    if train_measured is not None:
        train_sample_s, train_source = measured_training_seconds(train_measured)
        notes.append(f"training priced at {train_sample_s:.2f} s per sample per GPU, measured in {train_measured} "
                     "(at that run's resolution)")
    rewrite_flops, rewrite_s = (rewrite_seconds(report["rewrite"], spec, eff["extract"], rewrite_batch) if rewrite
                                else (0.0, 0.0))
    hours = {"extract_gpu_hours": images * extract_s / 3600, "edit_gpu_hours": images * edit_s / 3600,
             "rewrite_gpu_hours": images * rewrite_s / 3600,
             "train_gpu_hours": train_steps * train_batch_size * train_sample_s / 3600}
    hours["total_gpu_hours"] = sum(hours.values())
    storage = _storage_gb(report, images, branches, rewrite, cache_dtype, cache_deepstack)
    return {
        "images": images, "resolution": resolution, "steps": steps, "cfg": cfg, "gpu": gpu.lower(),
        "cache_dtype": cache_dtype, "cache_deepstack": cache_deepstack, "qwen3_area": qwen3_area,
        "gpu_name": spec.name, "gpu_bf16_dense_tflops": peak / 1e12, "gpus": gpus, "efficiency": eff,
        "efficiency_source": "--efficiency" if efficiency else ("--measured" if measured else "default (H200 anchor)"),
        "rewrite": rewrite, "rewrite_tokens": rewrite_tokens if rewrite else 0,
        "train_seconds_per_sample": train_sample_s, "train_source": train_source,
        "train_wall_clock_hours": train_steps * train_batch_size * train_sample_s / 3600 / gpus,
        "tflop_per_image": {"extract": extract_flops / 1e12, "edit": edit_flops / 1e12, "rewrite": rewrite_flops / 1e12},
        "seconds_per_image": {"extract": extract_s, "edit": edit_s, "rewrite": rewrite_s,
                              "total": extract_s + edit_s + rewrite_s},
        **hours,
        "wall_clock_days": hours["total_gpu_hours"] / gpus / 24,
        **storage,
        "price_per_gpu_hour": price_per_gpu_hour,
        "cost_usd": None if price_per_gpu_hour is None else hours["total_gpu_hours"] * price_per_gpu_hour,
        "notes": notes + ["FLOP-based times exclude element-wise work" + ("" if vae_seconds else " and the VAE")],
        "measured_throughput": _measured_throughput(found if measured is not None else None, resolution, steps, cfg,
                                                    gpu.lower()),
    }


def _measured_throughput(found: dict | None, resolution: int, steps: int, cfg: bool, gpu: str) -> dict | None:
    """bulk-edit's images per GPU-hour at its defaults (no compile, default attention) as the benchmark measured
    it, when it ran this job's settings on this card (1024^2 condition, the same steps, no CFG, real depth); else
    the reason it does not apply."""
    if not found:
        return None
    if not found.get("throughput"):  # a file from before the benchmark measured it
        return {"applies": False, "why_not": "the file has no throughput (written before the benchmark measured "
                                             "it; rerun bench/gpu_realdim.py)"}
    throughput = found["throughput"]
    differences = [label for label, same in (
        (f"measured on {found['device']}", found["gpu"] == gpu), ("at reduced depth", found["real_depth"]),
        (f"at {throughput['steps']} steps", throughput["steps"] == steps), ("without CFG", not cfg),
        (f"at {found['vae_pixels']} condition pixels", found["vae_pixels"] == resolution**2)) if not same]
    if differences:
        return {"applies": False, "why_not": "the benchmark's run differs (" + ", ".join(differences) + ")"}
    return {"applies": True, "images_per_gpu_hour": throughput["images_per_gpu_hour"],
            "seconds_per_image": throughput["seconds_per_image"], "config": throughput["config"],
            "lightning_images_per_gpu_hour": throughput.get("lightning_images_per_gpu_hour"),
            "lightning_steps": throughput.get("lightning_steps")}


def measured_training_seconds(metrics: str | Path) -> tuple[float, str]:
    """Seconds per training sample per GPU from a training run's metrics.json (world size / samples per second)."""
    values = _read_json(metrics, "a metrics.json written by `vision-bridge train`")
    rate, world = values.get("samples_per_s"), values.get("world_size", 1)
    if not rate:
        raise ValueError(f"{metrics}: no samples_per_s (a metrics.json written by `vision-bridge train`?)")
    return world / rate, f"measured ({world} process(es), {rate:.2f} samples/s)"


def rewrite_seconds(cost: dict[str, Any], spec: GpuSpec, efficiency: float, batch: int) -> tuple[float, float]:
    """(FLOPs, seconds) of the rewrite arm per sample: prefill and re-encode at the extraction efficiency; each
    decoding step of a batch takes the longer of its FLOPs and its memory traffic (the weights once, every
    sample's KV cache) at `BANDWIDTH_EFFICIENCY` of the card's bandwidth."""
    flops = cost["prefill"] + cost["decode"] + cost["reencode"]
    compute = (cost["prefill"] + cost["reencode"]) / (efficiency * spec.bf16_dense_flops)
    steps = cost["new_tokens"] - 1  # token 1 comes from the prefill's LM head
    mean_context = cost["context_tokens"] / max(1, steps)
    step_bytes = cost["decode_weight_bytes"] + batch * mean_context * cost["kv_bytes_per_token"]
    step_seconds = max(batch * cost["decode"] / max(1, cost["new_tokens"]) / (efficiency * spec.bf16_dense_flops),
                       step_bytes / (BANDWIDTH_EFFICIENCY * spec.memory_bandwidth))
    return flops, compute + steps * step_seconds / batch


def _storage_gb(report: dict[str, Any], images: int, branches: int, rewrite: bool = False,
                cache_dtype: str = "native", cache_deepstack: bool = False) -> dict[str, float]:
    if cache_dtype not in ("native", "fp8", "int8"):
        raise ValueError(f"cache_dtype must be native, fp8 or int8; got {cache_dtype!r}")
    tokens, d3, d25 = report["tokens"], report["hidden_sizes"]["qwen3"], report["hidden_sizes"]["qwen25"]
    # (tokens, width) of each cached tensor: early/mid/late over the sequence, the DeepStack taps over the vision tokens
    qwen3 = [(tokens["qwen3_sequence"], d3)] * 3 + ([(tokens["qwen3_vision"], d3)] * 3 if cache_deepstack else [])
    qwen25 = [(tokens["qwen25_prompt_embeds"], d25)]

    def stored(tensors) -> float:
        if cache_dtype == "fp8":  # a byte a value and a float32 scale a token
            return sum(n * (d * FP8_BYTES_PER_VALUE + FP8_SCALE_BYTES) for n, d in tensors)
        if cache_dtype == "int8":  # a byte a value, a float32 scale a token and group, a float32 mean a channel
            from bridgecore.model.cache_format import int8_groups

            return sum(n * (d * INT8_BYTES_PER_VALUE + int8_groups(d) * INT8_SCALE_BYTES) + d * INT8_MEAN_BYTES
                       for n, d in tensors)
        return sum(n * d * CACHE_BYTES_PER_VALUE for n, d in tensors)

    # the negatives (true CFG) are Qwen2.5-VL embeddings alone, stored with the caches and again with the fused
    # embeddings; Qwen3-VL reads only the conditional branch. Qwen2.5-VL's embeddings, the DiT's own conditioning,
    # are always stored as computed (fp8/int8 apply to Qwen3-VL's features only)
    cache = stored(qwen3) + branches * sum(n * d * CACHE_BYTES_PER_VALUE for n, d in qwen25)
    fused = branches * qwen25[0][0] * d25 * CACHE_BYTES_PER_VALUE  # the fused embeddings: in the models' dtype
    height, width = report["condition_size"]
    output = height * width * PNG_BYTES_PER_PIXEL
    per_image = {"cache_storage_gb": cache, "fused_storage_gb": fused, "output_storage_gb": output}
    if rewrite:  # the rewrite's Qwen2.5-VL encoding: the prompt with the rewrite (at its cap) for the instruction
        from bridgecore.planning.planner import DEFAULT_INSTRUCTION_TOKENS

        rewritten = tokens["qwen25_prompt_embeds"] - DEFAULT_INSTRUCTION_TOKENS + report["rewrite"]["new_tokens"]
        per_image["rewrite_storage_gb"] = rewritten * d25 * CACHE_BYTES_PER_VALUE
    result = {key: images * value / 1e9 for key, value in per_image.items()}
    result["total_storage_gb"] = sum(result.values())
    result["cache_mb_per_image"] = cache / 1e6
    return result


def format_job_cost(cost: dict[str, Any]) -> str:
    gpus = f"{cost['gpus']} GPU{'s' if cost['gpus'] > 1 else ''}"
    e = cost["efficiency"]
    lines = [
        f"{cost['images']:,} images at {cost['resolution']}^2, {cost['steps']} steps"
        + (", true CFG" if cost["cfg"] else "") + f" on {cost['gpu_name']} "
        f"({cost['gpu_bf16_dense_tflops']:.0f} TFLOP/s bf16 dense; efficiency extract {e['extract']:.2f}, "
        f"edit {e['edit']:.2f}, {cost['efficiency_source']})",
        f"per image: extract {cost['tflop_per_image']['extract']:.1f} TFLOP {cost['seconds_per_image']['extract']:.2f} s, "
        f"edit {cost['tflop_per_image']['edit']:.0f} TFLOP {cost['seconds_per_image']['edit']:.2f} s"
        + (f", rewrite ({cost['rewrite_tokens']} tokens) {cost['tflop_per_image']['rewrite']:.1f} TFLOP "
           f"{cost['seconds_per_image']['rewrite']:.2f} s" if cost["rewrite"] else ""),
        f"GPU-hours: extract {cost['extract_gpu_hours']:,.0f}, edit {cost['edit_gpu_hours']:,.0f}, "
        + (f"rewrite {cost['rewrite_gpu_hours']:,.1f}, " if cost["rewrite"] else "")
        + f"train {cost['train_gpu_hours']:,.1f} ({cost['train_seconds_per_sample']:.2f} s/sample/GPU, "
        f"{cost['train_source']}; {cost['train_wall_clock_hours']:,.1f} h on {gpus}), "
        f"total {cost['total_gpu_hours']:,.0f} "
        f"({cost['wall_clock_days']:,.1f} days on {gpus})",
        f"storage: caches {cost['cache_storage_gb']:,.0f} GB ({cost['cache_mb_per_image']:.1f} MB/image), fused "
        f"{cost['fused_storage_gb']:,.0f} GB, outputs {cost['output_storage_gb']:,.0f} GB, "
        + (f"rewrites {cost['rewrite_storage_gb']:,.0f} GB, " if cost["rewrite"] else "") + f"total "
        f"{cost['total_storage_gb']:,.0f} GB",
        "cost: " + (f"${cost['cost_usd']:,.0f} at ${cost['price_per_gpu_hour']}/GPU-hour" if cost["cost_usd"] is not None
                    else "give --price USD_PER_GPU_HOUR"),
    ]
    measured = cost.get("measured_throughput")
    if measured and measured["applies"]:
        lines.append(f"measured (bench/gpu_realdim.py, {measured['config']}): {measured['images_per_gpu_hour']:,.0f} "
                     f"images per GPU-hour ({measured['seconds_per_image']:.2f} s/image, extraction + bridge + edit + "
                     "decode, models resident)" + (f"; {measured['lightning_images_per_gpu_hour']:,.0f} with a "
                                                   f"Lightning {measured['lightning_steps']}-step LoRA"
                                                   if measured.get("lightning_images_per_gpu_hour")
                                                   else ""))
    elif measured:
        lines.append(f"measured throughput not applied: {measured['why_not']}")
    return "\n".join(lines + [f"note: {n}" for n in cost["notes"]])
