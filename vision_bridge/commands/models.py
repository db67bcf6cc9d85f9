"""`vision-bridge tiny-models`: write the offline tiny zoo."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vision_bridge.app import app


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
