"""`vision-bridge bulk-edit`: the bulk-edit flow, locally, on a temporary Prefect server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from bridgecore.batch.settings import JOB_DEFAULTS as D  # the one home of a job's defaults
from bridgecore.batch.sharding import EDIT_SHARD_SIZE
from vision_bridge import app as shared
from vision_bridge.app import (
    DEFAULT_HOME,
    TINY_ZOO_DIR,
    app,
    banner,
    caused_by_interrupt,
    check_input_first,
    fail,
    preflight,
    resolve_or_tiny,
    tiny_task_settings,
    user_errors,
)


@app.command("bulk-edit")
def bulk_edit(
    input: str = typer.Option(..., "--input", help="Manifest (.csv/.jsonl/.parquet with image|images, instruction, "
                              "optional target and id) or a folder/glob of images (then --prompt). Local path or URL."),
    output: str = typer.Option(..., help="Output directory or URL (s3://bucket/prefix). Several settings can share "
                               "one output: each stage's results are kept per the settings they depend on."),
    prompt: Optional[str] = typer.Option(None, help="Instruction for every image of a folder/glob input."),
    qwen3: Optional[str] = typer.Option(None, help="Qwen3-VL hub id or directory (default: real, else tiny zoo)."),
    edit_model: Optional[str] = typer.Option(None, help="Edit pipeline hub id or directory (default: real, else tiny)."),
    bridge: Optional[str] = typer.Option(None, help="Trained bridge directory (default: untrained = baseline)."),
    multi_image: bool = typer.Option(False, help="Samples have several images: use the Edit-Plus pipeline."),
    plus_model: Optional[str] = typer.Option(None, help="Edit-Plus model (e.g. Qwen/Qwen-Image-Edit-2511) for the "
                                             "multi-image samples of a single-image job, so a mixed manifest runs in "
                                             "one job [default: none, those samples fail with a hint; the tiny zoo's "
                                             "with the tiny models]. Not with --lora."),
    editor: str = typer.Option(D["editor"], help="Editor family: auto (from the edit model's model_index.json), "
                               "qwen-image-edit, qwen-image-edit-plus, or qwen-image-2.1 (the native arm: Qwen-Image-2.1 "
                               "reads Qwen3-VL itself; no bridge; default model Qwen/Qwen-Image-2.1, 40 steps)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps [default: 50, or what a Lightning LoRA needs]."),
    seed: int = typer.Option(D["seed"], help="Job seed; each sample's noise seed derives from it and the sample id."),
    cfg: float = typer.Option(D["cfg"], help="true_cfg_scale; > 1 also encodes --negative-prompt (twice the DiT work)."),
    negative_prompt: str = typer.Option(D["negative_prompt"], help="Negative prompt used when --cfg > 1 (Qwen's examples use ' ')."),
    condition_area: Optional[int] = typer.Option(None, help=f"Condition-image area in pixels [default: "
                                                 f"{D['condition_area']}; the tiny trained model's own 64*64]."),
    shard_size: int = typer.Option(EDIT_SHARD_SIZE, help="Samples per shard (the unit of caching, retries and scale-out)."),
    batch_size: int = typer.Option(D["batch_size"], help="Samples per model forward (VLM batch, DiT batch of equal sizes)."),
    retry_failed: bool = typer.Option(False, help="Rerun only the samples that failed under these settings."),
    content_hash: bool = typer.Option(False, "--content-hash", help="Identify local input files by a hash of their "
                                      "bytes instead of size + modification time (reads every file while planning; "
                                      "use it when files may be replaced in place with the same size and time; "
                                      "switching it changes every sample's identity, so the next run plans anew)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan only: print the shards, what is already done "
                                 "under these settings, what would run and its GPU-hours on the real models; "
                                 "writes nothing but the plan."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N samples of the input: a trial run "
                                        "with the job's own settings and fingerprints (the full run reuses it)."),
    verify: bool = typer.Option(False, "--verify", help="Check every edited image against its checksum when "
                                "summarizing (sizes are always checked); damaged ones are recomputed."),
    create_bucket: bool = typer.Option(False, "--create-bucket", help="Create the output's S3 bucket if it does not "
                                       "exist (otherwise a missing bucket is an error: it is usually a typo)."),
    device: str = typer.Option(D["device"], help="'auto', 'cpu', 'cuda', ..."),
    load_in_8bit: bool = typer.Option(D["load_in_8bit"], help="Load both VLMs in 8-bit (bitsandbytes): ~17 GiB instead of ~32."),
    lora: Optional[list[str]] = typer.Option(None, help="LoRA for the DiT, PATH_OR_ID[:scale]; repeatable (see `edit`)."),
    scheduler: str = typer.Option(D["scheduler"], help="auto (Lightning's with a Lightning LoRA), default, lightning."),
    compile: bool = typer.Option(D["compile"], "--compile", help="torch.compile the DiT's repeated block (regional)."),
    attention_backend: Optional[str] = typer.Option(None, help="diffusers attention backend for the DiT."),
    dit_offload: bool = typer.Option(D["dit_offload"], help="Stream the DiT's blocks from host RAM (24 GB-class cards)."),
    step_cache: float = typer.Option(D["step_cache"], help="Fast mode: First Block Cache threshold (e.g. 0.05-0.2; 0 = "
                                     "off, the exact edit). Skips most of the DiT on steps where its first block "
                                     "barely moved: faster, approximate (other edits, another fingerprint)."),
    batch_cfg: bool = typer.Option(D["batch_cfg"], "--batch-cfg", help="With --cfg > 1: run true CFG's two DiT "
                                   "forwards per step as one batch of two (exact; faster or not depending on the card "
                                   "and attention backend: bench/gpu_realdim.py measures it)."),
    fp8: str = typer.Option(D["fp8"], help="FP8 for the DiT's block projections (torchao): off; dynamic (FP8 matmuls on "
                            "FP8 tensor cores: H100/H200/L40S/RTX 4090 and later); weights (FP8 storage, bf16 compute: "
                            "the DiT in ~19 GiB instead of 38). Approximate: other edits, another fingerprint."),
    rewrite_with: str = typer.Option(D["rewrite_with"], help="The rewrite arm: qwen3 lets Qwen3-VL (the bridge's model, the same "
                                     "images) rewrite each instruction, greedily, and Qwen-Image-Edit's own encoder "
                                     "reads the rewrite (stored in summary.parquet); identity forces the rewrite to be "
                                     "the instruction (the control: the Edit arm's edits); none: off. Combines with "
                                     "--bridge."),
    rewrite_system_prompt: Optional[str] = typer.Option(None, help="The rewriter's system prompt, as TEXT or @FILE "
                                                        "[default: bridgecore.model.rewrite.SYSTEM_PROMPT]."),
    rewrite_max_tokens: int = typer.Option(D["rewrite_max_tokens"], help="Token cap of each rewrite."),
    cache_deepstack: bool = typer.Option(D["cache_deepstack"], "--cache-deepstack/--no-cache-deepstack", help="Keep "
                                         "Qwen3-VL's DeepStack taps in the caches (~40% of a 1024^2 cache; only a "
                                         "bridge with use_deepstack reads them)."),
    qwen3_area: Optional[int] = typer.Option(D["qwen3_area"], help="Qwen3-VL's view of each condition image in pixels when smaller than the condition area (e.g. 262144 = 512^2): smaller caches and extraction; the bridge resamples its grid."),
    cache_dtype: str = typer.Option(D["cache_dtype"], help="How the vision caches are stored: native (as computed, bf16 on a GPU), fp8 (float8 E4M3 with per-token scales) or int8 (channel means out, int8 scaled per token and 128 channels): Qwen3-VL's features in half the bytes; see docs/batch.md."),
    edits_format: str = typer.Option(D["edits_format"], help="png: one PNG object per edit (+ metadata.parquet, an "
                                     "imagefolder); webdataset: one tar per shard with <key>.png and <key>.json "
                                     "(far fewer objects at scale; WebDataset and fsspec's tar:// read it)."),
):
    """Run the bulk-edit flow locally (ephemeral Prefect, no server to set up): shard, extract, fuse, edit,
    evaluate. Reruns resume, and only the stages a changed setting affects run again (a new --bridge reuses
    the extracted caches; new --steps/--seed/--cfg reuse the fused embeddings too; a new rewrite system prompt
    reruns the rewrites and what reads them)."""
    from bridgecore.batch.settings import settings_for_job

    check_input_first(input, prompt)  # before minutes of tiny-zoo training; nothing is written yet
    qwen3, edit_model = resolve_or_tiny(qwen3, edit_model, plus=multi_image, trained=True, editor=editor)
    steps, condition_area = tiny_task_settings(edit_model, steps, condition_area, D["condition_area"])
    try:
        if rewrite_system_prompt is not None and rewrite_with == "none":
            raise ValueError("--rewrite-system-prompt sets the rewrite arm's prompt: add --rewrite-with qwen3")
        if rewrite_system_prompt is not None and rewrite_system_prompt.startswith("@"):
            rewrite_system_prompt = Path(rewrite_system_prompt[1:]).expanduser().read_text(encoding="utf-8")
        # The job as the deployment's flow receives it; `JobSettings.for_job` decides every default, there and here.
        job = dict(qwen3=qwen3, edit_model=edit_model, editor=editor, multi_image=multi_image, steps=steps,
                   plus_model=plus_model, bridge=bridge, device=device, condition_area=condition_area, seed=seed,
                   batch_size=batch_size, cfg=cfg, negative_prompt=negative_prompt, load_in_8bit=load_in_8bit,
                   lora=list(lora or []), scheduler=scheduler, compile=compile, attention_backend=attention_backend,
                   dit_offload=dit_offload, rewrite_with=rewrite_with, rewrite_system_prompt=rewrite_system_prompt,
                   rewrite_max_tokens=rewrite_max_tokens, edits_format=edits_format, cache_dtype=cache_dtype, cache_deepstack=cache_deepstack,
                   qwen3_area=qwen3_area,
                   step_cache=step_cache,
                   batch_cfg=batch_cfg, fp8=fp8)
        from bridgecore.zoo.tiny_zoo import tiny_plus_model_beside

        settings = settings_for_job(job, plus_model_beside=tiny_plus_model_beside)
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1; got {shard_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be at least 1; got {limit}")
    except user_errors() as error:
        fail(str(error))
    if rewrite_with == "qwen3" and Path(qwen3).resolve().parent == TINY_ZOO_DIR.resolve():
        banner("THE REWRITE ARM WITH THE TINY RANDOM Qwen3-VL: its rewrites are gibberish (a random model writes "
                "random tokens),\nso Edit+rewrite shows the plumbing only; the arm's value can only be measured with "
                "real weights (--qwen3).")
    preflight(input, output, create_bucket, prompt, None if settings.native else qwen3)  # a dry run checks too
    if dry_run:
        from bridgecore.batch.job_plan import plan_job

        try:
            plan = plan_job(input, output, settings, "bulk-edit", prompt, shard_size, retry_failed, create_bucket,
                            content_hash, limit)
        except user_errors() as error:
            fail(str(error))
        from bridgecore.batch.sizing import pending_gpu_hours

        typer.echo(f"{plan.samples} samples in {len(plan.shards)} shards; {len(plan.shards) - len(plan.pending)} "
                   f"finished under these settings, {len(plan.pending)} to run ({plan.pending_samples} samples: about "
                   f"{pending_gpu_hours(plan.pending_samples, settings, 'bulk-edit'):.2f} GPU-hours on the real models "
                   "at this condition area, the planner's estimate)")
        for stage, counts in plan.stages.items():
            typer.echo(f"  {stage:<10} committed {counts['committed']:>6}  to run {counts['to_run']:>6}")
        from bridgecore.batch.fingerprints import fingerprints

        typer.echo(f"steps {settings.steps}; fingerprints {json.dumps(fingerprints('bulk-edit', settings))}")
        return
    _check_this_machine_runs(settings)
    from vision_bridge.flows.local_server import ServerStartError, local_prefect, prefect_environment

    prefect_environment(DEFAULT_HOME / "prefect", quiet=not shared.DEBUG)
    from vision_bridge.flows.bulk_edit import bulk_edit as bulk_edit_flow

    try:
        with local_prefect():
            summary = bulk_edit_flow(input=input, output=output, prompt=prompt, shard_size=shard_size,
                                     retry_failed=retry_failed, verify=verify, content_hash=content_hash,
                                     create_bucket=create_bucket, limit=limit, **job)
    except KeyboardInterrupt:
        _interrupted(output)
    except (*user_errors(), ServerStartError) as error:
        if caused_by_interrupt(error):  # Prefect turned the Ctrl-C into its own error: still an interruption
            _interrupted(output)
        fail(str(error))
    counts = summary["counts"]
    typer.echo(f"done {counts['done']}, failed {counts['failed']}, pending {counts['pending']} "
               f"({summary['shards']} shards); summary: {output.rstrip('/')}/runs/{summary['run']}/summary.json")
    for failure in summary["failures"][:20]:
        typer.echo(f"  failed {failure['id']} at {failure['stage']}: {failure['error']}")


def _interrupted(output: str) -> None:
    typer.secho(f"interrupted: committed shards are kept in {output}; the same command resumes", err=True,
                fg=typer.colors.YELLOW)
    raise typer.Exit(code=130) from None


def _check_this_machine_runs(settings) -> None:
    """A local run computes here: what cannot run on this machine at all is one line now, not a stage failing after
    the extraction (a deployment's GPU workers check on their own card, `CannotRunHereError`)."""
    import os

    from bridgecore.model.speed import CannotRunHereError, check_fp8_matmuls, parse_loras

    for source in (spec.source for spec in parse_loras(list(settings.lora))):
        if source.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(source)):
            fail(f"--lora {source}: no such file")
    if settings.fp8 == "dynamic":
        import torch

        try:
            check_fp8_matmuls(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        except CannotRunHereError as error:
            fail(str(error))
