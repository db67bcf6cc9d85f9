"""The mechanism proof on a small scale: the colour is hidden from Qwen2.5-VL only, every condition is measured on
the same held-out samples, the counterfactual edits read back the colour, and the summary has the fields the
benchmark's last line promises."""

import json

import numpy as np
import pytest

from bridgecore.zoo.information_proof import (
    ProofConfig,
    format_summary,
    format_table,
    painted_colour,
    redacted_examples,
    run_proof,
    t_interval,
)
from bridgecore.zoo.synthetic_triplets import COLOURS, make_triplets

MICRO = ProofConfig(seeds=(0, 1), designs=("residual", "tokens"), default_design="tokens", train_samples=8,
                    heldout_samples=4, steps=3,
                    batch_size=4, heldout_repeats=1, counterfactual_images=2, inference_steps=2,
                    extract_batch_size=8)


@pytest.mark.slow
def test_only_qwen3_reads_the_colour(trained_zoo):
    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit

    editor = EnhancedQwenImageEdit(trained_zoo["qwen-image-edit-trained"], trained_zoo["qwen3-vl"], device="cpu",
                                   condition_area=64 * 64)
    triplets = make_triplets(3, seed=5)
    examples, full = redacted_examples(editor, triplets, "t")
    tokenizer = editor.extractor.qwen25_encoder.processor.tokenizer
    for example, triplet in zip(examples, triplets):
        seen_by_qwen25 = tokenizer.decode(example.cache.qwen25.input_ids)
        seen_by_qwen3 = tokenizer.decode(example.cache.qwen3.input_ids)
        assert triplet.colour in seen_by_qwen3 and f"Make the {triplet.shape}" in seen_by_qwen25
        assert not any(colour in seen_by_qwen25 for colour in COLOURS)
        assert triplet.colour in tokenizer.decode(full[example.key].input_ids)


def test_painted_colour_reads_the_named_shape():
    triplet = make_triplets(1, seed=3)[0]
    assert painted_colour(triplet, triplet.target) == triplet.colour
    assert painted_colour(triplet, triplet.source) == triplet.shapes[triplet.shape][0]


def test_t_interval_over_seeds():
    low, high = t_interval([0.011, 0.160, 0.043])  # the three seeds behind the old "+7.1% [+0.9, +15.6]"
    assert low == pytest.approx(-0.124, abs=2e-3) and high == pytest.approx(0.266, abs=2e-3)
    assert all(np.isnan(t_interval([0.5])))


@pytest.mark.slow
def test_proof_summary_on_a_small_run(tmp_path, trained_zoo):
    results, summary = run_proof(trained_zoo["qwen-image-edit-trained"], trained_zoo["qwen3-vl"], MICRO, tmp_path)
    assert len(results) == summary["seeds"] == 2 and summary["heldout_samples"] == 4
    for result in results:
        assert set(result["losses"]) == {"baseline", "control", "control_residual", "control_tokens", "reference",
                                         "residual", "tokens", "residual_qwen3_shuffled", "tokens_qwen3_shuffled"}
        assert result["losses"]["control"] is result["losses"]["control_tokens"]  # the default design's own control
        assert all(len(v) == 4 and np.isfinite(v).all() for v in result["losses"].values())
        for name, counterfactual in result["counterfactual"].items():
            assert counterfactual["follow"].shape == (2, len(COLOURS)) and counterfactual["success"].shape == (2,)
        # the redacted prompt gives the DiT no colour: without a bridge, the colour word Qwen3 reads changes nothing
        assert not result["counterfactual"]["baseline"]["changed"].any()
        assert set(result["level_zeroed"]["tokens"]) == {"early", "mid", "late"}
    assert summary["design"] == "tokens" and 0 <= summary["follow_rate"] <= 1
    assert summary["designs"]["residual"]["control"] == "control_residual"  # each design against its own control
    assert summary["fraction_captured_ci_low"] <= summary["fraction_captured"] <= summary["fraction_captured_ci_high"]
    assert summary["diff"] == pytest.approx(summary["gain_real"] - summary["gain_shuffled"])
    for key in ("follow_rate", "follow_rate_control", "fraction_captured", "fraction_captured_ci_low",
                "fraction_captured_ci_high"):
        assert key in summary
    json.loads(json.dumps(summary))  # one JSON line
    table = format_table(results, MICRO)
    assert table.count("\n") == 2 * (1 + 2 + 2 + 1 + 2) and "reference" in table
    assert "tokens" in format_summary(summary)
