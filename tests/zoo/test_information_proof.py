"""The mechanism proof on a small scale: the colour is hidden from Qwen2.5-VL only (read task) or exists only in a
picture Qwen3-VL alone sees (saw task), every condition is measured on the same held-out pictures, the
counterfactual edits read back the colour, and the summary holds what the benchmark's last line promises."""

import json

import numpy as np
import pytest
import torch

from bridgecore.zoo.information_proof import (
    ProofConfig,
    colour_examples,
    format_summary,
    format_table,
    paired_picture_bootstrap,
    painted_colour,
    redacted_examples,
    reference_examples,
    run_proof,
    summarize,
    t_interval,
    verdict,
)
from bridgecore.zoo.synthetic_triplets import (
    COLOURS,
    HELDOUT_TEMPLATES,
    TRAINING_TEMPLATES,
    make_reference_triplets,
    make_triplets,
    nearest_colour,
)

MICRO = ProofConfig(seeds=(0, 1), train_samples=8, heldout_samples=4, steps=3, batch_size=4, heldout_repeats=1,
                    counterfactual_images=2, noharm_images=2, template_images=1, ablation_images=1, inference_steps=2,
                    extract_batch_size=8)


@pytest.fixture(scope="module")
def editor(trained_zoo):
    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit

    return EnhancedQwenImageEdit(trained_zoo["qwen-image-edit-trained"], trained_zoo["qwen3-vl"], device="cpu",
                                 condition_area=64 * 64)


@pytest.mark.slow
def test_only_qwen3_reads_the_colour_and_the_full_twin_tells_qwen25(editor):
    triplets = make_triplets(3, seed=5)
    redacted, full = colour_examples(editor, triplets, "t", templates=TRAINING_TEMPLATES, seed=1)
    tokenizer = editor.extractor.qwen25_encoder.processor.tokenizer
    for hidden, told, triplet in zip(redacted, full, triplets):
        seen_by_qwen25 = tokenizer.decode(hidden.cache.qwen25.input_ids)
        seen_by_qwen3 = tokenizer.decode(hidden.cache.qwen3.input_ids)
        assert triplet.colour in seen_by_qwen3 and f"Make the {triplet.shape}" in seen_by_qwen25
        assert not any(colour in seen_by_qwen25 for colour in COLOURS)
        assert f"Make the {triplet.shape} {triplet.colour}" in tokenizer.decode(told.cache.qwen25.input_ids)
        assert told.key == hidden.key + "-full" and told.target is hidden.target  # one picture, two views
    assert set(redacted_examples(editor, triplets, "t")[1]) == {e.key for e in redacted_examples(editor, triplets, "t")[0]}


