"""The main job's page pieces: the tiny bridge is trained once and cached like the tiny edit model (retrained when
its recipe changes), and the mechanism demonstration decodes redacted-colour edits and writes the page."""

import json

import pytest

from bridgecore.zoo.tiny_bridge import TinyBridgeRecipe
from bridgecore.zoo.tiny_edit_model import TEST_RECIPE
from bridgecore.zoo.tiny_zoo import TINY_BRIDGE, TINY_REFERENCE_BRIDGE, build_tiny_zoo

pytestmark = pytest.mark.slow  # trains the tiny edit model (test recipe) and a tiny bridge

MICRO = TinyBridgeRecipe(train_samples=8, heldout_samples=8, steps=4)
MICRO_SAW = TinyBridgeRecipe(task="saw", train_samples=8, heldout_samples=8, steps=3)


@pytest.fixture(scope="module")
def bridged_zoo(trained_zoo):
    root = trained_zoo["qwen3-vl"].parent
    return build_tiny_zoo(root, trained=True, trained_recipe=TEST_RECIPE, bridge=True, bridge_recipe=MICRO,
                          reference_bridge=True, reference_recipe=MICRO_SAW)


def test_tiny_bridge_is_cached_and_retrained_only_when_its_recipe_changes(bridged_zoo):
    from bridgecore.model.bridge import VisionCacheBridge

    path = bridged_zoo[TINY_BRIDGE]
    bridge = VisionCacheBridge.from_pretrained(path)
    assert bridge.config.mode == "both" and bridge.config.num_tokens == 1
    report = json.loads((path / "tiny_bridge_report.json").read_text())
    assert report["recipe"]["steps"] == 4 and set(report["heldout_loss_level_zeroed"]) == {"early", "mid", "late"}
    assert report["recipe"]["full_share"] == 0.5 and report["recipe"]["no_harm_from"] == 0.5  # two phases
    saw = VisionCacheBridge.from_pretrained(bridged_zoo[TINY_REFERENCE_BRIDGE])
    assert saw.config.reference_images == 1 and bridge.config.reference_images == 0
    assert not list(path.glob("step_*"))
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    root = path.parent
    build_tiny_zoo(root, trained=True, trained_recipe=TEST_RECIPE, bridge=True, bridge_recipe=MICRO)  # second run
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    changed = TinyBridgeRecipe(train_samples=8, heldout_samples=8, steps=6)
    build_tiny_zoo(root, trained=True, trained_recipe=TEST_RECIPE, bridge=True, bridge_recipe=changed)
    assert json.loads((path / "tiny_bridge_report.json").read_text())["recipe"]["steps"] == 6
    build_tiny_zoo(root, trained=True, trained_recipe=TEST_RECIPE, bridge=True, bridge_recipe=MICRO)  # back, for others


def test_mechanism_demonstration_and_page(tmp_path, bridged_zoo):
    from bridgecore.zoo.demo_page import mechanism_demo, scores_table, vision_demo, write_page

    grid, numbers = mechanism_demo(bridged_zoo["qwen-image-edit-trained"], bridged_zoo["qwen3-vl"],
                                   bridged_zoo[TINY_BRIDGE], images=2, steps=2)
    vision = vision_demo(bridged_zoo["qwen-image-edit-trained"], bridged_zoo["qwen3-vl"],
                         bridged_zoo[TINY_REFERENCE_BRIDGE], images=2, steps=2)
    assert vision[1]["edits_per_condition"] == 12 and vision[1]["baseline"] == pytest.approx(1 / 6)
    assert {"success_edit_full", "success_bridge_full", "bridge_full"} <= set(numbers)
    scores = scores_table({"Edit": ("run-a", {"edit_success": 0.5}), "Edit+bridge": ("run-b", {"edit_success": 0.75})})
    assert "0.750" in scores and "Edit+bridge" in scores
    assert numbers["edits_per_condition"] == 12 and set(numbers) >= {"baseline", "bridge", "reference"}
    # Without a bridge the DiT never sees the colour Qwen3-VL read: one edit per picture whatever the word, so exactly
    # one colour in six "matches" it.
    assert numbers["baseline"] == pytest.approx(1 / 6)
    assert grid.width >= 5 * 128 and grid.height > 2 * 128
    page = write_page(tmp_path / "page", None, grid, numbers, ["TINY OFFLINE DEMONSTRATION"], scores=scores,
                      vision=vision)
    text = page.read_text()
    assert (tmp_path / "page" / "vision.png").exists() and "only Qwen3-VL saw" in text and "No harm" in text
    assert (tmp_path / "page" / "mechanism.png").exists() and "mechanism.png" in text
    assert "TINY OFFLINE DEMONSTRATION" in text and f"{numbers['bridge']:.0%}" in text
