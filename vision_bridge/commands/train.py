"""`vision-bridge train`: train the bridge from a manifest or from build-caches' output."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bridgecore.batch.settings import JOB_DEFAULTS as J
from bridgecore.batch.sharding import CACHE_SHARD_SIZE
from bridgecore.model.loading import ModelNotAvailableError
from bridgecore.training.trainer import TRAINING_DEFAULTS as T
from vision_bridge.app import app, fail, resolve_or_tiny, user_errors


@app.command()
def train(
    data: str = typer.Option(..., help="Triplets: a manifest with a 'target' column (e.g. make-benchmark output) or a "
                             "cache location written by build-caches."),
    out: str = typer.Option(..., help="Checkpoint directory or URL (s3://...): the final bridge, step_NNNNNN/ "
                            "checkpoints, metrics.json, loss_curve.png. An existing run there is resumed."),
    qwen3: Optional[str] = typer.Option(None, help="Qwen3-VL hub id or directory (default: real, else tiny zoo)."),
    edit_model: Optional[str] = typer.Option(None, help="Edit pipeline hub id or directory (default: real, else tiny)."),
    steps: int = typer.Option(T["steps"], help="Optimizer steps."),
    batch_size: int = typer.Option(T["batch_size"], help="Samples per forward pass of one data stream (same resolution per batch). "
                                   "Global batch = batch size x data streams x grad accumulation."),
    grad_accumulation: int = typer.Option(T["grad_accumulation"], help="Micro-batches per data stream per optimizer step."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Train on N local GPUs (one process each, "
                                       "torch.distributed; gloo on a machine without GPUs)."),
    data_streams: Optional[int] = typer.Option(None, help="Independent data streams (default: --nproc-per-node). "
                                               "Fixes the global batch: any number of GPUs dividing it gives the "
                                               "same training, and a run resumes on another number of GPUs."),
    shuffle_buffer: int = typer.Option(T["shuffle_buffer"], help="Examples per data stream's shuffle buffer: with one shard per "
                                       "stream, what training holds in memory, whatever the data's size."),
    data_workers: int = typer.Option(T["data_workers"], help="Reader processes per GPU (a divisor of its data streams; 0: read in "
                                     "the training process, a thread reading ahead)."),
    shard_size: int = typer.Option(CACHE_SHARD_SIZE, help="Triplets per cache shard when --data is a manifest (a data stream "
                                   "reads whole shards; every stream needs at least one)."),
    lr: float = typer.Option(T["learning_rate"], help="AdamW learning rate (linear warm-up)."),
    eval_every: int = typer.Option(T["eval_every"], help="Held-out loss and checkpoint every K steps."),
    seed: int = typer.Option(T["seed"], help="Seed of data order, noise and timesteps (deterministic on CPU)."),
    rank: int = typer.Option(T["rank"], help="Bridge rank (256 gives ~5M parameters at real dims)."),
    mode: str = typer.Option(T["mode"], help="Bridge design: 'tokens' appends K conditioning tokens read from Qwen3-VL "
                             "(can add what the DiT's own encoder lacks), 'residual' corrects the existing tokens "
                             "(bounded; cannot add a missing word), 'both' (the default: measured best)."),
    num_tokens: int = typer.Option(T["num_tokens"], help="K, the tokens the token path appends (with K >= 2 the first "
                                   "half read Qwen3-VL's text positions, the rest its vision positions)."),
    ablate_qwen3: str = typer.Option(T["ablate_qwen3"], help="Train a control: 'shuffle' pairs each sample with another sample's "
                                     "Qwen3 caches at every step, 'zeros' zeroes them; 'none' trains normally."),
    condition_area: int = typer.Option(J["condition_area"], help="Condition-image area in pixels."),
    device: str = typer.Option(J["device"], help="'auto', 'cpu', 'cuda', ..."),
    cache_deepstack: bool = typer.Option(J["cache_deepstack"], "--cache-deepstack/--no-cache-deepstack",
                                         help="The caches keep Qwen3-VL's DeepStack taps (build-caches' "
                                         "cache_deepstack: part of their fingerprint)."),
    qwen3_area: Optional[int] = typer.Option(J["qwen3_area"], help="Qwen3-VL's view of the condition image "
                                             "(build-caches' qwen3_area: part of the caches' fingerprint)."),
    cache_dtype: str = typer.Option(J["cache_dtype"], help="How the caches are (or are to be) stored: native, fp8 or int8 "
                                    "(build-caches' cache_dtype: part of their fingerprint, so training finds them)."),
    load_in_8bit: bool = typer.Option(J["load_in_8bit"], help="The caches were built with 8-bit VLMs (build-caches' "
                                      "load_in_8bit): part of their fingerprint, so training finds them."),
):
    """Train the bridge with Qwen-Image-Edit's own flow-matching loss; the DiT, VAE and VLMs stay frozen.
    Writes metrics.json with heldout_loss_baseline (zero-init bridge = Qwen-Image-Edit as is),
    heldout_loss_trained, heldout_loss_qwen3_shuffled (the trained bridge with Qwen3 caches permuted across
    held-out samples) and qwen3_information_gain (their difference, with a bootstrap 95% CI): the evidence
    that the bridge uses Qwen3-VL's information rather than a generic bias. Use the result with
    `edit --bridge OUT` or `bulk-edit --bridge OUT`."""
    from bridgecore.batch.settings import settings_for_job
    from bridgecore.batch.training_data import RankFailedError, run_training
    from bridgecore.training.trainer import ABLATIONS, TrainConfig

    if ablate_qwen3 not in ABLATIONS:
        fail(f"--ablate-qwen3 must be one of {', '.join(ABLATIONS)}; got {ablate_qwen3!r}")
    if "://" not in out and Path(out).exists() and not Path(out).is_dir():
        fail(f"--out {out} is a file, not a folder: training writes a checkpoint folder there")
    from bridgecore.model.bridge import MODES, BridgeConfig

    if mode not in MODES:
        fail(f"--mode must be one of {', '.join(MODES)}; got {mode!r}")
    try:  # the bridge's own checks (rank, heads, learning rate) before any cache is built
        BridgeConfig(rank=rank, mode=mode, num_tokens=num_tokens, learning_rate=lr)
    except ValueError as error:
        fail(f"{error} (--rank, --mode, --num-tokens, --lr)")
    qwen3, edit_model = resolve_or_tiny(qwen3, edit_model)
    try:  # the build-caches job's settings: its fingerprints find the caches it wrote
        settings = settings_for_job(dict(qwen3=qwen3, edit_model=edit_model, device=device, condition_area=condition_area,
                                         load_in_8bit=load_in_8bit, cache_dtype=cache_dtype,
                                         cache_deepstack=cache_deepstack, qwen3_area=qwen3_area),
                                    route_multi_image=False)
    except user_errors() as error:
        fail(str(error))
    try:
        config = TrainConfig(steps=steps, batch_size=batch_size, grad_accumulation=grad_accumulation, learning_rate=lr,
                             eval_every=eval_every, checkpoint_every=eval_every, seed=seed, ablate_qwen3=ablate_qwen3,
                             data_streams=data_streams or nproc_per_node, shuffle_buffer=shuffle_buffer,
                             data_workers=data_workers)
        metrics = run_training(data, out, settings, config, {"rank": rank, "mode": mode, "num_tokens": num_tokens},
                               nproc_per_node=nproc_per_node, shard_size=shard_size)
    except (ValueError, ModelNotAvailableError, RankFailedError) as error:
        fail(str(error))
    stats = metrics["bridge_statistics"]
    typer.echo(f"held-out flow-matching loss: zero-init bridge {metrics['heldout_loss_baseline']:.5f} -> trained "
               f"{metrics['heldout_loss_trained']:.5f}; trained with Qwen3 caches shuffled across held-out samples "
               f"{metrics['heldout_loss_qwen3_shuffled']:.5f}" + (f" (trained with --ablate-qwen3 {ablate_qwen3})"
                                                                   if ablate_qwen3 != "none" else ""))
    typer.echo(f"bridge ({metrics['bridge_mode']}): {_describe_statistics(stats)}; saved in {out} (metrics.json, "
               "loss_curve.png)")
    zeroed = metrics["heldout_loss_level_zeroed"]
    if zeroed:
        typer.echo("held-out loss with one Qwen3 level zeroed (higher = that level carries more): " + ", ".join(
            f"{level} {loss:.5f}" for level, loss in zeroed.items()) + f" (none zeroed {metrics['heldout_loss_trained']:.5f})")
    typer.echo(f"{metrics['world_size']} process(es), {metrics['data_streams']} data stream(s), global batch "
               f"{metrics['global_batch']}: {metrics['samples_per_s']:.1f} samples/s, "
               f"{metrics['data_wait_share']:.0%} of the time waiting for data")
    gain_low, gain_high = metrics["heldout_gain_ci"]
    typer.echo(f"no harm (the bridge vs Qwen-Image-Edit alone, same held-out samples and noise): held-out loss "
               f"{metrics['heldout_loss_baseline']:.5f} -> {metrics['heldout_loss_trained']:.5f}, gain "
               f"{metrics['heldout_gain']:+.5f} [95% CI {gain_low:+.5f}, {gain_high:+.5f}]: {metrics['no_harm']['verdict']}")
    low, high = metrics["qwen3_information_gain_ci"]  # the headline, last
    typer.echo(f"Qwen3 information gain (held-out loss, shuffled - real Qwen3 caches): "
               f"{metrics['qwen3_information_gain']:+.5f} [95% CI {low:+.5f}, {high:+.5f}] = "
               f"{metrics['qwen3_information_gain_relative']:+.2%} of the baseline loss, "
               f"{metrics['heldout_examples']} held-out samples")


def _describe_statistics(stats: dict) -> str:
    parts = []
    if "gate_text" in stats:
        parts.append(f"correction/base RMS {stats['correction_rms_ratio']:.3f}, token cosine {stats['token_cosine_base']:.3f}"
                     f" -> {stats['token_cosine_enhanced']:.3f}, gates text {stats['gate_text']:+.3f} vision "
                     f"{stats['gate_vision']:+.3f}")
    if stats.get("appended_tokens"):
        parts.append(f"{stats['appended_tokens']} appended tokens (RMS {stats['appended_rms_ratio']:.2f}x the base's, "
                     f"cosine with the base tokens {stats['appended_base_cosine']:+.3f})")
    return "; ".join(parts)
