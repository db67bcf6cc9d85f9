"""`vision-bridge edit`: one edit (with or without the bridge), optionally a comparison grid."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bridgecore.model.loading import DEFAULT_EDIT_MODEL, DEFAULT_QWEN3_MODEL, ModelNotAvailableError
from bridgecore.batch.settings import JOB_DEFAULTS as J
from vision_bridge.app import app, fail, resolve_or_tiny, tiny_task_settings


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
    cfg: float = typer.Option(J["cfg"], help="true_cfg_scale: true CFG when > 1 (the model card's recipe: 4.0, two DiT "
                              "forwards per step), as in bulk-edit."),
    negative_prompt: str = typer.Option(J["negative_prompt"], help="Negative prompt of true CFG (with --cfg > 1)."),
    condition_area: Optional[int] = typer.Option(None, help="Condition-image area in pixels [default: 1048576; the "
                                                 "tiny trained model's own 64*64]."),
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
    step_cache: float = typer.Option(0.0, help="Fast mode: First Block Cache threshold (e.g. 0.05-0.2; 0 = off, the "
                                     "exact edit)."),
    batch_cfg: bool = typer.Option(False, "--batch-cfg", help="Run true CFG's two DiT forwards per step as one batch "
                                   "of two (exact)."),
    fp8: str = typer.Option("off", help="FP8 for the DiT's block projections (torchao): off, dynamic (FP8 matmuls, "
                            "compute capability >= 8.9), weights (FP8 storage, bf16 compute). Approximate."),
):
    """Edit one sample with Qwen-Image-Edit, its conditioning enhanced by Qwen3-VL through the bridge (or with
    Qwen-Image-2.1, the native arm: --editor qwen-image-2.1)."""
    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit
    from bridgecore.model.images import ImageLoadError, load_image
    from bridgecore.model.loading import editor_family

    for flag, path in (("--out", out), ("--compare", compare_path)):
        if path is not None:
            _check_image_path(flag, path)
    for image in images:  # a missing picture is one line before any model is built or trained
        if "://" not in image and not Path(image).expanduser().is_file():
            fail(f"{image}: no such file")
    qwen3, edit_model = resolve_or_tiny(qwen3, edit_model, plus=len(images) > 1, trained=True, editor=editor)
    steps, condition_area = tiny_task_settings(edit_model, steps, condition_area, 1024 * 1024)
    if negative_prompt != J["negative_prompt"] and cfg <= 1:
        fail("--negative-prompt acts only with true CFG: add --cfg > 1 (the model card's recipe: --cfg 4)")
    try:
        family = editor_family(edit_model)
        if editor != "auto" and family != editor:
            raise ValueError(f"--editor {editor}, but {edit_model} is a {family} pipeline")
    except (ValueError, ModelNotAvailableError) as error:
        fail(str(error))
    if family == "qwen-image-2.1":
        from bridgecore.model.native21 import NativeQwenImage21

        if (bridge or baseline or compare_path or cfg > 1 or lora or compile or attention_backend or dit_offload
                or step_cache or batch_cfg or fp8 != "off"):
            fail("Qwen-Image-2.1 (the native arm) takes no --bridge, --baseline, --compare, --cfg or "
                  "speed options: it reads Qwen3-VL itself and is sampled without CFG")
        try:
            native = NativeQwenImage21(edit_model, device=device, condition_area=condition_area,
                                       load_in_8bit=load_in_8bit)
            result = native.generate([load_image(uri) for uri in images], prompt, seed=seed,
                                     steps=40 if steps is None else steps)
        except (ImageLoadError, ModelNotAvailableError, ValueError, FileNotFoundError) as error:
            fail(str(error))
        out.parent.mkdir(parents=True, exist_ok=True)
        result.save(out)
        typer.echo(f"wrote {out} (Qwen-Image-2.1)")
        return
    try:
        editor = EnhancedQwenImageEdit(edit_model, qwen3, bridge=bridge, device=device, condition_area=condition_area,
                                       one_model_at_a_time=one_model_at_a_time, load_in_8bit=load_in_8bit, lora=lora,
                                       scheduler=scheduler, compile=compile, attention_backend=attention_backend,
                                       dit_offload=dit_offload, step_cache=step_cache, batch_cfg=batch_cfg, fp8=fp8)
    except ValueError as error:
        fail(str(error))
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
        fail(str(error))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    typer.echo(f"wrote {out}" + (f" and {compare_path}" if compare_path else ""))


def _check_image_path(flag: str, path: Path) -> None:
    """Refuses, before any model loads, an output PNG the edit could not be saved to after all its work."""
    from PIL import Image

    if path.is_dir():
        fail(f"{flag} {path} is a folder: give a file name such as {path / 'edit.png'}")
    if path.suffix.lower() not in Image.registered_extensions():
        fail(f"{flag} {path}: the file name needs an image extension (.png, .jpg, .webp)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                fail(f"{flag} {path}: {parent} is a file, not a folder")
            break
