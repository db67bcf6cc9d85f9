"""Capability evaluation: the metrics are validated by reference editors; Tesseract reads every language."""

import html
import json
import subprocess

import numpy as np
import pytest
from helpers import run_cli

from bridgecore.evaluation.benchmark_data import LANGUAGES, make_benchmark
from bridgecore.evaluation.metrics import normalise_text, read_text
from bridgecore.evaluation.capabilities import CapabilityEvaluator, paired_comparison, reference_editor


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    make_benchmark(root, per_capability=len(LANGUAGES), seed=0)  # every language once
    return root


@pytest.fixture(scope="module")
def scores(benchmark):
    return {name: CapabilityEvaluator(benchmark, reference_editor(name)).evaluate_all()
            for name in ("oracle", "identity", "noise")}


def test_generation_is_deterministic(benchmark, tmp_path):
    make_benchmark(tmp_path, per_capability=len(LANGUAGES), seed=0)
    for name in ("manifest.jsonl", "ocr-0005_source.png", "spatial-0003_target.png", "multi-0002_picture2.png"):
        assert (tmp_path / name).read_bytes() == (benchmark / name).read_bytes()


def test_oracle_scores_near_perfect(scores):
    oracle = scores["oracle"]
    assert oracle["ocr"]["exact_match"] >= 0.97 and oracle["ocr"]["cer"] <= 0.02
    assert oracle["spatial"]["direction_accuracy"] == 1.0 and oracle["spatial"]["position_error"] < 0.01
    assert oracle["detail"]["edit_success"] == 1.0 and oracle["detail"]["ssim_outside"] > 0.99
    assert oracle["multi_image"]["consistency"] == 1.0


def test_identity_scores_no_edit_and_perfect_preservation(scores):
    identity = scores["identity"]
    assert identity["ocr"]["exact_match"] == 0.0 and identity["ocr"]["source_residue"] > 0.9
    assert identity["spatial"]["direction_accuracy"] == 0.0 and identity["spatial"]["unmoved_iou"] == 1.0
    assert identity["detail"]["edit_success"] == 0.0 and identity["detail"]["ssim_outside"] == 1.0
    assert identity["detail"]["small_object_survival"] == 1.0
    assert identity["multi_image"]["consistency"] == 0.0


def test_noise_fails_edit_and_preservation(scores):
    noise = scores["noise"]
    assert noise["ocr"]["exact_match"] == 0.0 and noise["ocr"]["preservation_psnr"] < 15
    assert noise["spatial"]["direction_accuracy"] < 0.2 and noise["spatial"]["unmoved_iou"] < 0.2
    assert noise["detail"]["edit_success"] == 0.0 and noise["detail"]["ssim_outside"] < 0.2
    assert noise["multi_image"]["consistency"] == 0.0


def test_confidence_intervals_bracket_the_mean(scores):
    for summary in scores["identity"].values():
        for name, value in summary.items():
            if name.endswith("_ci"):
                low, high = value
                assert low <= summary[name[:-3]] + 1e-9 and summary[name[:-3]] <= high + 1e-9


