"""Qwen-Image-2.1, the native arm: cached conditioning equals diffusers' own `encode_prompt`, and an edit
from the cache equals the pipeline's own call."""

import numpy as np
import pytest
import torch
from conftest import make_image

from bridgecore.native21 import NativeQwenImage21, condition_images

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
