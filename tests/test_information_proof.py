"""The mechanism proof on a small scale: the colour is hidden from Qwen2.5-VL only, every condition is measured
on the same held-out samples, and the summary has the fields the benchmark's last line promises."""

import json

import numpy as np
import pytest

from bridgecore.information_proof import CONDITIONS, ProofConfig, format_table, redacted_examples, run_proof
from bridgecore.synthetic_triplets import COLOURS, make_triplets

MICRO = ProofConfig(seeds=(0, 1), train_samples=8, heldout_samples=4, steps=3, batch_size=4, heldout_repeats=1,
                    edit_samples=2, inference_steps=2, extract_batch_size=8)


def test_only_qwen3_reads_the_colour(trained_zoo):
    from bridgecore.edit_pipeline import EnhancedQwenImageEdit

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


def test_proof_summary_on_a_small_run(tmp_path, trained_zoo):
    results, summary = run_proof(trained_zoo["qwen-image-edit-trained"], trained_zoo["qwen3-vl"], MICRO, tmp_path)
    assert len(results) == summary["seeds"] == 2 and summary["heldout_samples"] == 4
    for result in results:
        assert set(result["losses"]) == set(CONDITIONS)
        assert all(len(v) == 4 and np.isfinite(v).all() for v in result["losses"].values())
        assert set(result["edit_success"]) == set(CONDITIONS)
    assert summary["diff"] == pytest.approx(summary["gain_real"] - summary["gain_shuffled"])
    assert summary["diff_ci_low"] <= summary["diff"] <= summary["diff_ci_high"]
    json.loads(json.dumps(summary))  # one JSON line
    assert format_table(results).count("\n") == 2 * (len(CONDITIONS) + 1)
