"""Qwen-Image-2.1, the native arm: cached conditioning equals diffusers' own `encode_prompt`, and an edit
from the cache equals the pipeline's own call."""

import json

import numpy as np
import pytest
import torch
from helpers import LOADED, make_image

from bridgecore.model.native21 import NativeQwenImage21, condition_images

AREA = 64 * 64
STEPS = 2


@pytest.fixture(scope="module")
def native(tiny_zoo):
    return NativeQwenImage21(str(tiny_zoo["qwen-image-2.1"]), device="cpu", condition_area=AREA)


@pytest.fixture(scope="module")
def plain(tiny_zoo):
    from diffusers import QwenImage21Pipeline

    pipe = QwenImage21Pipeline.from_pretrained(tiny_zoo["qwen-image-2.1"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("count", [1, 2])
def test_cached_conditioning_equals_diffusers_encode_prompt(native, plain, count):
    images = [make_image(200, 120, i) for i in range(count)]
    prompt = "Change the text 'OPEN' to 'CLOSED' and keep the rest"
    cached = native.encode(images, prompt)
    embeds, mask, image_pad = plain.encode_prompt(prompt, image=condition_images(images, native.resolution))
    assert mask is None  # one prompt: no padding, diffusers drops the all-ones mask
    torch.testing.assert_close(cached["qwen21.prompt_embeds"], embeds[0], atol=1e-5, rtol=0)
    assert torch.equal(cached["qwen21.image_pad_mask"], image_pad[0].bool())
    assert cached["qwen21.prompt_embeds_mask"].all()
    slots = int(cached["qwen21.image_pad_mask"].sum())
    assert slots == count * (96 // 32) * (64 // 32)  # one slot per 32x32 px of each 96x64 condition image
    # the pre-norm hidden state, not the normed one transformers 5 returns as hidden_states[-1]
    normed = plain.text_encoder.model.language_model.norm(embeds[0])
    assert not torch.allclose(normed, cached["qwen21.prompt_embeds"], atol=1e-2)


def test_edit_from_cache_equals_the_pipelines_own_call(native, plain):
    images, prompt = [make_image(200, 120, 3)], "make the circle blue"
    ours = native.generate(images, prompt, seed=4, steps=STEPS, output_type="np")
    expected = plain(prompt=prompt, image=images, num_inference_steps=STEPS, output_resolution=native.resolution,
                     generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    assert ours.shape == expected.shape == (64, 96, 4)  # 2.1 decodes RGBA
    np.testing.assert_array_equal(ours, expected)
    other = native.generate(images, "make the square red", seed=4, steps=STEPS, output_type="np")
    assert not np.array_equal(ours, other)  # the conditioning reaches the DiT


def test_edit_never_loads_the_text_encoder(tiny_zoo):
    native = NativeQwenImage21(str(tiny_zoo["qwen-image-2.1"]), device="cpu", condition_area=AREA)
    images = [make_image()]
    conditioning = native.encode(images, "x")
    native.unload_encoder()
    native.edit(images, conditioning, seed=0, steps=STEPS)
    assert not native._encoder.loaded and native._pipe.get().text_encoder is None
    with pytest.raises(ValueError, match="different set of images"):
        native.edit(images * 2, conditioning, seed=0, steps=STEPS)


def test_native_arm_through_the_stage_pipeline(tmp_path, tiny_zoo):
    """bulk-edit with Qwen-Image-2.1 beside an Edit run in one OUTPUT: its own stages, cached conditioning equal
    to the encoder's, edits equal to the pipeline's own call, and a second run that reruns only what changed."""
    from dataclasses import replace

    from PIL import Image
    from safetensors.torch import load as load_tensors
    from helpers import make_inputs, run_all

    from bridgecore.batch.fingerprints import fingerprints
    from bridgecore.batch.pipelines import STAGES
    from bridgecore.batch.settings import JobSettings
    from bridgecore.batch.stages.common import sample_seed
    from bridgecore.storage import Storage

    manifest, out = make_inputs(tmp_path / "in", n=3), str(tmp_path / "out")
    edit = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=AREA, steps=STEPS)
    native = replace(edit, edit_model=str(tiny_zoo["qwen-image-2.1"]))
    run_all(manifest, out, edit)
    assert set(fingerprints("bulk-edit", native)) == {"qwen21-caches", "qwen21-edits", "metrics"}
    before = LOADED.counts
    summary = run_all(manifest, out, native)
    after = LOADED.counts
    assert summary["counts"] == {"done": 3, "failed": 6, "pending": 0}
    assert after["qwen21_encodes"] - before["qwen21_encodes"] == 3
    assert after["vlm_forwards"] == before["vlm_forwards"]  # the bridge's VLMs do not run for the native arm

    prints = fingerprints("bulk-edit", native)
    storage = Storage(out)
    reference = NativeQwenImage21(str(tiny_zoo["qwen-image-2.1"]), device="cpu", condition_area=AREA)
    done = [row for row in summary_rows(out) if row["status"] == "done"]
    for row in done[:2]:
        contents = STAGES["qwen21-caches"].store(storage, prints["qwen21-caches"]).read(row["shard"])
        cached = load_tensors(contents.payloads[row["id"]]["safetensors"])
        sample = next(s for s in load_samples(storage, row["shard"]) if s.id == row["id"])
        images = [Image.open(uri).convert("RGB") for uri in sample.images]
        expected = reference.encode(images, sample.instruction)
        for key, value in expected.items():
            torch.testing.assert_close(cached[key], value, atol=1e-5, rtol=0)
        edited = np.asarray(Image.open(row["output"]))
        own = reference.generate(images, sample.instruction, seed=sample_seed(native.seed, sample.id), steps=STEPS)
        np.testing.assert_array_equal(edited, np.asarray(own))
        assert row["metrics"] and "psnr_vs_source" in json.loads(row["metrics"])

    def delta(settings):
        before = LOADED.counts
        run_all(manifest, out, settings)
        after = LOADED.counts
        return {key: after[key] - before[key] for key in ("qwen21_encodes", "qwen21_edits", "vlm_forwards")}

    assert delta(native) == {"qwen21_encodes": 0, "qwen21_edits": 0, "vlm_forwards": 0}
    assert delta(replace(native, steps=3)) == {"qwen21_encodes": 0, "qwen21_edits": 3, "vlm_forwards": 0}
    assert delta(edit) == {"qwen21_encodes": 0, "qwen21_edits": 0, "vlm_forwards": 0}  # the Edit arm is untouched


def summary_rows(out):
    import pyarrow.parquet as pq

    return pq.read_table(f"{out}/summary.parquet").to_pylist()


def load_samples(storage, shard):
    from bridgecore.batch.sharding import load_plan

    return load_plan(storage, shard)


def test_native_arm_refuses_what_it_cannot_do(tiny_zoo, tmp_path):
    from dataclasses import replace

    from bridgecore.batch.job_plan import plan_job
    from bridgecore.batch.settings import JobSettings

    edit = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=AREA)
    native = replace(edit, edit_model=str(tiny_zoo["qwen-image-2.1"]))
    with pytest.raises(ValueError, match="is a qwen-image-edit pipeline"):
        replace(edit, editor="qwen-image-2.1").check_editor()
    with pytest.raises(ValueError, match="runs without bridge, cfg"):
        replace(native, bridge="somewhere", cfg=4.0).check_editor()
    with pytest.raises(ValueError, match="editor must be one of"):
        replace(native, editor="qwen-image-3")
    with pytest.raises(ValueError, match="no bridge to train"):
        plan_job(str(tmp_path), str(tmp_path / "out"), native, "training-data")
    replace(native, editor="qwen-image-2.1").check_editor()  # named and matching: fine


def test_two_condition_images_equal_the_pipelines_own_call(native, plain):
    """Our preprocessing of several images against `__call__`'s own (not against itself)."""
    images, prompt = [make_image(200, 120, 1), make_image(120, 200, 2)], "put the circle of picture 2 in picture 1"
    ours = native.generate(images, prompt, seed=1, steps=STEPS, output_type="np")
    expected = plain(prompt=prompt, image=images, num_inference_steps=STEPS, output_resolution=native.resolution,
                     generator=torch.Generator().manual_seed(1), output_type="np").images[0]
    np.testing.assert_array_equal(ours, expected)


def test_condition_area_below_the_processor_floor_is_refused(tiny_zoo, tmp_path):
    """Below the processor's floor the encoder would see an upscaled image while the VAE sees the small one."""
    import json as _json
    import shutil
    from dataclasses import replace

    from bridgecore.batch.settings import JobSettings
    from bridgecore.model.native21 import min_condition_area

    model = tmp_path / "qwen-image-2.1"
    shutil.copytree(tiny_zoo["qwen-image-2.1"], model)
    config_file = model / "processor" / "processor_config.json"
    config = _json.loads(config_file.read_text())
    config["image_processor"]["size"]["shortest_edge"] = 256 * 256  # the real Qwen3-VL processor's floor
    config_file.write_text(_json.dumps(config))
    assert min_condition_area(str(model)) == 256 * 256
    settings = JobSettings(str(tiny_zoo["qwen3-vl"]), str(model), condition_area=AREA)
    with pytest.raises(ValueError, match="below Qwen-Image-2.1's processor floor"):
        settings.check_editor()
    replace(settings, condition_area=256 * 256).check_editor()
    native = NativeQwenImage21(str(model), device="cpu", condition_area=AREA)
    with pytest.raises(ValueError, match="processor floor of 65536 pixels"):
        native.encode([make_image()], "x")