def test_tesseract_reads_every_language(benchmark, capsys):
    rows = [json.loads(line) for line in (benchmark / "manifest.jsonl").read_text().splitlines()]
    from PIL import Image

    results = {}
    for row in (r for r in rows if r["capability"] == "ocr"):
        read = read_text(Image.open(benchmark / row["image"]).convert("RGB"), row["text_box"], row["tesseract_lang"])
        results[row["language"]] = normalise_text(read) == normalise_text(row["source_text"])
    with capsys.disabled():
        print("\nTesseract reads the source cards:", " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in results.items()))
    assert len(results) == 32 and all(results.values()), [k for k, v in results.items() if not v]


@pytest.mark.slow
def test_paired_comparison(benchmark):
    oracle = CapabilityEvaluator(benchmark, reference_editor("oracle"))
    identity = CapabilityEvaluator(benchmark, reference_editor("identity"))
    oracle.evaluate_all()
    identity.evaluate_all()
    paired = paired_comparison(identity.per_sample, oracle.per_sample)
    assert paired["ocr"]["exact_match"]["difference"] > 0.9 and paired["ocr"]["exact_match"]["ci"][0] > 0.8
    assert paired["spatial"]["count"] == 32


def test_missing_edits_are_counted_and_left_out_of_the_pairs(tmp_path):
    """Two spatial edits missing in one arm: that arm's summary counts them (scored as failures), the paired
    difference is over the 2 samples both arms have, and the report names them and draws labelled tiles."""
    from bridgecore.evaluation.report import write_report

    benchmark = tmp_path / "bench"
    make_benchmark(benchmark, per_capability=4, seed=2)  # small: this is about the bookkeeping, not the metrics
    oracle = reference_editor("oracle")
    rows = [json.loads(line) for line in (benchmark / "manifest.jsonl").read_text().splitlines() if line.strip()]
    lost = {row["id"] for row in rows if row["capability"] == "spatial"}
    lost = set(sorted(lost)[:2])
    identity = CapabilityEvaluator(benchmark, reference_editor("identity"))
    partial = CapabilityEvaluator(benchmark, lambda row, sources, target: None if row["id"] in lost else
                                  oracle(row, sources, target))
    summaries = {"identity": identity.evaluate_all(), "partial": partial.evaluate_all()}
    assert summaries["partial"]["spatial"]["missing"] == 2 and summaries["partial"]["ocr"]["missing"] == 0
    paired = paired_comparison(identity.per_sample, partial.per_sample)
    assert paired["spatial"]["count"] == 2 and paired["spatial"]["excluded_missing"] == 2
    kept = [(i, p) for i, p in zip(sorted(identity.per_sample, key=lambda s: s["id"]),
                                   sorted(partial.per_sample, key=lambda s: s["id"]))
            if i["capability"] == "spatial" and i["id"] not in lost]
    expected = np.mean([p["direction_correct"] - i["direction_correct"] for i, p in kept])
    assert paired["spatial"]["direction_accuracy"]["difference"] == pytest.approx(expected)
    assert paired["ocr"]["excluded_missing"] == 0
    page = write_report(tmp_path / "report.html", {"identity": identity, "partial": partial}, summaries,
                        {"partial - identity": paired}).read_text()
    total = sum(values["count"] for values in summaries["partial"].values())
    assert f"partial <span class='missing'>(2 of {total} edits missing)</span>" in page
    assert "<b>missing edits</b>" in page and "<td class='missing'>2 of 4</td>" in page
    assert "missing in one of the two arms: spatial 2 sample(s)" in page


def test_cli_json_report_and_screenshot(benchmark, tmp_path):
    import shutil

    out = tmp_path / "scores.json"
    result = run_cli("evaluate", "--benchmark", benchmark, "--editor", "identity", "--json", out,
                     "--report", tmp_path / "r.html")
    assert result.returncode == 0, result.stderr
    scores = json.loads(out.read_text())
    for capability, metric in [("ocr", "exact_match"), ("ocr", "cer"), ("spatial", "direction_accuracy"),
                               ("spatial", "position_error"), ("detail", "ssim_outside"), ("detail", "psnr_outside"),
                               ("multi_image", "consistency")]:
        assert metric in scores[capability] and f"{metric}_ci" in scores[capability]
        assert scores[capability]["count"] == 32
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed for the report test (.ci/run installs it)"
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}",
                    (tmp_path / "r.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 20  # text, tables and charts rendered, not a blank page
    assert (pixels < 100).mean() > 0.01


def test_bulk_edit_run_over_the_benchmark_is_scored(benchmark, tmp_path, tiny_zoo):
    """The harness end to end with the tiny models: bulk stages over the benchmark, then --results scoring."""
    from helpers import run_all

    from bridgecore.batch.settings import JobSettings
    from bridgecore.evaluation.capabilities import results_editor

    small = tmp_path / "bench"
    make_benchmark(small, per_capability=2, seed=1)
    settings = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=64 * 64, steps=2)
    out = str(tmp_path / "run")
    summary = run_all(str(small / "manifest.jsonl"), out, settings)
    assert summary["counts"]["done"] == 6 and summary["counts"]["failed"] == 2  # multi-image needs Edit-Plus
    scores = CapabilityEvaluator(small, results_editor(out)).evaluate_all()
    assert scores["multi_image"]["missing"] == 2 and scores["ocr"]["missing"] == 0
    assert 0.0 <= scores["detail"]["ssim_outside"] <= 1.0


