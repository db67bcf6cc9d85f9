"""`vision-bridge make-benchmark` and `vision-bridge evaluate`: the capability benchmark and its scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from vision_bridge.app import DEFAULT_HOME, app, fail, resolve_or_tiny


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
        fail(str(error))
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
        fail("give --editor oracle|identity|noise, or one or more runs (RUNS, --results, --baseline)")
    try:
        given_benchmark = benchmark
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
        fail(str(error))
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
            lost = (f"  ({values['missing']} of {values['count']} edits MISSING: scored as failures, left out of "
                    "paired differences)" if values.get("missing") else "")
            typer.echo(f"{arm + ':' if len(summaries) > 1 else ''}{capability:<12} {headline}{lost}")
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

        write_report(report, evaluators, summaries, output.get("pairs"), benchmark=given_benchmark,
                     runs_info={label: _run_summary(run) for label, run in zip(labels, arm_runs)} if arm_runs else None)
        typer.echo(f"report: {report}")


def _run_summary(run: str) -> dict:
    """A run's summary.json (run id, settings), or {} when it has none (a plain folder of edits)."""
    import posixpath

    from bridgecore.storage import read_uri

    try:
        return json.loads(read_uri(posixpath.join(str(run).rstrip("/"), "summary.json")))
    except (OSError, ValueError):
        return {}

