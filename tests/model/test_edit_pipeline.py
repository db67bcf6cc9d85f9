"""EnhancedQwenImageEdit: baseline == plain diffusers pipeline, untrained bridge == baseline, batching."""

import numpy as np
import pytest
import torch
from helpers import make_image

from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit, call_with_areas
from bridgecore.model.loading import LoadOptions, load_edit_pipeline, resolve_model

AREA = 64 * 64
STEPS = 2


@pytest.fixture(scope="module")
def editor(tiny_zoo):
    return EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA)


def test_baseline_equals_plain_diffusers_pipeline(editor, tiny_zoo):
    image, prompt = make_image(), "make it blue"
    ours = editor.generate(image, prompt, use_qwen3_vision=False, seed=3, num_inference_steps=STEPS, output_type="np")
    plain = load_edit_pipeline(resolve_model(tiny_zoo["qwen-image-edit"]), LoadOptions(device="cpu"))
    embeds, mask, _ = editor.encode([[image]], [prompt], use_qwen3_vision=False)
    expected = call_with_areas(plain, AREA, AREA,
                               image=image, prompt_embeds=embeds, prompt_embeds_mask=mask, num_inference_steps=STEPS,
                               true_cfg_scale=1.0, generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert ours.shape == expected.shape == (64, 96, 3)  # 64*64 area at 5:3, multiples of 32
    np.testing.assert_array_equal(ours, expected)


def test_the_condition_area_is_a_parameter_not_a_patched_module_function(editor):
    """The area reaches diffusers' call without touching its module: during the call (seen from its step
    callback) the module's `calculate_dimensions` is diffusers' own, and the output has our area's size."""
    import sys

    module = sys.modules[type(editor.pipe).__module__]
    original, seen = module.calculate_dimensions, []

    def callback(pipe, step, timestep, kwargs):
        seen.append(module.calculate_dimensions is original)
        return {}

    embeds, mask, _ = editor.encode([[make_image()]], ["make it blue"], use_qwen3_vision=False)
    image = call_with_areas(editor.pipe, AREA, AREA, image=make_image(), prompt_embeds=embeds, prompt_embeds_mask=mask,
                            num_inference_steps=STEPS, true_cfg_scale=1.0, output_type="np",
                            callback_on_step_end=callback).images[0]
    assert seen == [True] * STEPS and image.shape == (64, 96, 3)
    assert module.calculate_dimensions is original


def test_untrained_bridge_output_equals_baseline(editor):
    image, prompt = make_image(180, 120, 1), "move the circle left"
    baseline = editor.generate(image, prompt, use_qwen3_vision=False, seed=1, num_inference_steps=STEPS, output_type="np")
    enhanced = editor.generate(image, prompt, use_qwen3_vision=True, seed=1, num_inference_steps=STEPS, output_type="np")
    np.testing.assert_array_equal(baseline, enhanced)


def test_true_cfg_with_negative_prompt_changes_the_output(editor):
    image = make_image()
    plain = editor.generate(image, "make it blue", seed=0, num_inference_steps=STEPS, output_type="np")
    guided = editor.generate(image, "make it blue", seed=0, num_inference_steps=STEPS, output_type="np",
                             negative_prompt="blurry", true_cfg_scale=4.0)
    assert not np.array_equal(plain, guided)


def test_batched_edits_equal_one_by_one(editor):
    images = [make_image(200, 120, 0), make_image(200, 120, 1), make_image(120, 200, 2)]
    prompts = ["make it blue", "a longer instruction to change the padding", "add a hat"]
    batch = editor.generate(images, prompts, seed=[5, 6, 7], num_inference_steps=STEPS, output_type="np")
    for image, prompt, seed, out in zip(images, prompts, [5, 6, 7], batch):
        single = editor.generate(image, prompt, seed=seed, num_inference_steps=STEPS, output_type="np")
        np.testing.assert_allclose(out, single, atol=2e-3)


def test_multi_image_on_single_image_pipeline_is_refused(editor):
    with pytest.raises(ValueError, match="one image per sample"):
        editor.generate([[make_image(), make_image()]], ["x"], num_inference_steps=STEPS)


def test_edit_plus_multi_image(tiny_zoo):
    editor = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit-plus"], tiny_zoo["qwen3-vl"], condition_area=AREA,
                                   plus_condition_area=AREA, one_model_at_a_time=True)
    out = editor.generate([make_image(), make_image(120, 200, 1)], "combine", num_inference_steps=STEPS, output_type="np")
    assert out.ndim == 3 and np.isfinite(out).all()
    assert not editor.extractor._qwen3.loaded and not editor._pipe.loaded  # one model at a time


def test_compare_writes_a_labelled_grid(editor, tmp_path):
    from PIL import Image

    path = tmp_path / "grid.png"
    baseline, enhanced, maps = editor.compare(make_image(), "make it blue", num_inference_steps=STEPS,
                                              save_comparison=path)
    grid = Image.open(path)
    assert grid.height == 256 + 20
    assert grid.width == sum(round(w * 256 / h) for w, h in [(200, 120), baseline.size, enhanced.size, (96, 64)])
    assert maps[0] == {}  # no checkpoint: no bridge, nothing computed (the overlay is the plain picture)


