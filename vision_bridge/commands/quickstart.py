"""`vision-bridge quickstart`: the main job end to end on an embedded default, and its page."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from vision_bridge import app as shared
from vision_bridge.app import DEFAULT_HOME, TINY_ZOO_DIR, app, fail, preflight, resolve_or_tiny, user_errors


def _write_sample_set(folder: Path) -> Path:
    """Six small generated edit requests (shapes, a text card, a two-tone scene) as a JSONL manifest; files that
    already hold the same bytes are left alone (a rerun finds its inputs unchanged and reuses everything)."""
    from PIL import Image, ImageDraw

    from bridgecore.zoo.synthetic_triplets import encode_png, write_if_changed

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    colours = [(200, 30, 30), (30, 60, 200), (30, 160, 60), (220, 180, 20), (120, 40, 160), (20, 160, 170)]
    for index, colour in enumerate(colours):
        image = Image.new("RGB", (320, 200), (240, 240, 235))
        draw = ImageDraw.Draw(image)
        draw.rectangle((30 + 5 * index, 40, 130, 140), fill=colour)
        draw.ellipse((180, 50, 280 - 5 * index, 150), fill=colours[(index + 1) % len(colours)])
        draw.text((40, 165), f"Hello {index}", fill=(0, 0, 0))
        write_if_changed(folder / f"sample{index}.png", encode_png(image))
        rows.append({"id": f"sample{index}", "image": f"sample{index}.png",
                     "instruction": f"Change the text 'Hello {index}' to 'Goodbye'"})
    manifest = folder / "manifest.jsonl"
    write_if_changed(manifest, ("\n".join(json.dumps(row) for row in rows) + "\n").encode())
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
    from bridgecore.zoo.tiny_zoo import TINY_BRIDGE, TINY_REFERENCE_BRIDGE, TRAINED_EDIT_MODEL, build_tiny_zoo

    qwen3, edit_model = resolve_or_tiny(qwen3, edit_model, trained=True)
    trained_tiny = Path(edit_model).resolve() == (TINY_ZOO_DIR / TRAINED_EDIT_MODEL).resolve()
    reference_bridge = None
    if trained_tiny:
        from bridgecore.zoo.synthetic_triplets import write_triplets

        size = json.loads((Path(edit_model) / REPORT_NAME).read_text())["config"]["image_size"]
        manifest = write_triplets(out_dir / "inputs", 6, size=size, seed=7)  # unchanged files are not rewritten
        work = shared.tiny_zoo_work(bridges=((TINY_BRIDGE,) if bridge is None else ()) + (TINY_REFERENCE_BRIDGE,))
        if work:
            typer.echo(f"tiny bridges for the tiny edit model: {work.strip()}", err=True)
        zoo = build_tiny_zoo(TINY_ZOO_DIR, trained=True, bridge=bridge is None, reference_bridge=True)
        bridge = bridge or str(zoo[TINY_BRIDGE])
        reference_bridge = str(zoo[TINY_REFERENCE_BRIDGE])
    else:
        manifest = _write_sample_set(out_dir / "inputs")
    area = condition_area or (size * size if trained_tiny else 128 * 128)
    edit_steps = steps or (20 if trained_tiny else 4)
    from vision_bridge.flows.local_server import ServerStartError, active_api_url, local_prefect, prefect_environment

    prefect_environment(DEFAULT_HOME / "prefect", quiet=not shared.DEBUG)
    try:
        with local_prefect():  # one temporary Prefect server for every arm of the main job
            arms = _quickstart_arms(out_dir, manifest, qwen3, edit_model, bridge, area, edit_steps, native_arm,
                                    rewrite_arm, active_api_url())
    except (*user_errors(), ServerStartError) as error:
        fail(str(error))
    typer.echo(f"edited images: {out_dir / 'run'}/{{edits,qwen21-edits}}/<settings>/data/<shard>/<id>.png "
               f"(index: runs/<run>/summary.parquet); caches: {out_dir / 'run' / 'caches'}")
    for arm, (run, scores) in arms.items():
        typer.echo(f"arm {arm:<30} run {run}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    page = _main_job_page(out_dir, manifest, arms, qwen3, edit_model, bridge if trained_tiny else None, edit_steps,
                          reference_bridge)
    typer.echo(f"open the page: {page.resolve()}")
    if len(arms) > 1:
        typer.echo("compare arms on a capability benchmark: vision-bridge make-benchmark B; bulk-edit each arm into "
                   "one OUTPUT; vision-bridge evaluate OUTPUT/runs/RUN_A OUTPUT/runs/RUN_B --benchmark B")


def _quickstart_arms(out_dir: Path, manifest: Path, qwen3: str, edit_model: str, bridge: Optional[str], area: int,
                     edit_steps: int, native_arm: bool, rewrite_arm: bool, api_url: Optional[str]) -> dict:
    """Edit, Edit+bridge (with a bridge), Edit+rewrite and Qwen-Image-2.1 over the same samples into one OUTPUT,
    each arm one run of the bulk-edit flow on the temporary Prefect server."""
    from vision_bridge.flows.bulk_edit import bulk_edit as bulk_edit_flow

    preflight(str(manifest), str(out_dir / "run"), False, None, qwen3)
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
            fail("the Qwen-Image-2.1 arm failed (see above); the other arms' results are complete")
        arms["Qwen-Image-2.1" + (" (tiny, random)" if tiny_21 else "")] = _arm_scores(out_dir / "run")
    return arms


def _main_job_page(out_dir: Path, manifest: Path, arms: dict, qwen3: str, edit_model: str, tiny_bridge: Optional[str],
                   steps: int, reference_bridge: Optional[str] = None) -> Path:
    """index.html: the arms side by side with their scores, and with the tiny zoo the mechanism demonstrations (the
    colour only Qwen3-VL read, the no-harm check, the colour only Qwen3-VL saw)."""
    from bridgecore.zoo.demo_page import arms_grid, mechanism_demo, rewrites_of, scores_table, vision_demo, write_page

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
                   f"{numbers['guessing']:.0%}; no harm (both encoders read it all): Edit {numbers['reference']:.0%}, "
                   f"Edit+bridge {numbers['bridge_full']:.0%}")
    runs = {arm: run for arm, (run, _) in arms.items()}
    rewrites = rewrites_of(manifest, out_dir / "run", runs)
    if rewrites and tiny_bridge is not None:
        notes.append("The rewrite arm's Qwen3-VL is a tiny RANDOM model here: its rewrites are gibberish, so Edit+rewrite "
                     "shows the plumbing only; the arm's value can only be measured with real weights.")
    vision = None
    if reference_bridge is not None:
        typer.echo("vision demonstration: a colour only in a reference picture Qwen3-VL alone sees", err=True)
        vision = vision_demo(edit_model, qwen3, reference_bridge, steps=steps)
        typer.echo(f"vision: follow rate (decoded colour == the reference's, {vision[1]['edits_per_condition']} edits): "
                   f"Edit+bridge {vision[1]['bridge']:.0%}, Edit {vision[1]['baseline']:.0%}, Edit told in words "
                   f"{vision[1]['reference']:.0%}")
    return write_page(out_dir, arms_grid(manifest, out_dir / "run", runs), mechanism, numbers, notes, rewrites,
                      scores_table(arms), vision)


def _arm_scores(output: Path) -> tuple[str, dict[str, float]]:
    """(run id, mean of each numeric metric over its done samples) of an output's latest run."""
    import pyarrow.parquet as pq

    summary = json.loads((output / "summary.json").read_text())
    metrics = [json.loads(row["metrics"]) for row in pq.read_table(output / "summary.parquet").to_pylist()
               if row["status"] == "done" and row["metrics"]]
    names = [k for k in (metrics[0] if metrics else {}) if isinstance(metrics[0][k], (int, float))]
    return summary["run"], {k: sum(m[k] for m in metrics) / len(metrics) for k in names}
