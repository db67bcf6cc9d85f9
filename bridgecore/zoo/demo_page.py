"""The main job's page: the arms side by side on the quickstart samples, and the mechanism demonstrations.

`vision-bridge quickstart` ends by writing `index.html` (with its PNG grids beside it) into its output
folder. On the tiny offline zoo it shows:

- the arms: input | Edit | Edit+bridge | Edit+rewrite | Qwen-Image-2.1 | target, one row per sample (read from
  each arm's `runs/<run>/summary.parquet`), and what the rewrite arm's Qwen3-VL wrote for each instruction;
- the mechanism: Qwen2.5-VL (the DiT's own encoder) reads "Make the <shape>" without the colour; the
  bridge's Qwen3-VL reads the colour. Per image: Edit without the colour | Edit+bridge | the reference (Edit
  given the colour) | target, and one image with Qwen3-VL reading every colour in turn, with the follow rate
  (decoded colour == the colour Qwen3-VL read) of each condition over images x colours, and the no-harm check
  (both encoders read the whole instruction: Edit vs Edit+bridge);
- vision: a colour only in a reference picture that Qwen3-VL alone sees (`vision_demo`): input | reference |
  Edit | Edit+bridge | Edit told the colour in words | target, with follow rates over every swatch.
"""

from __future__ import annotations

import html
import json
from dataclasses import replace
from pathlib import Path

from PIL import Image

from bridgecore.model.edit_pipeline import comparison_grid
from bridgecore.model.images import load_image

TILE = 128
ARM_TILE = 176  # room for an arm name above each picture


