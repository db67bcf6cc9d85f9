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
