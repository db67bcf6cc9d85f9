"""`vision-bridge`: the command line. Run `vision-bridge --help`.

It sits above both layers: the library (`bridgecore`, which never imports Prefect or the flows) and the
orchestration (`flows`, imported lazily by the commands that run a flow, so the others start fast).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from bridgecore.batch.settings import JOB_DEFAULTS as D  # the one home of a job's defaults
from bridgecore.model.loading import DEFAULT_EDIT_MODEL, DEFAULT_QWEN3_MODEL, ModelNotAvailableError

app = typer.Typer(
    help="Qwen3-VL -> Qwen-Image-Edit vision bridge: extract caches, edit, run bulk jobs on Prefect, train the "
    "bridge, evaluate capabilities, plan real-scale runs, build the offline tiny zoo.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: "[default: 50]" or "[target]" must not be read as markup
)

DEFAULT_HOME = Path(".vision-bridge")
TINY_ZOO_DIR = DEFAULT_HOME / "tiny-zoo"


_DEBUG = False


def _fail(message: str) -> None:
    if _DEBUG and sys.exc_info()[1] is not None:
        raise
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (and Prefect's logs) on errors.")):
    global _DEBUG
    _DEBUG = debug


def _user_errors() -> tuple[type[BaseException], ...]:
    """Mistakes a user can fix (bad value, missing file, unreachable storage, unknown model): one line each."""
    from bridgecore.storage import StorageUnreachableError

    return (ValueError, OSError, StorageUnreachableError, ModelNotAvailableError)


def _preflight(input: str, output: str, create_bucket: bool = False, prompt: Optional[str] = None,
               qwen3: Optional[str] = None) -> None:
    """Fails in seconds, with one line, before a server starts or anything is written, on the common mistakes: a
    missing or unreadable input, a manifest without the columns a job needs, an output URL that cannot be
    right or cannot be written, a Qwen3-VL model that is not there."""
    from bridgecore.batch.sharding import check_input, check_manifest_columns
    from bridgecore.storage import Storage

    try:
        check_input(input)
        check_manifest_columns(input, prompt)
        _check_output_url(output)
        if qwen3 is not None:
            _check_model_config(qwen3)
        Storage(output).check_writable(create_bucket)
    except _user_errors() as error:
        _fail(str(error))


def _check_output_url(output: str) -> None:
    if "://" in output and not output.startswith("file://"):
        parts = output.split("://", 1)[1].split("/")
        if any(part in (".", "..") for part in parts) or not parts[0]:
            raise ValueError(f"output {output}: an object-store URL is bucket/prefix, without '.' or '..' segments "
                             "or an empty bucket name")


def _check_model_config(name: str) -> None:
    """A Qwen3-VL model: a local directory or hub id with a config.json (its weights are not fetched here)."""
    from bridgecore.model.loading import resolve_model

    resolved = resolve_model(name, allow_patterns=["config.json"])
    if not (resolved.path / "config.json").exists():
        raise ModelNotAvailableError(f"model {name!r}: {resolved.path} has no config.json; is this a Qwen3-VL model "
                                     "directory?")


def _banner(message: str) -> None:
    line = "!" * 100
    typer.secho(f"{line}\n{message}\n{line}", fg=typer.colors.YELLOW, bold=True, err=True)


def resolve_or_tiny(qwen3: Optional[str], edit_model: Optional[str], plus: bool = False,
                    trained: bool = False, editor: str = "auto") -> tuple[str, str]:
    """The requested models; with none requested, the real defaults if already on this machine (local files or
    the Hugging Face cache: a probe must not start a 60 GB download), else the tiny zoo (loudly). `trained`
    picks the zoo's trained tiny edit model (single-image) instead of the random one; `editor` names the
    family whose default edit model is wanted (e.g. qwen-image-2.1)."""
    from bridgecore.model.loading import DEFAULT_MODEL_OF_FAMILY, resolve_model
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    family = editor if editor != "auto" else "qwen-image-edit-plus" if plus else "qwen-image-edit"
    if family not in DEFAULT_MODEL_OF_FAMILY:
        _fail(f"--editor must be auto, {', '.join(DEFAULT_MODEL_OF_FAMILY)}; got {editor!r}")
    plus = family == "qwen-image-edit-plus"
    default_edit = DEFAULT_MODEL_OF_FAMILY[family]
    if qwen3 is not None and edit_model is not None:
        return qwen3, edit_model
    try:
        if family != "qwen-image-2.1":  # 2.1 reads its own encoder: Qwen3-VL-Instruct need not be here
            resolve_model(qwen3 or DEFAULT_QWEN3_MODEL, local_only=True)
        resolve_model(edit_model or default_edit, allow_patterns=["model_index.json"], local_only=True)
        return qwen3 or DEFAULT_QWEN3_MODEL, edit_model or default_edit
    except ModelNotAvailableError as error:
        trained = trained and family == "qwen-image-edit"
        zoo = build_tiny_zoo(TINY_ZOO_DIR, trained=trained)
        what = ("Outputs are meaningless pictures that only prove the machinery runs." if not trained else
                "The edit model's VAE and DiT are trained (on CPU) on ONE synthetic task, 'Make the <shape> <colour>': "
                "its edits are real, of that task only; the VLMs stay random.")
        _banner(
            f"NO REAL WEIGHTS FOUND: using the TINY {'TRAINED' if trained else 'RANDOM'} MODELS of the offline zoo in "
            f"{TINY_ZOO_DIR.resolve()}.\n{what}\n"
            f"Reason: {error}\nPass --qwen3 and --edit-model (hub ids or local directories) "
            "to use real models."
        )
        tiny_edit = zoo["qwen-image-2.1" if family == "qwen-image-2.1" else "qwen-image-edit-plus" if plus else
                        "qwen-image-edit-trained" if trained else "qwen-image-edit"]
        return qwen3 or str(zoo["qwen3-vl"]), edit_model or str(tiny_edit)


@app.command("tiny-models")
def tiny_models(
    out_dir: Path = typer.Argument(..., help="Directory to write qwen3-vl/, qwen-image-edit/, qwen-image-edit-plus/, "
                                   "qwen-image-2.1/ into."),
    overwrite: bool = typer.Option(False, help="Rebuild models that already exist."),
    trained: bool = typer.Option(False, help="Also write qwen-image-edit-trained/: the tiny edit pipeline with its VAE "
                                 "and DiT trained on CPU (about a minute or two, seeded) on a synthetic edit task whose "
                                 "result depends on the instruction ('Make the <shape> <colour>'); with "
                                 "training_report.json and edits_grid.png. Cached: rebuilt only if missing."),
):
    """Write the offline tiny zoo: small random models of the real classes, seeded, in Hugging Face layout."""
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    for name, path in build_tiny_zoo(out_dir, overwrite=overwrite, trained=trained).items():
        typer.echo(f"{name}: {path}")
    if trained:
        from bridgecore.zoo.tiny_edit_model import GRID_NAME, REPORT_NAME

        report = json.loads((out_dir / "qwen-image-edit-trained" / REPORT_NAME).read_text())
        low, high = report["instruction_gain_ci"]
        typer.echo(f"trained tiny edit model: held-out loss {report['heldout_loss_correct_instruction']:.4f} with the "
                   f"correct instructions vs {report['heldout_loss_shuffled_instruction']:.4f} with shuffled ones "
                   f"(difference 95% CI [{low:.4f}, {high:.4f}]); edit success {report['heldout_edit_success']:.0%}; "
                   f"edits: {out_dir / 'qwen-image-edit-trained' / GRID_NAME}")


@app.command()
def plan(
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
    train_batch_size: int = typer.Option(4, help="Job: training batch size."),
    gpus: int = typer.Option(1, help="Job: GPUs working in parallel (for the wall-clock days)."),
    rewrite: bool = typer.Option(False, "--rewrite", help="Job: add the rewrite arm (Qwen3-VL generates each rewrite, "
                                 "memory-bound decoding priced from the card's bandwidth; Qwen2.5-VL encodes it)."),
    rewrite_tokens: int = typer.Option(256, help="Job: generated tokens per rewrite (the cap: an upper bound)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
):
    """Real-scale sizes from the real configs on the meta device: parameters, weight memory (bf16, int8),
    inference memory per residency mode, vision tokens, and forward FLOPs of one extraction and one DiT step
    (analytic matmul count), and the rewrite arm's prefill, decoding and re-encoding. With --images N: the job's
    GPU-hours (extract, edit, rewrite with --rewrite, train), storage and cost."""
    from bridgecore.planning.job_cost import format_job_cost, plan_job_cost
    from bridgecore.planning.planner import format_plan
    from bridgecore.planning.planner import plan as make_plan

    try:
        if images is not None:
            report = plan_job_cost(images, resolution, steps, gpu, cfg, efficiency, price, measured, train_steps,
                                   train_batch_size, gpus=gpus, rewrite=rewrite, rewrite_tokens=rewrite_tokens)
            text = format_job_cost(report)
        else:
            report = make_plan(*image_size, condition_area=condition_area, rewrite_tokens=rewrite_tokens)
            text = format_plan(report)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    typer.echo(json.dumps(report, indent=2) if as_json else text)


@app.command()
def extract(
    images: list[str] = typer.Argument(..., help="Image path(s) or URL(s) of ONE sample (several for Edit-Plus)."),
    prompt: str = typer.Option(..., help="The edit instruction."),
    out: Path = typer.Option(..., help="Output .safetensors cache file."),
    qwen3: Optional[str] = typer.Option(None, help=f"Qwen3-VL hub id or directory [default: {DEFAULT_QWEN3_MODEL}]."),
    edit_model: Optional[str] = typer.Option(None, help=f"Qwen-Image-Edit(-Plus) hub id or directory [default: {DEFAULT_EDIT_MODEL}]."),
    condition_area: int = typer.Option(1024 * 1024, help="Condition-image area in pixels (the pipeline's 1024*1024)."),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ..."),
    load_in_8bit: bool = typer.Option(False, help="Load both VLMs in 8-bit (bitsandbytes)."),
):
    """Extract one sample's vision caches (Qwen3-VL levels + DeepStack, Qwen-Image-Edit embeddings) to a file
    and print the comparison of the two caches."""
    from bridgecore.model.cache_format import save_cache
    from bridgecore.model.extraction import VisionCacheExtractor, format_comparison
    from bridgecore.model.images import ImageLoadError

    if out.suffix != ".safetensors":
        _fail(f"--out must end in .safetensors; got {out}")
    qwen3, edit_model = resolve_or_tiny(qwen3, edit_model, plus=len(images) > 1)
    extractor = VisionCacheExtractor(qwen3, edit_model, device=device, load_in_8bit=load_in_8bit,
                                     condition_area=condition_area)
    try:
        cache = extractor.extract(images, prompt)
    except (ImageLoadError, ModelNotAvailableError, ValueError) as error:
        _fail(str(error))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_cache(cache, str(out))
    typer.echo(format_comparison(extractor.compare_caches(cache.qwen3, cache.qwen25)))
    typer.echo(f"wrote {out} ({out.stat().st_size} bytes)")


@app.command()
def edit(
    images: list[str] = typer.Argument(..., help="Image path(s) or URL(s) of ONE sample (several need an Edit-Plus model)."),
    prompt: str = typer.Option(..., help="The edit instruction."),
    out: Path = typer.Option(..., help="Output PNG."),
    bridge: Optional[str] = typer.Option(None, help="Trained bridge directory or URL. Without it the bridge is UNTRAINED "
                                          "and, by design, returns the baseline exactly: --baseline and the default "
                                          "then give identical files."),
    baseline: bool = typer.Option(False, "--baseline", help="Plain Qwen-Image-Edit (M-RoPE-correct embeddings), no Qwen3-VL."),
    qwen3: Optional[str] = typer.Option(None, help=f"Qwen3-VL hub id or directory [default: {DEFAULT_QWEN3_MODEL}]."),
    edit_model: Optional[str] = typer.Option(None, help=f"Edit pipeline hub id or directory [default: {DEFAULT_EDIT_MODEL}]."),
    editor: str = typer.Option("auto", help="Editor family: auto (from the edit model), qwen-image-edit, "
                               "qwen-image-edit-plus, or qwen-image-2.1 (Qwen-Image-2.1: its own Qwen3-VL "
                               "conditioning, no bridge, 40 steps by default)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps [default: 50, or a Lightning LoRA's 4/8]."),
    seed: int = typer.Option(0, help="Noise seed."),
    cfg: float = typer.Option(4.0, help="true_cfg_scale; acts only with --negative-prompt."),
    negative_prompt: Optional[str] = typer.Option(None, help="Negative prompt for true CFG."),
    condition_area: int = typer.Option(1024 * 1024, help="Condition-image area in pixels."),
    compare_path: Optional[Path] = typer.Option(None, "--compare", help="Also write input | baseline | enhanced | attention PNG."),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda', ..."),
    one_model_at_a_time: bool = typer.Option(False, help="Keep at most one large model in memory (each VLM is freed "
                                             "before the next model runs)."),
    load_in_8bit: bool = typer.Option(False, help="Load both VLMs in 8-bit (bitsandbytes)."),
    lora: Optional[list[str]] = typer.Option(None, help="LoRA for the DiT, PATH_OR_ID[:scale] (a .safetensors file, a "
                                             "directory, owner/name or owner/name/file.safetensors); repeatable; fused "
                                             "after loading. A Lightning LoRA (name contains 'lightning', e.g. "
                                             "lightx2v/Qwen-Image-Lightning/Qwen-Image-Edit-Lightning-8steps-V1.0-bf16"
                                             ".safetensors) brings its scheduler and step count; use it without CFG."),
    scheduler: str = typer.Option("auto", help="auto (Lightning's when a Lightning LoRA is given), default, lightning."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the DiT's repeated block (regional; the first "
                                 "edit at a new size compiles, later ones are faster)."),
    attention_backend: Optional[str] = typer.Option(None, help="diffusers attention backend for the DiT: native "
                                                    "(torch SDPA), _native_cudnn, _native_flash, flash (flash-attn), ..."),
    dit_offload: bool = typer.Option(False, help="Stream the DiT's blocks from host RAM (cards with less memory than "
                                     "the 38 GiB bf16 DiT; see `vision-bridge plan` for the peak per mode)."),
):
    """Edit one sample with Qwen-Image-Edit, its conditioning enhanced by Qwen3-VL through the bridge (or with
    Qwen-Image-2.1, the native arm: --editor qwen-image-2.1)."""
    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit
    from bridgecore.model.images import ImageLoadError, load_image
    from bridgecore.model.loading import editor_family

    qwen3, edit_model = resolve_or_tiny(qwen3, edit_model, plus=len(images) > 1, editor=editor)
    try:
        family = editor_family(edit_model)
        if editor != "auto" and family != editor:
            raise ValueError(f"--editor {editor}, but {edit_model} is a {family} pipeline")
    except (ValueError, ModelNotAvailableError) as error:
        _fail(str(error))
    if family == "qwen-image-2.1":
        from bridgecore.model.native21 import NativeQwenImage21

        if bridge or baseline or compare_path or negative_prompt or lora or compile or attention_backend or dit_offload:
            _fail("Qwen-Image-2.1 (the native arm) takes no --bridge, --baseline, --compare, --negative-prompt or "
                  "speed options: it reads Qwen3-VL itself and is sampled without CFG")
        try:
            native = NativeQwenImage21(edit_model, device=device, condition_area=condition_area,
                                       load_in_8bit=load_in_8bit)
            result = native.generate([load_image(uri) for uri in images], prompt, seed=seed,
                                     steps=40 if steps is None else steps)
        except (ImageLoadError, ModelNotAvailableError, ValueError, FileNotFoundError) as error:
            _fail(str(error))
        out.parent.mkdir(parents=True, exist_ok=True)
        result.save(out)
        typer.echo(f"wrote {out} (Qwen-Image-2.1)")
        return
    try:
        editor = EnhancedQwenImageEdit(edit_model, qwen3, bridge=bridge, device=device, condition_area=condition_area,
                                       one_model_at_a_time=one_model_at_a_time, load_in_8bit=load_in_8bit, lora=lora,
                                       scheduler=scheduler, compile=compile, attention_backend=attention_backend,
                                       dit_offload=dit_offload)
    except ValueError as error:
        _fail(str(error))
    steps = editor.default_steps if steps is None else steps
    sample = images if len(images) > 1 else images[0]
    try:
        if compare_path is not None:
            baseline_image, enhanced, _ = editor.compare(sample, prompt, seed=seed, num_inference_steps=steps,
                                                         save_comparison=compare_path)
            result = baseline_image if baseline else enhanced
        else:
            result = editor.generate(sample, prompt, use_qwen3_vision=not baseline, seed=seed,
                                     num_inference_steps=steps, true_cfg_scale=cfg, negative_prompt=negative_prompt)
    except (ImageLoadError, ModelNotAvailableError, ValueError, FileNotFoundError) as error:
        _fail(str(error))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    typer.echo(f"wrote {out}" + (f" and {compare_path}" if compare_path else ""))


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
    condition_area: int = typer.Option(D["condition_area"], help="Condition-image area in pixels."),
    shard_size: int = typer.Option(16, help="Samples per shard (the unit of caching, retries and scale-out)."),
    batch_size: int = typer.Option(D["batch_size"], help="Samples per model forward (VLM batch, DiT batch of equal sizes)."),
    retry_failed: bool = typer.Option(False, help="Rerun only the samples that failed under these settings."),
    content_hash: bool = typer.Option(False, "--content-hash", help="Identify local input files by a hash of their "
                                      "bytes instead of size + modification time (reads every file while planning; "
                                      "use it when files may be replaced in place with the same size and time; "
                                      "switching it changes every sample's identity, so the next run plans anew)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan only: print the shards, what is already done "
                                 "under these settings and what would run; writes nothing but the plan."),
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
    rewrite_with: str = typer.Option(D["rewrite_with"], help="The rewrite arm: qwen3 lets Qwen3-VL (the bridge's model, the same "
                                     "images) rewrite each instruction, greedily, and Qwen-Image-Edit's own encoder "
                                     "reads the rewrite (stored in summary.parquet); identity forces the rewrite to be "
                                     "the instruction (the control: the Edit arm's edits); none: off. Combines with "
                                     "--bridge."),
    rewrite_system_prompt: Optional[str] = typer.Option(None, help="The rewriter's system prompt, as TEXT or @FILE "
                                                        "[default: bridgecore.model.rewrite.SYSTEM_PROMPT]."),
    rewrite_max_tokens: int = typer.Option(D["rewrite_max_tokens"], help="Token cap of each rewrite."),
):
    """Run the bulk-edit flow locally (ephemeral Prefect, no server to set up): shard, extract, fuse, edit,
    evaluate. Reruns resume, and only the stages a changed setting affects run again (a new --bridge reuses
    the extracted caches; new --steps/--seed/--cfg reuse the fused embeddings too; a new rewrite system prompt
    reruns the rewrites and what reads them)."""
    from bridgecore.batch.settings import settings_for_job

    qwen3, edit_model = resolve_or_tiny(qwen3, edit_model, plus=multi_image, editor=editor)
    try:
        if rewrite_system_prompt is not None and rewrite_system_prompt.startswith("@"):
            rewrite_system_prompt = Path(rewrite_system_prompt[1:]).expanduser().read_text(encoding="utf-8")
        # The job as the deployment's flow receives it; `JobSettings.for_job` decides every default, there and here.
        job = dict(qwen3=qwen3, edit_model=edit_model, editor=editor, multi_image=multi_image, steps=steps,
                   plus_model=plus_model, bridge=bridge, device=device, condition_area=condition_area, seed=seed,
                   batch_size=batch_size, cfg=cfg, negative_prompt=negative_prompt, load_in_8bit=load_in_8bit,
                   lora=list(lora or []), scheduler=scheduler, compile=compile, attention_backend=attention_backend,
                   dit_offload=dit_offload, rewrite_with=rewrite_with, rewrite_system_prompt=rewrite_system_prompt,
                   rewrite_max_tokens=rewrite_max_tokens)
        settings = settings_for_job(job)
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1; got {shard_size}")
    except _user_errors() as error:
        _fail(str(error))
    if rewrite_with == "qwen3" and Path(qwen3).resolve().parent == TINY_ZOO_DIR.resolve():
        _banner("THE REWRITE ARM WITH THE TINY RANDOM Qwen3-VL: its rewrites are gibberish (a random model writes "
                "random tokens),\nso Edit+rewrite shows the plumbing only; the arm's value can only be measured with "
                "real weights (--qwen3).")
    if dry_run:
        from bridgecore.batch.pipeline import plan_job

        try:
            plan = plan_job(input, output, settings, "bulk-edit", prompt, shard_size, retry_failed, create_bucket,
                            content_hash)
        except _user_errors() as error:
            _fail(str(error))
        typer.echo(f"{plan.samples} samples in {len(plan.shards)} shards; {len(plan.shards) - len(plan.pending)} "
                   f"finished under these settings, {len(plan.pending)} to run")
        for stage, counts in plan.stages.items():
            typer.echo(f"  {stage:<10} committed {counts['committed']:>6}  to run {counts['to_run']:>6}")
        from bridgecore.batch.pipeline import fingerprints

        typer.echo(f"steps {settings.steps}; fingerprints {json.dumps(fingerprints('bulk-edit', settings))}")
        return
    _preflight(input, output, create_bucket, prompt, None if settings.native else qwen3)
    from flows.local_server import ServerStartError, local_prefect, prefect_environment

    prefect_environment(DEFAULT_HOME / "prefect", quiet=not _DEBUG)
    from flows.bulk_edit import bulk_edit as bulk_edit_flow

    try:
        with local_prefect():
            summary = bulk_edit_flow(input=input, output=output, prompt=prompt, shard_size=shard_size,
                                     retry_failed=retry_failed, verify=verify, content_hash=content_hash,
                                     create_bucket=create_bucket, **job)
    except (*_user_errors(), ServerStartError) as error:
        _fail(str(error))
    counts = summary["counts"]
    typer.echo(f"done {counts['done']}, failed {counts['failed']}, pending {counts['pending']} "
               f"({summary['shards']} shards); summary: {output.rstrip('/')}/runs/{summary['run']}/summary.json")
    for failure in summary["failures"][:20]:
        typer.echo(f"  failed {failure['id']} at {failure['stage']}: {failure['error']}")


@app.command()
def train(
    data: str = typer.Option(..., help="Triplets: a manifest with a 'target' column (e.g. make-benchmark output) or a "
                             "cache location written by build-caches."),
    out: str = typer.Option(..., help="Checkpoint directory or URL (s3://...): the final bridge, step_NNNNNN/ "
                            "checkpoints, metrics.json, loss_curve.png. An existing run there is resumed."),
    qwen3: Optional[str] = typer.Option(None, help="Qwen3-VL hub id or directory (default: real, else tiny zoo)."),
    edit_model: Optional[str] = typer.Option(None, help="Edit pipeline hub id or directory (default: real, else tiny)."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    batch_size: int = typer.Option(4, help="Samples per step (same resolution per batch)."),
    grad_accumulation: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (linear warm-up)."),
    eval_every: int = typer.Option(100, help="Held-out loss and checkpoint every K steps."),
    seed: int = typer.Option(0, help="Seed of data order, noise and timesteps (deterministic on CPU)."),
    rank: int = typer.Option(256, help="Bridge rank (256 gives ~5M parameters at real dims)."),
    mode: str = typer.Option("both", help="Bridge design: 'tokens' appends K conditioning tokens read from Qwen3-VL "
                             "(can add what the DiT's own encoder lacks), 'residual' corrects the existing tokens "
                             "(bounded; cannot add a missing word), 'both' (the default: measured best)."),
    num_tokens: int = typer.Option(1, help="K, the tokens the token path appends."),
    ablate_qwen3: str = typer.Option("none", help="Train a control: 'shuffle' pairs each sample with another sample's "
                                     "Qwen3 caches at every step, 'zeros' zeroes them; 'none' trains normally."),
    condition_area: int = typer.Option(1024 * 1024, help="Condition-image area in pixels."),
    device: str = typer.Option("auto", help="'auto', 'cpu', 'cuda', ..."),
):
    """Train the bridge with Qwen-Image-Edit's own flow-matching loss; the DiT, VAE and VLMs stay frozen.
    Writes metrics.json with heldout_loss_baseline (zero-init bridge = Qwen-Image-Edit as is),
    heldout_loss_trained, heldout_loss_qwen3_shuffled (the trained bridge with Qwen3 caches permuted across
    held-out samples) and qwen3_information_gain (their difference, with a bootstrap 95% CI): the evidence
    that the bridge uses Qwen3-VL's information rather than a generic bias. Use the result with
    `edit --bridge OUT` or `bulk-edit --bridge OUT`."""
    from bridgecore.batch.settings import settings_for_job
    from bridgecore.batch.training_data import run_training
    from bridgecore.training.trainer import ABLATIONS, TrainConfig

    if ablate_qwen3 not in ABLATIONS:
        _fail(f"--ablate-qwen3 must be one of {', '.join(ABLATIONS)}; got {ablate_qwen3!r}")
    if "://" not in out and Path(out).exists() and not Path(out).is_dir():
        _fail(f"--out {out} is a file, not a folder: training writes a checkpoint folder there")
    from bridgecore.model.bridge import MODES

    if mode not in MODES:
        _fail(f"--mode must be one of {', '.join(MODES)}; got {mode!r}")
    if num_tokens < 1:
        _fail(f"--num-tokens must be at least 1; got {num_tokens}")
    qwen3, edit_model = resolve_or_tiny(qwen3, edit_model)
    try:  # the build-caches job's settings: its fingerprints find the caches it wrote
        settings = settings_for_job(dict(qwen3=qwen3, edit_model=edit_model, device=device, condition_area=condition_area))
    except _user_errors() as error:
        _fail(str(error))
    config = TrainConfig(steps=steps, batch_size=batch_size, grad_accumulation=grad_accumulation, learning_rate=lr,
                         eval_every=eval_every, checkpoint_every=eval_every, seed=seed, ablate_qwen3=ablate_qwen3)
    try:
        metrics = run_training(data, out, settings, config, {"rank": rank, "mode": mode, "num_tokens": num_tokens})
    except (ValueError, ModelNotAvailableError) as error:
        _fail(str(error))
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
    low, high = metrics["qwen3_information_gain_ci"]
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


@app.command("make-benchmark")
def make_benchmark_command(
    out: Path = typer.Argument(..., help="Folder to write manifest.jsonl and the images into."),
    per_capability: int = typer.Option(32, help="Samples per capability (OCR cycles through the 32 languages)."),
    seed: int = typer.Option(0, help="Seed; the same seed writes the same files."),
):
    """Write the capability benchmark (OCR in 32 languages, spatial, detail preservation, multi-image) in the
    batch pipeline's manifest format: run it through bulk-edit, train on it, score it with `evaluate`."""
    from bridgecore.evaluation.benchmark_data import FontNotFoundError, make_benchmark

    try:
        manifest = make_benchmark(out, per_capability, seed)
    except FontNotFoundError as error:
        _fail(str(error))
    typer.echo(f"wrote {manifest} ({4 * per_capability} samples)")


