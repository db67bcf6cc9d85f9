"""The evaluation report: one self-contained HTML page (embedded PNGs, no external assets).

Per-capability tables with confidence intervals for every arm side by side, bar charts of the headline
metrics, the per-language OCR chart, the paired comparisons of every pair of arms, and comparison grids
(input | arm 1 | arm 2 | ... | target, e.g. input | Edit | Edit+bridge | Edit+rewrite | Qwen-Image-2.1) of the
best and worst samples of each capability, with the rewrite arm's rewritten instruction under the picture.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from bridgecore.evaluation.capabilities import SUMMARY_FIELDS, CapabilityEvaluator


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure_png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bar_chart(summaries: dict[str, dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [(cap, fields[0][0]) for cap, fields in SUMMARY_FIELDS.items()]
    figure, axis = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / max(1, len(summaries))
    for offset, (run, summary) in enumerate(summaries.items()):
        values = [summary[cap][metric] for cap, metric in names]
        low = [v - summary[cap][f"{metric}_ci"][0] for v, (cap, metric) in zip(values, names)]
        high = [summary[cap][f"{metric}_ci"][1] - v for v, (cap, metric) in zip(values, names)]
        axis.bar([i + offset * width for i in range(len(names))], values, width, yerr=[low, high], capsize=3, label=run)
    axis.set_xticks([i + width * (len(summaries) - 1) / 2 for i in range(len(names))])
    axis.set_xticklabels([f"{cap}\n{metric}" for cap, metric in names])
    axis.set_ylim(0, 1.05)
    axis.legend()
    axis.set_title("Edit success per capability (95% bootstrap CI)")
    return _figure_png(figure)


def _language_chart(summaries: dict[str, dict]) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 3.5))
    languages = sorted({lang for s in summaries.values() for lang in s["ocr"].get("per_language", {})})
    width = 0.8 / max(1, len(summaries))
    for offset, (run, summary) in enumerate(summaries.items()):
        per = summary["ocr"].get("per_language", {})
        axis.bar([i + offset * width for i in range(len(languages))],
                 [per.get(lang, {}).get("exact_match", 0.0) for lang in languages], width, label=run)
    axis.set_xticks(range(len(languages)))
    axis.set_xticklabels(languages, rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("OCR exact match")
    axis.set_ylim(0, 1.05)
    axis.legend()
    return _figure_png(figure)


def _table(capability: str, summaries: dict[str, dict]) -> str:
    runs = list(summaries)
    head = "".join(f"<th>{html.escape(run)}</th>" for run in runs)
    rows = []
    for name, _ in SUMMARY_FIELDS[capability]:
        cells = "".join(_cell(summaries[run][capability][name], summaries[run][capability][f"{name}_ci"]) for run in runs)
        rows.append(f"<tr><td>{name}</td>{cells}</tr>")
    count = summaries[runs[0]][capability]["count"]
    missing = [summaries[run][capability].get("missing", 0) for run in runs]
    if any(missing):  # named, not hidden in the means
        cells = "".join(f"<td class='missing'>{m} of {count}</td>" if m else "<td>0</td>" for m in missing)
        rows.insert(0, f"<tr><td><b>missing edits</b> <small>(scored as failures above)</small></td>{cells}</tr>")
    return f"<table><tr><th>{capability} ({count} samples)</th>{head}</tr>{''.join(rows)}</table>"


def _runs_header(runs_info: dict[str, dict] | None) -> str:
    """Per arm: run id, models and bridge checkpoint (from its summary.json)."""
    if not runs_info:
        return ""
    rows = []
    for arm, info in runs_info.items():
        settings = info.get("settings", {})
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            arm, info.get("run", "?"), settings.get("edit_model", "?"), settings.get("qwen3_model", "?"),
            settings.get("bridge") or "none (Qwen-Image-Edit as is)")) + "</tr>")
    return ("<table><tr><th>arm</th><th>run</th><th>edit model</th><th>Qwen3-VL</th><th>bridge checkpoint</th></tr>"
            + "".join(rows) + "</table>")


def _cell(value: float, ci) -> str:
    """A score with its interval, or why there is no number (never a "nan" on the page)."""
    if value is None or value != value:
        return "<td title='no sample of this kind was scored (e.g. no text to read, or every edit missing)'>—</td>"
    low, high = ci
    interval = "" if low is None or low != low else f" <small>[{low:.3f}, {high:.3f}]</small>"
    return f"<td>{value:.3f}{interval}</td>"


def _missing_tile(size: tuple[int, int]) -> Image.Image:
    """A tile that says the edit is missing (a plain grey one reads as a grey edit)."""
    from PIL import ImageDraw

    tile = Image.new("RGB", size, (90, 90, 90))
    draw = ImageDraw.Draw(tile)
    draw.line([(0, 0), (size[0] - 1, size[1] - 1)], fill=(200, 60, 60), width=3)
    draw.line([(0, size[1] - 1), (size[0] - 1, 0)], fill=(200, 60, 60), width=3)
    draw.rectangle([(size[0] // 2 - 40, size[1] // 2 - 10), (size[0] // 2 + 40, size[1] // 2 + 10)], fill=(255, 255, 255))
    draw.text((size[0] // 2, size[1] // 2), "MISSING", fill=(200, 0, 0), anchor="mm")
    return tile


def _grids(evaluators: dict[str, CapabilityEvaluator], root: Path) -> str:
    from bridgecore.model.edit_pipeline import comparison_grid
    from bridgecore.model.images import load_image

    runs = list(evaluators)
    main = evaluators[runs[-1]]  # best and worst of the arm under test (the last)
    rows_by_id = {row["id"]: row for row in main.rows}
    parts = []
    for capability in SUMMARY_FIELDS:
        scored = sorted((s for s in main.per_sample if s["capability"] == capability),
                        key=lambda s: (s["edit_success"], -s.get("cer", 0), s.get("ssim_outside", 0)))
        if not scored:
            continue
        for label, sample in (("worst", scored[0]), ("best", scored[-1])):
            row = rows_by_id[sample["id"]]
            sources = [load_image(root / n) for n in (row.get("images") or [row["image"]])]
            target = load_image(root / row["target"])
            panels = [("input", sources[0])]
            for run in runs:
                edited = evaluators[run].editor(row, sources, target)
                panels.append((run, edited) if edited is not None else (f"{run}: MISSING", _missing_tile(target.size)))
            panels.append(("target", target))
            rewritten = "".join(f"<br><b>{html.escape(run)}</b> read: <i>{html.escape(texts[row['id']])}</i>"
                                for run in runs for texts in [getattr(evaluators[run].editor, "rewrites", {})]
                                if row["id"] in texts)
            parts.append(f"<h4>{capability}: {label} sample <code>{html.escape(row['id'])}</code> — "
                         f"{html.escape(row['instruction'])}</h4><img src='{_png(comparison_grid(panels, 160))}'>"
                         + (f"<p><small>the instruction as rewritten:{rewritten}</small></p>" if rewritten else ""))
    return "".join(parts)


def write_report(path: str | Path, evaluators: dict[str, CapabilityEvaluator], summaries: dict[str, dict],
                 pairs: dict[str, dict] | None = None, benchmark: str | None = None,
                 runs_info: dict[str, dict] | None = None) -> Path:
    """Writes the HTML page; `evaluators`/`summaries` are keyed by arm name, in order (the first is the
    baseline, the last the arm under test); `pairs` maps "B - A" to `paired_comparison(A, B)`. `benchmark`: where
    the benchmark came from as the user gave it (a URL, not the local copy); `runs_info`: per arm, its run's
    `summary.json` (run id, models, bridge checkpoint) for the header."""
    path = Path(path)
    root = next(iter(evaluators.values())).root  # the local copy the grids read
    shown = benchmark or root  # where it came from, as given
    sections = [f"<h2>{cap}</h2>" + _table(cap, summaries) for cap in SUMMARY_FIELDS]
    paired = ""
    for pair, comparison in (pairs or {}).items():
        rows = "".join(f"<tr><td>{cap}</td><td>{name}</td><td>{v['difference']:+.3f}</td>"
                       f"<td>[{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]</td><td>{metrics['count']}</td></tr>"
                       if v["difference"] == v["difference"] else
                       f"<tr><td>{cap}</td><td>{name}</td><td colspan='2'>— no pair of scored samples</td>"
                       f"<td>{metrics['count']}</td></tr>"
                       for cap, metrics in comparison.items() for name, v in metrics.items() if isinstance(v, dict))
        excluded = {cap: metrics.get("excluded_missing", 0) for cap, metrics in comparison.items()}
        note = ("" if not any(excluded.values()) else "<p class='missing'>Left out of these pairs because an edit is "
                "missing in one of the two arms: " + ", ".join(f"{cap} {n}" for cap, n in excluded.items() if n)
                + " sample(s).</p>")
        paired += (f"<h2>Paired comparison: {html.escape(pair)} (same samples and seeds)</h2>{note}"
                   "<table><tr><th>capability</th><th>metric</th><th>difference</th><th>95% CI</th><th>pairs</th></tr>"
                   f"{rows}</table>")
    missing = {run: sum(values.get("missing", 0) for values in summary.values()) for run, summary in summaries.items()}
    total = sum(values.get("count", 0) for values in next(iter(summaries.values())).values())
    runs = ", ".join(html.escape(run) + (f" <span class='missing'>({missing[run]} of {total} edits missing)</span>"
                                         if missing[run] else "") for run in summaries)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vision-bridge evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}img{{max-width:100%}}small{{color:#666}}
.missing{{color:#b00;font-weight:bold}}</style></head>
<body><h1>vision-bridge capability evaluation</h1><p>Benchmark: <code>{html.escape(str(shown))}</code>;
runs: {runs}</p>{_runs_header(runs_info)}
<img alt="edit success per capability" src="{_bar_chart(summaries)}">
<h2>OCR per language</h2><img alt="OCR exact match per language" src="{_language_chart(summaries)}">
{''.join(sections)}{paired}<h2>Best and worst samples</h2>{_grids(evaluators, root)}</body></html>"""
    path.write_text(page, encoding="utf-8")
    return path
