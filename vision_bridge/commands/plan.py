"""`vision-bridge plan`: real-scale sizes, FLOPs and memory, or a job's GPU-hours, storage and cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from vision_bridge.app import app, fail

# the options that only a job (--images N) reads
JOB_OPTIONS = ("resolution", "steps", "gpu", "efficiency", "cfg", "price", "measured", "train_steps",
               "train_batch_size", "measured_training", "gpus", "rewrite", "cache_dtype", "cache_deepstack",
               "qwen3_area")


@app.command()
def plan(
    ctx: typer.Context,
    image_size: tuple[int, int] = typer.Option((1024, 1024), help="Input image height and width in pixels."),
    condition_area: int = typer.Option(1024 * 1024, help="Condition-image area the pipeline resizes to."),
    images: Optional[int] = typer.Option(None, help="Plan a job of this many images: GPU-hours, storage and cost "
                                         "(instead of the model report)."),
    resolution: int = typer.Option(1024, help="Job: edit resolution (square side; condition area = side^2)."),
    steps: int = typer.Option(50, help="Job: denoising steps per image (a Lightning LoRA: 4 or 8)."),
    gpu: str = typer.Option("h100", help="Job: h100, h200, a100 or l40s (dense bf16 peak from the datasheet)."),
    efficiency: Optional[float] = typer.Option(None, help="Job: achieved fraction of the bf16 peak [default 0.55, "
                                               "the H200 anchor: 17.78 s per 1024^2 50-step edit]."),
    cfg: bool = typer.Option(False, "--cfg", help="Job: true CFG (negative prompt encoded, two DiT passes per step)."),
    price: Optional[float] = typer.Option(None, help="Job: USD per GPU-hour, for the cost."),
    measured: Optional[Path] = typer.Option(None, help="Job: per-stage efficiencies (MFU) and VAE time from a "
                                            "bench/gpu_realdim.py --json file."),
    train_steps: int = typer.Option(0, help="Job: bridge training steps to add (frozen DiT: 3 DiT passes per sample)."),
    train_batch_size: int = typer.Option(4, help="Job: training global batch (batch size x data streams x "
                                         "accumulation)."),
    measured_training: Optional[Path] = typer.Option(None, help="Job: price training at the seconds per sample per GPU "
                                                     "a `vision-bridge train` run measured (its metrics.json)."),
    gpus: int = typer.Option(1, help="Job: GPUs working in parallel (for the wall-clock days)."),
    rewrite: bool = typer.Option(False, "--rewrite", help="Job: add the rewrite arm (Qwen3-VL generates each rewrite, "
                                 "memory-bound decoding priced from the card's bandwidth; Qwen2.5-VL encodes it)."),
    rewrite_tokens: int = typer.Option(256, help="Job: generated tokens per rewrite (the cap: an upper bound)."),
    cache_dtype: str = typer.Option("native", help="Job: how caches are stored: native (bf16), fp8 or int8 (a byte a "
                                    "value plus their scales)."),
    cache_deepstack: bool = typer.Option(False, "--cache-deepstack", help="Job: caches keep Qwen3-VL's DeepStack taps."),
    qwen3_area: Optional[int] = typer.Option(None, help="Job: Qwen3-VL's view of the condition image in pixels, when "
                                             "smaller than the DiT's (e.g. 147456 = 384^2, Edit-2509's VLM view)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
):
    """Real-scale sizes from the real configs on the meta device: parameters, weight memory (bf16, int8),
    inference memory per residency mode, vision tokens, and forward FLOPs of one extraction and one DiT step
    (analytic matmul count), and the rewrite arm's prefill, decoding and re-encoding. With --images N: the job's
    GPU-hours (extract, edit, rewrite with --rewrite, train), storage and cost."""
    from bridgecore.planning.job_cost import format_job_cost, plan_job_cost
    from bridgecore.planning.planner import format_plan
    from bridgecore.planning.planner import plan as make_plan

    if condition_area < 32 * 32 or min(image_size) < 1:
        fail(f"--condition-area must be at least 32*32 = 1024 pixels and --image-size positive; got {condition_area}, "
             f"{image_size[0]}x{image_size[1]}")
    if images is None:  # a job option without a job would be dropped without a word
        given = [name for name in JOB_OPTIONS  # (typer's own click: the source compared by name)
                 if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"]
        if given:
            fail(f"{', '.join('--' + name.replace('_', '-') for name in given)} price a job: add --images N "
                 "(without it, plan prints the model report)")
    try:
        if images is not None:
            report = plan_job_cost(images, resolution, steps, gpu, cfg, efficiency, price, measured, train_steps,
                                   train_batch_size, gpus=gpus, rewrite=rewrite, rewrite_tokens=rewrite_tokens,
                                   train_measured=measured_training, cache_dtype=cache_dtype,
                                   cache_deepstack=cache_deepstack, qwen3_area=qwen3_area)
            text = format_job_cost(report)
        else:
            report = make_plan(*image_size, condition_area=condition_area, rewrite_tokens=rewrite_tokens)
            text = format_plan(report)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    typer.echo(json.dumps(report, indent=2) if as_json else text)