SUMMARY_HEADLINES = {"ocr": "exact_match", "spatial": "direction_accuracy", "detail": "edit_success",
                     "multi_image": "consistency"}


def _local_benchmark(benchmark: str) -> str:
    """A benchmark given as a URL is read from a local copy (its images are opened many times)."""
    import hashlib

    from bridgecore.storage import is_remote, mirror_down

    if not is_remote(benchmark):
        return benchmark
    local = DEFAULT_HOME / "benchmarks" / hashlib.sha256(benchmark.encode()).hexdigest()[:16]
    return mirror_down(benchmark, str(local))


@app.command()
def evaluate(
    runs: Optional[list[str]] = typer.Argument(None, help="Runs to score (bulk-edit outputs or OUTPUT/runs/RUN "
                                               "folders, local or URL): one, or several arms compared pairwise."),
    benchmark: str = typer.Option(..., help="Benchmark folder (or URL) written by make-benchmark."),
    editor: Optional[str] = typer.Option(None, help="Score a reference editor instead: oracle, identity or noise."),
    results_option: Optional[str] = typer.Option(None, "--results", help="A bulk-edit run (dir or URL) to score."),
    baseline: Optional[str] = typer.Option(None, help="A baseline run over the same benchmark: paired comparison."),
    names: Optional[str] = typer.Option(None, help="Comma-separated arm names, in order (default: from each run's "
                                        "settings: Edit, Edit+bridge, Qwen-Image-2.1)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary JSON here."),
    per_sample: Optional[Path] = typer.Option(None, help="Write per-sample scores (Parquet) here."),
    report: Optional[Path] = typer.Option(None, help="Write a self-contained HTML report here."),
    read_with_encoders: bool = typer.Option(False, help="Also let Qwen2.5-VL and Qwen3-VL read each OCR card "
                                            "(generate) and report their character error rate per language."),
    qwen3: Optional[str] = typer.Option(None, help="Qwen3-VL for --read-with-encoders (default: real, else tiny)."),
    edit_model: Optional[str] = typer.Option(None, help="Edit model whose Qwen2.5-VL reads, for --read-with-encoders."),
):
    """Score edits on the capability benchmark: OCR (Tesseract: exact match, CER), spatial (direction,
    position error), detail (SSIM/PSNR outside the edit, small objects), multi-image consistency, each
    with bootstrap confidence intervals. Several runs (arms: e.g. Edit, Edit+bridge, Qwen-Image-2.1 over the
    same benchmark) are compared pairwise on the same samples (differences with 95% CIs); --baseline RUN is
    the first arm."""
    from bridgecore.evaluation.capabilities import (
        CapabilityEvaluator,
        arm_comparisons,
        arm_name,
        paired_comparison,
        reference_editor,
        results_editor,
    )

    arm_runs = ([baseline] if baseline else []) + list(runs or []) + ([results_option] if results_option else [])
    if (editor is None) == (not arm_runs) or (editor is not None and baseline):
        _fail("give --editor oracle|identity|noise, or one or more runs (RUNS, --results, --baseline)")
    try:
        benchmark = _local_benchmark(benchmark)
        labels = [n.strip() for n in names.split(",")] if names else [arm_name(run) for run in arm_runs]
        if len(labels) != len(arm_runs):
            raise ValueError(f"--names gives {len(labels)} names for {len(arm_runs)} runs")
        if baseline and not names:
            labels[0] = "baseline"
        labels = [f"{label} ({i + 1})" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
        evaluators = ({editor: CapabilityEvaluator(benchmark, reference_editor(editor))} if editor else
                      {label: CapabilityEvaluator(benchmark, results_editor(run)) for label, run in zip(labels, arm_runs)})
    except (ValueError, OSError) as error:
        _fail(str(error))
    summaries = {name: evaluator.evaluate_all() for name, evaluator in evaluators.items()}
    main = list(summaries)[-1]  # the arm under test: the last one (the first is the baseline)
    output = dict(summaries[main])
    comparison = None
    if len(summaries) > 1:
        output["arms"] = summaries
        output["pairs"] = arm_comparisons({name: e.per_sample for name, e in evaluators.items()})
        first = list(evaluators)[0]
        comparison = paired_comparison(evaluators[first].per_sample, evaluators[main].per_sample)
        output["baseline"], output["paired"] = summaries[first], comparison
    if read_with_encoders:
        from bridgecore.evaluation.capabilities import encoder_reading
        from bridgecore.model.extraction import VisionCacheExtractor

        qwen3, edit_model = resolve_or_tiny(qwen3, edit_model)
        output["encoder_reading"] = encoder_reading(benchmark, VisionCacheExtractor(qwen3, edit_model))
        for name, reading in output["encoder_reading"].items():
            typer.echo(f"{name} reads the OCR cards with CER {reading['cer']:.3f}")
    for arm, summary in summaries.items():
        for capability, values in summary.items():
            headline = {k: round(v, 4) for k, v in values.items() if isinstance(v, float)}
            typer.echo(f"{arm + ':' if len(summaries) > 1 else ''}{capability:<12} {headline}")
    for pair, values in (output.get("pairs") or {}).items():
        typer.echo(f"{pair}: " + ", ".join(f"{cap} {v[SUMMARY_HEADLINES[cap]]['difference']:+.3f} "
                                           f"[{v[SUMMARY_HEADLINES[cap]]['ci'][0]:+.3f}, "
                                           f"{v[SUMMARY_HEADLINES[cap]]['ci'][1]:+.3f}]" for cap, v in values.items()))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(output, indent=1, ensure_ascii=False))
    if per_sample:
        evaluators[main].write_per_sample(per_sample)
    if report:
        from bridgecore.evaluation.report import write_report

        write_report(report, evaluators, summaries, output.get("pairs"))
        typer.echo(f"report: {report}")


