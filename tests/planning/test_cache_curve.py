"""bench/cache_curve.py: the bytes-vs-follow table is built from the planner and the proof's result files, each proof
row paired with the bf16 full-view run on the same seeds."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _curve():
    spec = importlib.util.spec_from_file_location("cache_curve", BENCH / "cache_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_proof_row_is_paired_on_its_own_seeds(tmp_path, monkeypatch):
    curve = _curve()
    reference = {"config": {"seeds": [0, 1, 2]}, "seeds_formed": 3, "follow_rate_per_seed": [0.8, 0.9, 0.7],
                 "no_harm_difference_per_seed": [-0.01, 0.0, -0.02], "vision_follow_rate_per_seed": [0.8, 0.8, 0.9]}
    smaller = {"config": {"seeds": [2, 0]}, "seeds_formed": 2, "follow_rate_per_seed": [0.75, 0.8],
               "no_harm_difference_per_seed": [0.0, 0.0], "vision_follow_rate_per_seed": [0.9, 0.8]}
    (tmp_path / "full.txt").write_text("a table\n" + json.dumps(reference) + "\n")
    (tmp_path / "int8.txt").write_text(json.dumps(smaller) + "\n")
    monkeypatch.setattr(curve, "RESULTS", tmp_path)
    monkeypatch.setattr(curve, "REFERENCE", "full.txt")
    monkeypatch.setattr(curve, "SETTINGS", [("bf16", {}, "full.txt"),
                                            ("int8 512", {"cache_dtype": "int8", "qwen3_area": 512 * 512}, "int8.txt")])
    bf16, int8 = curve.rows()
    assert int8["mb_per_image"] < 15 < bf16["mb_per_image"] and int8["mb_per_image_cfg"] < 25
    mean, low, high = int8["read follow paired"]
    assert mean == pytest.approx(np.mean([0.75 - 0.7, 0.8 - 0.8]))  # seed 2 against seed 2, seed 0 against seed 0
    assert low < mean < high and int8["seeds_formed"] == 2
    assert "paired +2.5 [" in curve.table([bf16, int8])  # the table prints the paired difference in points


def test_the_shipped_curve_reads_every_result_file():
    rows = _curve().rows()
    assert {row["setting"] for row in rows if "seeds" in row} >= {"bf16 (the default)", "int8, Qwen3-VL sees 512^2"}
    assert all(row["mb_per_image"] < row["mb_per_image_cfg"] for row in rows)