def test_benchmark_writes_outputs_and_stage_timings(editor, tmp_path):
    import pyarrow.parquet as pq

    rows = editor.benchmark([make_image(), make_image(120, 200, 1)], ["make it blue", "add a hat"], tmp_path / "bench",
                            num_inference_steps=STEPS)
    table = pq.read_table(tmp_path / "bench" / "summary.parquet").to_pylist()
    assert table == rows and len(rows) == 2
    for row in rows:
        stages = [row[f"{s}_s"] for s in ("qwen25_encode", "qwen3_encode", "bridge", "denoise", "decode")]
        assert all(value > 0 for value in stages)
        assert abs(row["total_s"] - sum(stages)) < 1e-9
        assert (tmp_path / "bench" / f"{row['index']:05d}.png").exists() and row["peak_memory_mib"] > 0
    # the benchmarked image is the same edit generate() makes
    import numpy as np
    from PIL import Image

    again = editor.generate(make_image(), "make it blue", seed=0, num_inference_steps=STEPS)
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(rows[0]["output"])))


def test_condition_area_per_call(editor):
    small = editor.generate(make_image(), "make it blue", num_inference_steps=STEPS, output_type="np")
    larger = editor.generate(make_image(), "make it blue", num_inference_steps=STEPS, output_type="np",
                             condition_area=96 * 96)
    assert small.shape == (64, 96, 3) and larger.shape == (64, 128, 3)  # 96*96 at 5:3 rounds to 128x64
    assert editor.condition_area == AREA  # restored after the call


def test_true_cfg_bridges_only_the_conditional_branch(tiny_zoo):
    """With true CFG the positive prompt goes through the (open) bridge, the negative prompt does not: it gets
    exactly Qwen-Image-Edit's own embeddings (no correction, no appended tokens), which is what the DiT was trained
    with as its negative; CFG then amplifies what the bridge adds instead of cancelling it."""
    from bridgecore.model.bridge import BridgeConfig, VisionCacheBridge

    image, prompt, negative = make_image(), "make it blue", "blurry"
    plain = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA)
    cache = plain.extractor.extract(image, prompt)
    bridge = VisionCacheBridge(BridgeConfig.from_caches(cache.qwen3, cache.qwen25, mode="both", num_tokens=2))
    with torch.no_grad():
        bridge.gate.fill_(1.0)
    editor = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], bridge=bridge, condition_area=AREA)
    captured = {}
    denoise = editor.denoise

    def spy(samples, embeds, mask, seeds, steps, cfg, negative_pair, output_type):
        captured.update(embeds=embeds, negative=negative_pair, cfg=cfg)
        return denoise(samples, embeds, mask, seeds, steps, cfg, negative_pair, output_type)

    editor.denoise = spy
    guided = editor.generate(image, prompt, negative_prompt=negative, true_cfg_scale=4.0, num_inference_steps=STEPS,
                             output_type="np")
    assert captured["cfg"] == 4.0 and np.isfinite(guided).all()
    plain_negative, plain_negative_mask, _ = plain.encode([[image]], [negative], use_qwen3_vision=False)
    assert torch.equal(captured["negative"][0], plain_negative)
    assert torch.equal(captured["negative"][1], plain_negative_mask)
    torch.testing.assert_close(captured["embeds"], bridge(cache.qwen3, cache.qwen25).prompt_embeds)
    assert captured["embeds"].shape[1] == cache.qwen25.prompt_embeds.shape[0] + 2  # the tokens: positive branch only
    assert not torch.equal(captured["embeds"], plain.encode([[image]], [prompt], use_qwen3_vision=False)[0])


def test_edit_2511_equals_diffusers_plus_pipeline(tmp_path):
    """Qwen-Image-Edit-2511 runs on the Plus pipeline with a DiT that modulates condition tokens at t = 0
    (`zero_cond_t`): ours equals diffusers' own call on a tiny pipeline configured like it, several images."""
    import json

    from bridgecore.zoo.tiny_zoo import build_edit_pipeline, build_qwen3_vl

    model = build_edit_pipeline(tmp_path / "edit-2511", like_2511=True)
    assert json.loads((model / "transformer" / "config.json").read_text())["zero_cond_t"] is True
    editor = EnhancedQwenImageEdit(model, build_qwen3_vl(tmp_path / "qwen3"), condition_area=AREA,
                                   plus_condition_area=AREA)
    assert editor.plus
    images, prompt = [make_image(), make_image(120, 200, 1)], "put the circle of picture 2 into picture 1"
    ours = editor.generate(images, prompt, use_qwen3_vision=False, seed=2, num_inference_steps=STEPS, output_type="np")
    plain = load_edit_pipeline(resolve_model(model), LoadOptions(device="cpu"))
    embeds, mask, _ = editor.encode([images], [prompt], use_qwen3_vision=False)
    expected = call_with_areas(plain, AREA, AREA,
                               image=images, prompt_embeds=embeds, prompt_embeds_mask=mask, num_inference_steps=STEPS,
                               true_cfg_scale=1.0, generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    np.testing.assert_array_equal(ours, expected)
    # zero_cond_t is not a no-op: the same weights without it give another picture
    plain.transformer.zero_cond_t = False
    other = call_with_areas(plain, AREA, AREA,
                            image=images, prompt_embeds=embeds, prompt_embeds_mask=mask, num_inference_steps=STEPS,
                            true_cfg_scale=1.0, generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    assert not np.array_equal(other, expected)
