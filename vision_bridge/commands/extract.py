"""`vision-bridge extract`: one sample's vision caches, and how the two VLMs' caches compare."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bridgecore.model.loading import DEFAULT_EDIT_MODEL, DEFAULT_QWEN3_MODEL, ModelNotAvailableError
from vision_bridge.app import app, fail, resolve_or_tiny


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
        fail(f"--out must end in .safetensors; got {out}")
    qwen3, edit_model = resolve_or_tiny(qwen3, edit_model, plus=len(images) > 1)
    extractor = VisionCacheExtractor(qwen3, edit_model, device=device, load_in_8bit=load_in_8bit,
                                     condition_area=condition_area)
    try:
        cache = extractor.extract(images, prompt)
    except (ImageLoadError, ModelNotAvailableError, ValueError) as error:
        fail(str(error))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_cache(cache, str(out))
    typer.echo(format_comparison(extractor.compare_caches(cache.qwen3, cache.qwen25)))
    typer.echo(f"wrote {out} ({out.stat().st_size} bytes)")
