"""Real-width, one-layer models on CPU: the GPU tests' checks (`realwidth_checks.py`) with CPU tolerances."""

import numpy as np
import pytest

from realwidth_checks import batched_and_single, edit_parity, editor_for, planned_memory, real_width_zoo

pytestmark = pytest.mark.slow  # real-width models: ~13 s for the module, most of it building them

AREA = 64 * 64


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return real_width_zoo(tmp_path_factory.mktemp("realwidth"), "cpu", layers=1, vocab_size=1024)


def test_our_edit_equals_diffusers_pipeline_at_real_width(zoo):
    ours, reference, other_seed = edit_parity(zoo, "cpu", AREA)
    assert np.isfinite(ours).all() and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)
    assert not np.array_equal(ours, other_seed)


def test_batched_equals_one_by_one_at_real_width(zoo):
    batch, singles, other_seed = batched_and_single(editor_for(zoo, "cpu", AREA), count=2)  # the GPU test runs 3
    for out, single in zip(batch, singles):
        np.testing.assert_allclose(out, single, atol=2e-2)
    assert np.abs(batch[0] - singles[0]).mean() < 0.1 * np.abs(other_seed - singles[0]).mean()


def test_planner_memory_modes_for_these_models(zoo):
    editor = editor_for(zoo, "cpu", AREA)
    from helpers import make_image

    caches = editor.extractor.extract(make_image(320, 200), "make it blue")
    modes = planned_memory(zoo, caches, (64, 96))["modes"]
    assert modes["one_model_at_a_time"]["peak_bytes"] < modes["all_resident"]["peak_bytes"]
    assert modes["one_model_at_a_time"]["peak_stage"] in ("qwen3_vl", "qwen25_vl", "denoise", "vae_decode")


def test_real_width_caches_hold_the_tokens_and_widths_the_planner_prices(zoo):
    """At 1024², a real-width extraction (real image processors, real widths; one layer) stores exactly the vision
    tokens and widths the planner reads from the real configs on `meta`, so its per-image bytes are this run's:
    the planner, given this run's text token counts, prices the stored feature tensors to the byte."""
    from dataclasses import replace

    from helpers import make_image

    from bridgecore.planning import job_cost
    from bridgecore.planning.planner import plan
    from bridgecore.zoo.real_models import load_real_config

    area = 1024 * 1024
    caches = editor_for(zoo, "cpu", area).extractor.extract(make_image(1024, 1024), "make the sky a deep blue")
    q3, q25 = caches.qwen3, caches.qwen25
    report = plan(1024, 1024, condition_area=area)
    tokens = report["tokens"]
    assert (q3.num_vision_tokens, q3.grid_thw[0, 1:].tolist()) == (tokens["qwen3_vision"], tokens["qwen3_grid"])
    assert (q25.num_vision_tokens, q25.grid_thw[0, 1:].tolist()) == (tokens["qwen25_vision"], tokens["qwen25_grid"])
    assert (q3.hidden_size, q25.hidden_size) == (report["hidden_sizes"]["qwen3"], report["hidden_sizes"]["qwen25"])
    # one layer deep, the vision tower has one DeepStack tap; the real one has a tap per index of its config
    (tap,) = q3.deepstack.values()
    assert tap.shape == (tokens["qwen3_vision"], report["hidden_sizes"]["qwen3"])
    taps = len(load_real_config("qwen3_vl")["vision_config"]["deepstack_visual_indexes"])
    # the text around the vision tokens comes from the zoo's tokenizer (not the real one): take its counts from here
    run = {**report, "tokens": {**tokens, "qwen3_sequence": q3.levels["early"].shape[0],
                                "qwen25_prompt_embeds": q25.prompt_embeds.shape[0]}}
    stored = {False: sum(t.numel() * 2 for t in [*q3.levels.values(), q25.prompt_embeds])}  # bf16, as stored
    stored[True] = stored[False] + taps * tap.numel() * 2
    for deepstack in (False, True):
        priced = job_cost._storage_gb(run, 1, branches=1, cache_dtype="native", cache_deepstack=deepstack)
        assert priced["cache_mb_per_image"] * 1e6 == pytest.approx(stored[deepstack], rel=1e-9)
    # int8 storage at the real widths (4096 channels: 32 scale groups a token), priced from the same counts
    from safetensors.torch import load

    from bridgecore.model.cache_format import cache_to_bytes

    packed = load(cache_to_bytes(caches, "int8"))
    levels = sum(t.numel() * t.element_size() for name, t in packed.items() if name.startswith(
        ("qwen3.early", "qwen3.mid", "qwen3.late")))
    assert packed["qwen3.early.scale"].shape == (q3.levels["early"].shape[0], report["hidden_sizes"]["qwen3"] // 128)
    assert levels < 0.52 * sum(t.numel() * 2 for t in q3.levels.values())  # half of bf16, plus 3% for the scales
    priced = job_cost._storage_gb(run, 1, branches=1, cache_dtype="int8")
    assert priced["cache_mb_per_image"] * 1e6 == pytest.approx(levels + q25.prompt_embeds.numel() * 2, rel=1e-9)
    # and the text is a sliver of it: the meta plan's own bytes are within 2% of this run's
    planned = job_cost._storage_gb(report, 1, branches=1)["cache_mb_per_image"] * 1e6
    assert planned == pytest.approx(stored[False], rel=0.02)
    print(f"real-width 1024² cache: {stored[False] / 1e6:.2f} MB stored, {planned / 1e6:.2f} MB planned")