@pytest.mark.slow
def test_the_reference_is_seen_by_qwen3_only(editor):
    triplets = make_reference_triplets(2, seed=3)
    examples, told = reference_examples(editor, triplets, "r")
    for example, words, triplet in zip(examples, told, triplets):
        qwen3, qwen25 = example.cache.qwen3, example.cache.qwen25
        assert qwen3.grid_thw.shape[0] == 2 and qwen3.reference_images == 1 and qwen3.condition_images == 1
        assert qwen25.grid_thw.shape[0] == 1  # the DiT's encoder never sees the swatch
        assert qwen3.image_digest == qwen25.image_digest and qwen3.reference_digest  # the same condition picture
        tokenizer = editor.extractor.qwen25_encoder.processor.tokenizer
        assert not any(c in tokenizer.decode(qwen25.input_ids) for c in COLOURS)
        assert triplet.colour in tokenizer.decode(words.cache.qwen25.input_ids)
    # a swatch of another colour changes Qwen3-VL's reference tokens and nothing before them
    other = next(c for c in COLOURS if c != triplets[0].colour)
    own, swapped = (editor.extractor.extract_qwen3_vision([triplets[0].source], triplets[0].instruction,
                                                          references=[triplets[0].with_reference(c)])
                    for c in (triplets[0].colour, other))
    early, before = swapped.levels["early"], own.levels["early"]
    first_reference = int(swapped.vision_positions[-(int(swapped.grid_thw[1].prod()) // 4)])
    assert torch.equal(early[:first_reference], before[:first_reference])
    assert not torch.equal(early[first_reference:], before[first_reference:])


def test_templates_word_the_colour_both_ways():
    triplet = make_triplets(1, seed=2)[0]
    assert triplet.phrased(TRAINING_TEMPLATES[0]) == triplet.instruction
    for template in (*TRAINING_TEMPLATES, *HELDOUT_TEMPLATES):
        assert triplet.colour in triplet.phrased(template) and triplet.shape in triplet.phrased(template)
    assert not set(TRAINING_TEMPLATES) & set(HELDOUT_TEMPLATES)
    assert set(HELDOUT_TEMPLATES.values()) == {"space", "no space"}
    for template, kind in HELDOUT_TEMPLATES.items():  # "no space": the colour glued to the character before it
        assert (" {colour}" in template) == (kind == "space")
    swatch = triplet.with_reference("purple", seed=4)
    assert nearest_colour(np.asarray(swatch).reshape(-1, 3).mean(0)) == "purple"


def test_painted_colour_reads_the_named_shape():
    triplet = make_triplets(1, seed=3)[0]
    assert painted_colour(triplet, triplet.target) == triplet.colour
    assert painted_colour(triplet, triplet.source) == triplet.shapes[triplet.shape][0]


def test_t_interval_over_seeds():
    low, high = t_interval([0.011, 0.160, 0.043])  # the three seeds behind the old "+7.1% [+0.9, +15.6]"
    assert low == pytest.approx(-0.124, abs=2e-3) and high == pytest.approx(0.266, abs=2e-3)
    assert all(np.isnan(t_interval([0.5])))


def test_paired_bootstrap_resamples_pictures():
    harm = [np.array([[-1.0, 0.0]] * 8), np.array([[0.0, -1.0]] * 8)]  # every picture loses half its colours
    assert paired_picture_bootstrap(harm) == pytest.approx((-0.5, -0.5))
    mixed = [np.array([[1.0], [-1.0]] * 16)]
    low, high = paired_picture_bootstrap(mixed)
    assert low < 0 < high


def _fake_result(seed: int, follow: float, noharm: float, saw: float) -> dict:
    """A per-seed result with given rates: 8 pictures x 6 colours."""
    def outcome(rate: float) -> dict:
        follow_array = np.zeros((8, 6), dtype=bool)
        follow_array.flat[: round(rate * 48)] = True
        return {"follow": follow_array, "changed": np.ones((8, 6), dtype=bool), "success": follow_array[:, 0].copy()}

    losses = {name: np.full(4, value) for name, value in (("baseline", 0.3), ("bridge", 0.05), ("control", 0.12),
                                                           ("reference", 0.04), ("bridge_qwen3_shuffled", 0.4))}
    read = {"losses": losses, "level_zeroed": {"early": 0.3, "mid": 0.05, "late": 0.05},
            "counterfactual": {"baseline": outcome(1 / 6), "bridge": outcome(follow), "control": outcome(1 / 6),
                               "reference": outcome(0.95)},
            "templates": {t: outcome(follow)["follow"] for t in HELDOUT_TEMPLATES},
            "noharm": {"edit": outcome(0.9), "bridge": outcome(0.9 + noharm)}}
    seen = {"losses": losses, "level_zeroed": read["level_zeroed"],
            "counterfactual": {"baseline": outcome(1 / 6), "bridge": outcome(saw), "control": outcome(1 / 6),
                               "reference": outcome(0.95)},
            "ablations": {"bridge": {"early zeroed": 0.2, "reference positions zeroed": 1 / 6}}}
    return {"seed": seed, "read": read, "saw": seen}


def test_summary_counts_formed_seeds_and_reports_no_harm():
    config = ProofConfig(seeds=(0, 1, 2), saw_deepstack=False)
    results = [_fake_result(0, 0.9, 0.0, 0.8), _fake_result(1, 0.25, -0.125, 0.75), _fake_result(2, 0.85, 0.0, 0.1)]
    summary = summarize(results, config)
    assert summary["seeds_formed"] == 2 and summary["vision_seeds_formed"] == 2
    assert summary["follow_rate"] == pytest.approx(np.mean([round(0.9 * 48) / 48, 12 / 48, round(0.85 * 48) / 48]))
    assert summary["no_harm_difference"] == pytest.approx(-6 / 48 / 3)
    assert summary["no_harm_difference_ci_low"] <= summary["no_harm_difference"] <= summary["no_harm_difference_ci_high"]
    assert summary["vision_follow_rate_control"] == pytest.approx(8 / 48)
    assert set(summary["follow_rate_unseen_templates_by_tokenisation"]) == {"space", "no space"}
    assert summary["vision_ablations"]["bridge"]["reference positions zeroed"] == pytest.approx(1 / 6)
    json.dumps(summary)
    assert "formed on 2 of 3 seeds" in format_summary(summary)


def test_two_formed_seeds_are_no_claim_either_way_and_a_failed_one_is_a_failure():
    """With 2 seeds the t-multiplier is 12.7: two bridges at 88% and 72% (control 17%) get a lower bound near the
    control. That is "too few seeds", not "does NOT carry"; a seed that did not form is a failure."""
    config = ProofConfig(seeds=(0, 1), saw_deepstack=False)
    formed = verdict(summarize([_fake_result(0, 0.88, 0.0, 0.9), _fake_result(1, 0.72, 0.0, 0.75)], config))
    assert "NOT" not in formed and "no claim either way" in formed and "cannot exclude the control" in formed
    failed = verdict(summarize([_fake_result(0, 0.88, 0.0, 0.9), _fake_result(1, 0.25, 0.0, 0.9)], config))
    assert "does NOT reliably carry what only Qwen3-VL read" in failed
    many = verdict(summarize([_fake_result(s, 0.8 + 0.01 * s, 0.0, 0.8) for s in range(5)],
                             ProofConfig(seeds=tuple(range(5)), saw_deepstack=False)))
    assert "carries what only Qwen3-VL read" in many and "carries what only Qwen3-VL saw" in many


def test_one_seed_is_no_claim_either_way():
    summary = summarize([_fake_result(0, 0.95, 0.0, 0.9)], ProofConfig(seeds=(0,), saw_deepstack=False))
    text = verdict(summary)
    assert "no claim either way" in text and "NOT" not in text
    assert "one seed" in format_summary(summary)


@pytest.mark.slow
def test_proof_runs_both_tasks_on_a_small_run(tmp_path, trained_zoo):
    results, summary = run_proof(trained_zoo["qwen-image-edit-trained"], trained_zoo["qwen3-vl"], MICRO, tmp_path)
    assert len(results) == summary["seeds"] == 2 and summary["heldout_samples"] == 4
    for result in results:
        read, saw = result["read"], result["saw"]
        assert set(read["losses"]) == {"baseline", "bridge", "bridge_qwen3_shuffled", "control", "reference"}
        assert all(len(v) == 4 and np.isfinite(v).all() for v in read["losses"].values())
        for counterfactual in (read["counterfactual"], saw["counterfactual"]):
            for outcome in counterfactual.values():
                assert outcome["follow"].shape == (2, len(COLOURS)) and outcome["success"].shape == (2,)
            # without a bridge the DiT never sees the colour only Qwen3-VL read or saw: the edit cannot change
            assert not counterfactual["baseline"]["changed"].any()
        assert read["noharm"]["edit"]["follow"].shape == (2, len(COLOURS))
        assert set(read["templates"]) == set(HELDOUT_TEMPLATES)
        assert set(saw["counterfactual"]) == {"baseline", "bridge", "control", "deepstack", "reference"}
        assert {"early zeroed", "reference positions zeroed", "text positions zeroed"} <= set(saw["ablations"]["bridge"])
        assert "deepstack zeroed" in saw["ablations"]["deepstack"]
    for key in ("follow_rate", "no_harm_difference", "no_harm_difference_ci_low", "no_harm_difference_ci_high",
                "seeds_formed", "follow_rate_unseen_templates", "vision_follow_rate", "vision_follow_rate_control"):
        assert key in summary
    json.loads(json.dumps(summary))  # one JSON line
    table = format_table(results, MICRO)
    assert "saw task" in table and "unseen phrasings" in table and "no harm" in table


def test_results_survive_as_json_and_a_deepstack_bridge_on_some_seeds_only(tmp_path):
    """Each seed's result is written as it finishes (a crash in the summary lost 90 minutes of seeds once), read
    back as arrays, and the summary takes a DeepStack bridge trained on the first seeds only."""
    from bridgecore.zoo.information_proof import load_results, save_result

    results = [_fake_result(0, 0.9, 0.0, 0.8), _fake_result(1, 0.8, 0.0, 0.7)]
    results[0]["saw"]["counterfactual"]["deepstack"] = results[0]["saw"]["counterfactual"]["bridge"]
    results[0]["saw"]["ablations"]["deepstack"] = {"early zeroed": 0.5}
    for result in results:
        save_result(tmp_path / f"result-seed{result['seed']}.json", result)
    back = load_results(tmp_path, (0, 1))
    assert back[0]["read"]["noharm"]["edit"]["follow"].dtype == bool
    from bridgecore.training.trainer import json_safe

    summary = summarize(back, ProofConfig(seeds=(0, 1)))
    same = [json.dumps(json_safe(s), sort_keys=True) for s in (summary, summarize(results, ProofConfig(seeds=(0, 1))))]
    assert same[0] == same[1]
    assert summary["vision_deepstack_seeds"] == 1 and summary["vision_ablations"]["deepstack"]["early zeroed"] == 0.5