def _write_sample_set(folder: Path) -> Path:
    """Six small generated edit requests (shapes, a text card, a two-tone scene) as a JSONL manifest."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    colours = [(200, 30, 30), (30, 60, 200), (30, 160, 60), (220, 180, 20), (120, 40, 160), (20, 160, 170)]
    for index, colour in enumerate(colours):
        image = Image.new("RGB", (320, 200), (240, 240, 235))
        draw = ImageDraw.Draw(image)
        draw.rectangle((30 + 5 * index, 40, 130, 140), fill=colour)
        draw.ellipse((180, 50, 280 - 5 * index, 150), fill=colours[(index + 1) % len(colours)])
        draw.text((40, 165), f"Hello {index}", fill=(0, 0, 0))
        image.save(folder / f"sample{index}.png")
        rows.append({"id": f"sample{index}", "image": f"sample{index}.png",
                     "instruction": f"Change the text 'Hello {index}' to 'Goodbye'"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return manifest


@app.command()
def quickstart(
    out_dir: Path = typer.Option(Path("out/quickstart"), help="Where to write the sample set and the run's outputs."),
    qwen3: Optional[str] = typer.Option(None, help="Qwen3-VL hub id or directory (default: real model, else tiny zoo)."),
    edit_model: Optional[str] = typer.Option(None, help="Qwen-Image-Edit hub id or directory (default: real, else the "
                                             "tiny zoo's trained edit model)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps [default: 4; 20 with the tiny trained model] "
                                        "(the real default is 50)."),
    condition_area: Optional[int] = typer.Option(None, help="Condition-image area [default: 128*128; the tiny trained "
                                                 "model's own 64*64]; the real pipeline uses 1048576."),
    native_arm: bool = typer.Option(True, "--native-arm/--no-native-arm", help="Also run Qwen-Image-2.1 (the native "
                                    "arm; the tiny random one without real weights) over the same samples into the "
                                    "same output, and print both arms' scores side by side."),
    bridge: Optional[str] = typer.Option(None, help="A trained bridge checkpoint for the Edit+bridge arm [default: the "
                                         "tiny zoo's, trained once on the tiny task; none with real models]."),
    rewrite_arm: bool = typer.Option(True, "--rewrite-arm/--no-rewrite-arm", help="Also run Edit+rewrite: Qwen3-VL "
                                     "rewrites each instruction and the edit model's own encoder reads the rewrite "
                                     "(gibberish with the tiny random Qwen3-VL: the plumbing only)."),
):
    """The main job end to end on an embedded default: generates a small sample set and runs the bulk-edit
    flow over it locally (ephemeral Prefect, local storage), in four arms: Edit, Edit+bridge, Edit+rewrite and
    Qwen-Image-2.1.
    Without real weights it uses the tiny zoo's trained edit model on its own task ('Make the <shape> <colour>',
    with targets, so the run is scored) and a tiny bridge trained for it; it ends with a page (index.html in
    OUT_DIR) showing the arms side by side and the mechanism demonstration (the colour word hidden from the
    DiT's own encoder and read by Qwen3-VL through the bridge)."""
    from bridgecore.zoo.tiny_edit_model import REPORT_NAME
    from bridgecore.zoo.tiny_zoo import TINY_BRIDGE, TRAINED_EDIT_MODEL, build_tiny_zoo

    qwen3, edit_model = resolve_or_tiny(qwen3, edit_model, trained=True)
    trained_tiny = Path(edit_model).resolve() == (TINY_ZOO_DIR / TRAINED_EDIT_MODEL).resolve()
    if trained_tiny:
        from bridgecore.zoo.synthetic_triplets import write_triplets

        size = json.loads((Path(edit_model) / REPORT_NAME).read_text())["config"]["image_size"]
        manifest = write_triplets(out_dir / "inputs", 6, size=size, seed=7)
        if bridge is None:
            if not (TINY_ZOO_DIR / TINY_BRIDGE / ".tiny-zoo-complete").exists():
                typer.echo("training the tiny bridge for the tiny edit model (once, about a minute; cached in the zoo)",
                           err=True)
            bridge = str(build_tiny_zoo(TINY_ZOO_DIR, trained=True, bridge=True)[TINY_BRIDGE])
    else:
        manifest = _write_sample_set(out_dir / "inputs")
    area = condition_area or (size * size if trained_tiny else 128 * 128)
    edit_steps = steps or (20 if trained_tiny else 4)
    from flows.local_server import ServerStartError, active_api_url, local_prefect, prefect_environment

    prefect_environment(DEFAULT_HOME / "prefect", quiet=not _DEBUG)
    try:
        with local_prefect():  # one temporary Prefect server for every arm of the main job
            arms = _quickstart_arms(out_dir, manifest, qwen3, edit_model, bridge, area, edit_steps, native_arm,
                                    rewrite_arm, active_api_url())
    except ServerStartError as error:
        _fail(str(error))
    typer.echo(f"edited images: {out_dir / 'run'}/{{edits,qwen21-edits}}/<settings>/data/<shard>/<id>.png "
               f"(index: runs/<run>/summary.parquet); caches: {out_dir / 'run' / 'caches'}")
    for arm, (run, scores) in arms.items():
        typer.echo(f"arm {arm:<30} run {run}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    page = _main_job_page(out_dir, manifest, arms, qwen3, edit_model, bridge if trained_tiny else None, edit_steps)
    typer.echo(f"open the page: {page.resolve()}")
    if len(arms) > 1:
        typer.echo("compare arms on a capability benchmark: vision-bridge make-benchmark B; bulk-edit each arm into "
                   "one OUTPUT; vision-bridge evaluate OUTPUT/runs/RUN_A OUTPUT/runs/RUN_B --benchmark B")


def _quickstart_arms(out_dir: Path, manifest: Path, qwen3: str, edit_model: str, bridge: Optional[str], area: int,
                     edit_steps: int, native_arm: bool, rewrite_arm: bool, api_url: Optional[str]) -> dict:
    """Edit, Edit+bridge (with a bridge), Edit+rewrite and Qwen-Image-2.1 over the same samples into one OUTPUT,
    each arm one run of the bulk-edit flow on the temporary Prefect server."""
    from flows.bulk_edit import bulk_edit as bulk_edit_flow

    _preflight(str(manifest), str(out_dir / "run"), False, None, qwen3)
    arms = {}
    for arm, arm_bridge, rewrite_with in (("Edit", None, "none"), ("Edit+bridge", bridge, "none"),
                                          ("Edit+rewrite", None, "qwen3")):
        if (arm == "Edit+bridge" and arm_bridge is None) or (arm == "Edit+rewrite" and not rewrite_arm):
            continue
        typer.echo(f"arm {arm}: bulk-edit --input {manifest} --output {out_dir / 'run'}"
                   + (f" --bridge {arm_bridge}" if arm_bridge else "")
                   + (f" --rewrite-with {rewrite_with}" if rewrite_with != "none" else "")
                   + (" (the tiny RANDOM Qwen3-VL writes gibberish rewrites: the plumbing only)"
                      if rewrite_with == "qwen3" and Path(qwen3).resolve().parent == TINY_ZOO_DIR.resolve() else ""),
                   err=True)
        summary = bulk_edit_flow(input=str(manifest), output=str(out_dir / "run"), qwen3=qwen3, edit_model=edit_model,
                                 bridge=arm_bridge, steps=edit_steps, condition_area=area, shard_size=4,
                                 rewrite_with=rewrite_with)
        counts = summary["counts"]
        typer.echo(f"arm {arm}: done {counts['done']}, failed {counts['failed']}, pending {counts['pending']}", err=True)
        arms[arm] = _arm_scores(out_dir / "run")
    if native_arm:
        import subprocess

        from bridgecore.model.native21 import min_condition_area

        qwen3_21, model_21 = resolve_or_tiny(None, None, editor="qwen-image-2.1")
        tiny_21 = Path(model_21).resolve().parent == TINY_ZOO_DIR.resolve()
        area_21 = max(area, min_condition_area(model_21) or 0)  # the real processor's floor is 256x256
        # A command of its own, as a user would type it (the 2.1 arm loads its own models), on our Prefect server.
        command = [sys.executable, "-m", "vision_bridge.cli", "bulk-edit", "--input", str(manifest), "--output",
                   str(out_dir / "run"), "--editor", "qwen-image-2.1", "--qwen3", qwen3_21, "--edit-model", model_21,
                   "--steps", str(edit_steps), "--condition-area", str(area_21), "--shard-size", "4"]
        typer.echo("arm Qwen-Image-2.1: " + " ".join(command[2:]), err=True)
        environment = {**os.environ, **({"PREFECT_API_URL": api_url} if api_url else {})}  # our server, not a new one
        if subprocess.run(command, env=environment).returncode != 0:
            _fail("the Qwen-Image-2.1 arm failed (see above); the other arms' results are complete")
        arms["Qwen-Image-2.1" + (" (tiny, random)" if tiny_21 else "")] = _arm_scores(out_dir / "run")
    return arms


def _main_job_page(out_dir: Path, manifest: Path, arms: dict, qwen3: str, edit_model: str, tiny_bridge: Optional[str],
                   steps: int) -> Path:
    """index.html: the arms side by side, and with the tiny zoo the mechanism demonstration (its follow rates)."""
    from bridgecore.zoo.demo_page import arms_grid, mechanism_demo, rewrites_of, write_page

    notes = [f"Samples: {manifest}; outputs: {out_dir / 'run'}; models: Qwen3-VL {qwen3}, edit model {edit_model}."]
    mechanism = numbers = None
    if tiny_bridge is not None:
        notes.insert(0, "TINY OFFLINE DEMONSTRATION: no real weights were found, so every model here is a tiny model of "
                        "the real class: random VLMs, and an edit model (VAE + DiT) trained on CPU on one synthetic task, "
                        "'Make the <shape> <colour>'. The numbers show the machinery and the mechanism at toy scale, "
                        "not the real models' quality.")
        typer.echo("mechanism demonstration: the colour word hidden from Qwen2.5-VL, read by Qwen3-VL through the bridge",
                   err=True)
        mechanism, numbers = mechanism_demo(edit_model, qwen3, tiny_bridge, steps=steps)
        typer.echo(f"mechanism: follow rate (decoded colour == the colour only Qwen3-VL read, "
                   f"{numbers['edits_per_condition']} edits): Edit+bridge {numbers['bridge']:.0%}, Edit without the "
                   f"colour {numbers['baseline']:.0%}, Edit given the colour {numbers['reference']:.0%}, guessing "
                   f"{numbers['guessing']:.0%}")
    runs = {arm: run for arm, (run, _) in arms.items()}
    rewrites = rewrites_of(manifest, out_dir / "run", runs)
    if rewrites and tiny_bridge is not None:
        notes.append("The rewrite arm's Qwen3-VL is a tiny RANDOM model here: its rewrites are gibberish, so Edit+rewrite "
                     "shows the plumbing only; the arm's value can only be measured with real weights.")
    return write_page(out_dir, arms_grid(manifest, out_dir / "run", runs), mechanism, numbers, notes, rewrites)


def _arm_scores(output: Path) -> tuple[str, dict[str, float]]:
    """(run id, mean of each numeric metric over its done samples) of an output's latest run."""
    import pyarrow.parquet as pq

    summary = json.loads((output / "summary.json").read_text())
    metrics = [json.loads(row["metrics"]) for row in pq.read_table(output / "summary.parquet").to_pylist()
               if row["status"] == "done" and row["metrics"]]
    names = [k for k in (metrics[0] if metrics else {}) if isinstance(metrics[0][k], (int, float))]
    return summary["run"], {k: sum(m[k] for m in metrics) / len(metrics) for k in names}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app()


if __name__ == "__main__":
    main()