def test_encoders_read_the_cards(benchmark, extractor, tmp_path):
    """Runs `generate` on both VLMs over OCR cards (tiny random models read nonsense: CER is high)."""
    from bridgecore.evaluation.capabilities import encoder_reading

    small = tmp_path / "b"
    make_benchmark(small, per_capability=2)
    reading = encoder_reading(small, extractor, max_new_tokens=4)
    assert set(reading) == {"qwen25_vl", "qwen3_vl"}
    for model in reading.values():
        assert len(model["per_language_cer"]) == 2 and model["cer"] >= 0


@pytest.mark.slow
def test_four_arms_in_one_output_are_compared_pairwise(benchmark, tmp_path, tiny_zoo):
    """Edit, Edit+bridge, Edit+rewrite and Qwen-Image-2.1 share one OUTPUT (the bridge and rewrite arms reuse the
    Edit arm's caches); `evaluate RUN_A RUN_B ...` names the arms from their settings, compares every pair on the
    same samples, and the report shows them side by side, the rewritten instruction under the picture."""
    import dataclasses

    from helpers import save_open_bridge
    from helpers import run_all

    from bridgecore.batch.settings import JobSettings

    small = tmp_path / "bench"
    make_benchmark(small, per_capability=2, seed=1)
    edit = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=64 * 64, steps=2)
    arms = (edit, dataclasses.replace(edit, bridge=save_open_bridge(edit, tmp_path / "bridge")),
            dataclasses.replace(edit, rewrite_with="qwen3", rewrite_max_tokens=12),
            dataclasses.replace(edit, edit_model=str(tiny_zoo["qwen-image-2.1"])))
    out = tmp_path / "out"
    runs = [run_all(str(small / "manifest.jsonl"), str(out), settings)["run"] for settings in arms]
    scores, report = tmp_path / "arms.json", tmp_path / "arms.html"
    result = run_cli("evaluate", *(out / "runs" / run for run in runs), "--benchmark", small, "--json", scores,
                     "--report", report)
    assert result.returncode == 0, result.stderr
    output = json.loads(scores.read_text())
    assert list(output["arms"]) == ["Edit", "Edit+bridge", "Edit+rewrite", "Qwen-Image-2.1"]
    assert set(output["pairs"]) == {"Edit+bridge - Edit", "Edit+rewrite - Edit", "Edit+rewrite - Edit+bridge",
                                    "Qwen-Image-2.1 - Edit", "Qwen-Image-2.1 - Edit+bridge",
                                    "Qwen-Image-2.1 - Edit+rewrite"}
    for pair, comparison in output["pairs"].items():
        b, a = pair.split(" - ")
        for capability, metric in (("ocr", "cer"), ("detail", "ssim_outside")):
            difference = comparison[capability][metric]
            expected = output["arms"][b][capability][metric] - output["arms"][a][capability][metric]
            assert abs(difference["difference"] - expected) < 1e-9
            assert difference["ci"][0] <= difference["difference"] <= difference["ci"][1]
    # the arms are really different editors: their pictures differ
    assert output["pairs"]["Edit+bridge - Edit"]["detail"]["ssim_outside"]["difference"] != 0
    assert output["pairs"]["Qwen-Image-2.1 - Edit"]["detail"]["ssim_outside"]["difference"] != 0
    page = report.read_text()
    assert all(name in page for name in ("Edit+bridge", "Qwen-Image-2.1 - Edit+bridge", "<th>Qwen-Image-2.1</th>"))
    # the header names each arm's run, models and bridge checkpoint; no cell says "nan"
    assert all(run in page for run in runs) and "bridge checkpoint" in page and str(tmp_path / "bridge") in page
    assert ">nan" not in page and "[nan" not in page and "+nan" not in page
    assert "Qwen-Image-2.1 - Edit:" in result.stdout
    import pyarrow.parquet as pq

    # 8 samples, the 2 multi-image ones fail on the single-image tiny Edit
    rewrites = [row["rewrite"] for row in pq.read_table(out / "runs" / runs[2] / "summary.parquet").to_pylist()
                if row["rewrite"]]
    assert len(rewrites) == 6 and "the instruction as rewritten:<br><b>Edit+rewrite</b> read:" in page
    assert sum(html.escape(text) in page for text in set(rewrites)) >= 1
    # the two multi-image samples the Edit arms could not edit: counted, named, never paired
    assert output["arms"]["Edit"]["multi_image"]["missing"] == 2
    assert output["pairs"]["Qwen-Image-2.1 - Edit"]["multi_image"]["excluded_missing"] == 2
    assert "Edit <span class='missing'>(2 of 8 edits missing)</span>" in page