def _stack(rows: list[Image.Image]) -> Image.Image:
    width = max(r.width for r in rows)
    grid = Image.new("RGB", (width, sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height
    return grid


def _summary_rows(output: Path, run: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(output / "runs" / run / "summary.parquet").to_pylist()


def _outputs(output: Path, run: str) -> dict[str, str]:
    return {row["id"]: row["output"] for row in _summary_rows(output, run) if row["status"] == "done" and row["output"]}


def rewrites_of(manifest: Path, output: Path, runs: dict[str, str], limit: int = 6) -> list[dict]:
    """[{"id", "instruction", arm: rewrite, ...}] for the manifest's first `limit` samples and the arms that rewrite
    (empty when none does)."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()][:limit]
    written = {arm: {row["id"]: row.get("rewrite") for row in _summary_rows(output, run)} for arm, run in runs.items()}
    written = {arm: texts for arm, texts in written.items() if any(texts.values())}
    if not written:
        return []
    return [{"id": row["id"], "instruction": row["instruction"],
             **{arm: texts.get(row["id"]) for arm, texts in written.items()}} for row in rows]


def arms_grid(manifest: Path, output: Path, runs: dict[str, str], limit: int = 6) -> Image.Image:
    """input | each arm (by name, its run id in `output`) | target, for the manifest's first `limit` samples."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()][:limit]
    outputs = {arm: _outputs(output, run) for arm, run in runs.items()}
    grids = []
    for row in rows:
        source = load_image(manifest.parent / (row.get("images") or [row["image"]])[0])
        panels = [("input", source)]
        for arm, found in outputs.items():
            path = found.get(row["id"])
            panels.append((arm, load_image(path) if path else Image.new("RGB", source.size, (128, 128, 128))))
        if row.get("target"):
            panels.append(("target", load_image(manifest.parent / row["target"])))
        grids.append(comparison_grid(panels, ARM_TILE))
        grids.append(_caption(row["instruction"], grids[-1].width))
    return _stack(grids)


def _caption(text: str, width: int) -> Image.Image:
    from PIL import ImageDraw

    strip = Image.new("RGB", (width, 18), (240, 240, 240))
    ImageDraw.Draw(strip).text((4, 3), text[:120], fill=(0, 0, 0))
    return strip


def _demo_editor(edit_model, qwen3_model):
    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit
    from bridgecore.zoo.tiny_edit_model import REPORT_NAME

    size = json.loads((Path(edit_model) / REPORT_NAME).read_text())["config"]["image_size"]
    return EnhancedQwenImageEdit(edit_model, qwen3_model, device="cpu", condition_area=size * size), size


def _follow(results: dict) -> dict:
    return {name: float(result["follow"].mean()) for name, result in results.items()}


def mechanism_demo(edit_model: str | Path, qwen3_model: str | Path, bridge: str | Path, images: int = 8,
                   steps: int = 20, seed: int = 30_000) -> tuple[Image.Image, dict]:
    """The colour word only Qwen3-VL reads, on fresh pictures, and the paired no-harm check (both encoders read the
    whole instruction); returns (the grid, follow rates, edit successes and counts)."""
    from bridgecore.model.bridge import VisionCacheBridge
    from bridgecore.zoo.information_proof import colour_sweep, decode_sweep
    from bridgecore.zoo.synthetic_triplets import COLOURS, make_triplets
    from bridgecore.zoo.tiny_edit_model import one_thread

    with one_thread():
        editor, size = _demo_editor(edit_model, qwen3_model)
        model = VisionCacheBridge.from_pretrained(bridge).eval()
        triplets = make_triplets(images, size, seed=seed)  # pictures neither the edit model nor the bridge saw
        sweep = colour_sweep(editor, triplets)
        results = decode_sweep(editor, sweep, {"baseline": (None, "hidden"), "bridge": (model, "hidden"),
                                               "reference": (None, "told"), "bridge_full": (model, "told")},
                               steps, keep_images=True)
    colours, rows = list(COLOURS), []
    labels = {"baseline": "Edit, no colour", "bridge": "Edit+bridge", "reference": "Edit, told it"}
    for i, triplet in enumerate(triplets):
        own = i * len(colours) + colours.index(triplet.colour)
        panels = [("input", triplet.source), *((labels[n], results[n]["images"][own]) for n in labels),
                  ("target", triplet.target)]
        rows += [comparison_grid(panels, TILE), _caption(f"{triplet.instruction}  (Qwen2.5-VL read: "
                                                         f"'{triplet.instruction_without_colour()}'; Qwen3-VL read it "
                                                         "all; 'told it': Qwen2.5-VL read it all)", 5 * TILE)]
    sweep_row = [("input", triplets[0].source)] + [(f"Qwen3: {c}", results["bridge"]["images"][j])
                                                  for j, c in enumerate(colours)]
    rows += [_caption(f"the same picture, Qwen2.5-VL reading 'Make the {triplets[0].shape}' and Qwen3-VL reading "
                      "every colour in turn (Edit+bridge):", 7 * TILE), comparison_grid(sweep_row, TILE)]
    numbers = _follow(results)
    numbers.update(success_edit_full=float(results["reference"]["success"].mean()),
                   success_bridge_full=float(results["bridge_full"]["success"].mean()),
                   images=images, colours=len(colours), edits_per_condition=images * len(colours),
                   guessing=1 / len(colours))
    return _stack(rows), numbers


def vision_demo(edit_model: str | Path, qwen3_model: str | Path, bridge: str | Path, images: int = 8,
                steps: int = 20, seed: int = 31_000) -> tuple[Image.Image, dict]:
    """A colour that exists only in a reference picture Qwen3-VL alone sees: input | reference | Edit | Edit+bridge |
    Edit told the colour in words | target, and the follow rates over every colour's swatch."""
    from bridgecore.model.bridge import VisionCacheBridge
    from bridgecore.zoo.information_proof import decode_sweep, reference_sweep
    from bridgecore.zoo.synthetic_triplets import COLOURS, make_reference_triplets
    from bridgecore.zoo.tiny_edit_model import one_thread

    with one_thread():
        editor, size = _demo_editor(edit_model, qwen3_model)
        model = VisionCacheBridge.from_pretrained(bridge).eval()
        triplets = make_reference_triplets(images, size, seed=seed)
        sweep = reference_sweep(editor, triplets, seed)
        results = decode_sweep(editor, sweep, {"baseline": (None, "task"), "bridge": (model, "task"),
                                               "reference": (None, "told")}, steps, keep_images=True)
    colours, rows = list(COLOURS), []
    labels = {"baseline": "Edit", "bridge": "Edit+bridge", "reference": "Edit, told in words"}
    for i, triplet in enumerate(triplets):
        own = i * len(colours) + colours.index(triplet.colour)
        panels = [("input", triplet.source), ("reference (Qwen3-VL only)", triplet.references[0]),
                  *((labels[n], results[n]["images"][own]) for n in labels), ("target", triplet.target)]
        rows += [comparison_grid(panels, TILE), _caption(f"'{triplet.instruction}': the colour is only in the "
                                                         "reference picture, which only Qwen3-VL sees", 6 * TILE)]
    numbers = _follow(results)
    numbers.update(images=images, colours=len(colours), edits_per_condition=images * len(colours),
                   guessing=1 / len(colours))
    return _stack(rows), numbers


def scores_table(arms: dict) -> str:
    """Each arm's mean scores (the run's metrics over its done samples) as an HTML table."""
    names = sorted({name for _, scores in arms.values() for name in scores})
    if not names:
        return ""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in names)
    body = "".join(f"<tr><td>{html.escape(arm)}</td>" + "".join(
        f"<td>{scores[name]:.3f}</td>" if name in scores else "<td>-</td>" for name in names) + "</tr>"
        for arm, (_, scores) in arms.items())
    return f"<table><tr><th>arm</th>{head}</tr>{body}</table>"


def write_page(folder: Path, arms: Image.Image | None, mechanism: Image.Image | None, numbers: dict | None,
               notes: list[str], rewrites: list[dict] | None = None, scores: str = "",
               vision: tuple[Image.Image, dict] | None = None) -> Path:
    """`folder/index.html` with `arms.png`, `mechanism.png` and `vision.png` beside it; `rewrites` from
    `rewrites_of`, `scores` from `scores_table`."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = [f"<p>{html.escape(note)}</p>" for note in notes]
    if arms is not None:
        arms.save(folder / "arms.png")
        parts.append("<h2>The arms on the job's samples</h2><p>input | each arm | target (the task's ground truth). "
                     "Edit and Edit+bridge look alike here, by design: both encoders read the whole instruction, so "
                     "the DiT's own encoder already knows the colour and the bridge is trained to add nothing then "
                     "(the no-harm check below measures it). Where only Qwen3-VL knows the answer they differ: see "
                     "the mechanism sections.</p>" + scores + "<img src='arms.png' alt='arms side by side'>")
    if rewrites:
        names = [key for key in rewrites[0] if key not in ("id", "instruction")]
        head = "".join(f"<th>{html.escape(name)}: the instruction as rewritten</th>" for name in names)
        body = "".join("<tr><td><code>" + html.escape(row["id"]) + "</code></td><td>" + html.escape(row["instruction"])
                       + "</td>" + "".join(f"<td>{html.escape(row[name] or '(failed)')}</td>" for name in names)
                       + "</tr>" for row in rewrites)
        parts.append("<h3>What the rewrite arm gave the edit model's encoder</h3>"
                     f"<table class='text'><tr><th>sample</th><th>instruction</th>{head}</tr>{body}</table>")
    if mechanism is not None and numbers is not None:
        mechanism.save(folder / "mechanism.png")
        parts.append(
            "<h2>Mechanism: the colour word reaches the DiT only through Qwen3-VL and the bridge</h2>"
            "<p>Qwen2.5-VL, the DiT's own encoder, reads the instruction <em>without</em> its colour word; Qwen3-VL "
            "reads it in full, and the bridge appends what it reads as a conditioning token. Follow rate = the "
            f"decoded colour is the colour Qwen3-VL read, over {numbers['images']} unseen pictures x "
            f"{numbers['colours']} colours ({numbers['edits_per_condition']} edits per condition):</p><table>"
            f"<tr><th>condition</th><th>follow rate</th></tr>"
            f"<tr><td>Edit, colour hidden (no bridge)</td><td>{numbers['baseline']:.0%}</td></tr>"
            f"<tr><td>Edit+bridge (Qwen3-VL reads the colour)</td><td>{numbers['bridge']:.0%}</td></tr>"
            f"<tr><td>reference: Edit given the colour by its own encoder</td><td>{numbers['reference']:.0%}</td></tr>"
            f"<tr><td>guessing</td><td>{numbers['guessing']:.0%}</td></tr></table>"
            "<p><b>No harm</b> (both encoders read the whole instruction, same pictures, noise and colours): follow "
            f"{numbers['reference']:.0%} (Edit) vs {numbers['bridge_full']:.0%} (Edit+bridge); edit success "
            f"{numbers['success_edit_full']:.0%} vs {numbers['success_bridge_full']:.0%}.</p>"
            "<img src='mechanism.png' alt='mechanism demonstration'>")
    if vision is not None:
        grid, seen = vision
        grid.save(folder / "vision.png")
        parts.append(
            "<h2>Vision: a colour only Qwen3-VL saw</h2><p>One instruction for every colour, 'Make the &lt;shape&gt; "
            "the colour of the reference'; the colour is only in a reference picture that Qwen3-VL sees and "
            "Qwen2.5-VL (the DiT's encoder) and the VAE do not. Follow rate over "
            f"{seen['images']} unseen pictures x {seen['colours']} swatches:</p><table><tr><th>condition</th>"
            f"<th>follow rate</th></tr><tr><td>Edit (no bridge)</td><td>{seen['baseline']:.0%}</td></tr>"
            f"<tr><td>Edit+bridge (Qwen3-VL sees the reference)</td><td>{seen['bridge']:.0%}</td></tr>"
            f"<tr><td>reference: Edit told the colour in words</td><td>{seen['reference']:.0%}</td></tr>"
            f"<tr><td>guessing</td><td>{seen['guessing']:.0%}</td></tr></table>"
            "<img src='vision.png' alt='vision demonstration'>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>vision-bridge main job</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%}"
            "table.text{table-layout:fixed;width:100%}table.text td{overflow-wrap:anywhere;word-break:break-word}"
            "</style></head><body>"
            "<h1>vision-bridge: the main job</h1>" + "".join(parts) + "</body></html>")
    path = folder / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
