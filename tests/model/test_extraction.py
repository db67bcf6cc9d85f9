"""Extraction parity: Qwen-Image-Edit embeddings with M-RoPE, Qwen3-VL levels and DeepStack, batching."""

import pytest
import torch
from helpers import SMALL_AREA, make_image

from bridgecore.model.edit_prompt import EDIT_PLUS_TEMPLATE, EDIT_TEMPLATE, resize_for_condition, system_prefix_length
from bridgecore.model.loading import LoadOptions, load_edit_pipeline, resolve_model
from bridgecore.planning.planner import vision_grid

PROMPT = "Change the text 'Hello' to 'Goodbye'"


@pytest.fixture(scope="module")
def pipe(tiny_zoo):
    return load_edit_pipeline(resolve_model(tiny_zoo["qwen-image-edit"]), LoadOptions(device="cpu"))


def _independent_inputs(pipe, image, prompt):
    resized = resize_for_condition(image, SMALL_AREA)
    return pipe.processor(text=[pipe.prompt_template_encode.format(prompt)], images=[resized], padding=True,
                          return_tensors="pt")


def test_templates_are_the_pipelines_own(pipe, tiny_zoo):
    from bridgecore.model.loading import load_edit_pipeline

    assert pipe.prompt_template_encode == EDIT_TEMPLATE
    plus = load_edit_pipeline(resolve_model(tiny_zoo["qwen-image-edit-plus"]))
    assert plus.prompt_template_encode == EDIT_PLUS_TEMPLATE


def test_drop_idx_is_derived_from_the_tokenizer(pipe, extractor):
    """The drop covers exactly the system prompt: the first kept token is the image start."""
    ids = _independent_inputs(pipe, make_image(), PROMPT)["input_ids"][0]
    vision_start = pipe.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    drop = system_prefix_length(pipe.tokenizer)
    assert drop == int(torch.nonzero(ids == vision_start)[0])
    assert drop != 64  # the real tokenizer's value would be wrong for the tiny one
    cache = extractor.extract_qwen25_vision(make_image(), PROMPT)
    assert cache.drop_idx == drop and int(cache.input_ids[0]) == vision_start


def test_qwen25_embeddings_match_independent_mrope_computation(pipe, extractor):
    image = make_image()
    inputs = _independent_inputs(pipe, image, PROMPT)
    with torch.no_grad():
        hidden = pipe.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1][0]
    drop = system_prefix_length(pipe.tokenizer)
    cache = extractor.extract_qwen25_vision(image, PROMPT)
    assert cache.prompt_embeds.shape == hidden[drop:].shape
    torch.testing.assert_close(cache.prompt_embeds, hidden[drop:], rtol=1e-5, atol=1e-5)
    assert cache.vision_positions.numel() == int(inputs["image_grid_thw"].prod() // 4)


def test_multimodal_rope_is_really_used(pipe, extractor):
    """diffusers' own encode_prompt (no mm_token_type_ids) differs; it equals a forward without M-RoPE."""
    image = make_image()
    pipe.prompt_template_encode_start_idx = system_prefix_length(pipe.tokenizer)
    resized = resize_for_condition(image, SMALL_AREA)
    with torch.no_grad():
        diffusers_embeds, _ = pipe.encode_prompt(PROMPT, image=resized, device=torch.device("cpu"))
        inputs = _independent_inputs(pipe, image, PROMPT)
        inputs.pop("mm_token_type_ids")
        no_mrope = pipe.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1][0]
    ours = extractor.extract_qwen25_vision(image, PROMPT).prompt_embeds
    torch.testing.assert_close(diffusers_embeds[0], no_mrope[pipe.prompt_template_encode_start_idx:])
    assert (ours - diffusers_embeds[0]).abs().max() > 1e-3


def test_qwen3_levels_and_deepstack_match_the_model(extractor):
    image = make_image()
    cache = extractor.extract_qwen3_vision(image, PROMPT)
    handle = extractor._qwen3.get()
    model, processor = handle.model, handle.processor
    resized = resize_for_condition(image, SMALL_AREA)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[resized], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True)
        vision = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert len(outputs.hidden_states) == model.config.text_config.num_hidden_layers + 1
    for name, index in cache.layer_indices.items():
        torch.testing.assert_close(cache.levels[name], outputs.hidden_states[index][0])
    assert sorted(cache.deepstack) == list(model.config.vision_config.deepstack_visual_indexes)
    for feats, expected in zip(cache.deepstack.values(), vision.deepstack_features):
        torch.testing.assert_close(feats, torch.cat(expected))
    assert cache.layer_indices == {"early": 1, "mid": 2, "late": 3}


@pytest.mark.parametrize("size", [(64, 64), (200, 120), (90, 300), (517, 203)])
def test_token_counts_follow_both_resize_formulas(extractor, size):
    cache = extractor.extract(make_image(*size), PROMPT)
    q25_proc = extractor.qwen25_encoder.processor.image_processor
    q3_proc = extractor._qwen3.get().processor.image_processor
    resized = resize_for_condition(make_image(*size), SMALL_AREA)
    g25 = vision_grid(resized.height, resized.width, 14, 2, q25_proc.size["shortest_edge"], q25_proc.size["longest_edge"])
    g3 = vision_grid(resized.height, resized.width, 16, 2, q3_proc.size["shortest_edge"], q3_proc.size["longest_edge"])
    assert cache.qwen25.num_vision_tokens == g25[0] * g25[1] // 4
    assert cache.qwen3.num_vision_tokens == g3[0] * g3[1] // 4
    assert cache.qwen25.grid_thw.tolist() == [[1, *g25]]
    assert cache.qwen3.grid_thw.tolist() == [[1, *g3]]


def test_batch_equals_one_by_one(extractor):
    images = [make_image(200, 120, 0), make_image(96, 160, 1), make_image(150, 150, 2)]
    prompts = ["make it blue", "a much longer instruction that pads the other samples a lot", ""]
    batch = extractor.extract(images, prompts)
    for image, prompt, cached in zip(images, prompts, batch):
        single = extractor.extract(image, prompt)
        torch.testing.assert_close(cached.qwen25.prompt_embeds, single.qwen25.prompt_embeds, rtol=1e-4, atol=1e-5)
        assert torch.equal(cached.qwen25.vision_positions, single.qwen25.vision_positions)
        for name in single.qwen3.levels:
            torch.testing.assert_close(cached.qwen3.levels[name], single.qwen3.levels[name], rtol=1e-4, atol=1e-5)
        for index in single.qwen3.deepstack:
            torch.testing.assert_close(cached.qwen3.deepstack[index], single.qwen3.deepstack[index])


def test_empty_and_very_long_prompts_behave_as_the_pipeline(pipe, extractor):
    long_prompt = "make the sky a deep blue " * 300
    for prompt in ("", long_prompt):
        ids = _independent_inputs(pipe, make_image(), prompt)["input_ids"][0]
        cache = extractor.extract_qwen25_vision(make_image(), prompt)
        assert cache.prompt_embeds.shape[0] == len(ids) - cache.drop_idx  # no truncation, nothing added


def test_edit_plus_template_with_several_images(plus_extractor):
    images = [make_image(200, 120, 0), make_image(120, 200, 1)]
    cache = plus_extractor.extract(images, "put the circle of picture 2 into picture 1")
    tokenizer = plus_extractor.qwen25_encoder.processor.tokenizer
    text = tokenizer.decode(cache.qwen25.input_ids)
    assert text.startswith("Picture 1: <|vision_start|>") and "Picture 2: <|vision_start|>" in text
    assert cache.qwen25.grid_thw.shape == (2, 3) and cache.qwen3.grid_thw.shape == (2, 3)
    assert cache.qwen25.num_vision_tokens == int(cache.qwen25.grid_thw.prod(-1).sum() // 4)
    assert cache.qwen3.num_vision_tokens == int(cache.qwen3.grid_thw.prod(-1).sum() // 4)
    assert all(t.shape[0] == cache.qwen3.num_vision_tokens for t in cache.qwen3.deepstack.values())


def test_edit_plus_batch_equals_one_by_one(plus_extractor):
    samples = [[make_image(200, 120, 0), make_image(120, 200, 1)], [make_image(90, 90, 2)]]
    prompts = ["combine them", "make it red"]
    batch = plus_extractor.extract(samples, prompts)
    for sample, prompt, cached in zip(samples, prompts, batch):
        single = plus_extractor.extract(sample, prompt)
        torch.testing.assert_close(cached.qwen25.prompt_embeds, single.qwen25.prompt_embeds, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached.qwen3.levels["late"], single.qwen3.levels["late"], rtol=1e-4, atol=1e-5)


def test_multi_image_on_single_image_pipeline_is_refused(extractor):
    with pytest.raises(ValueError, match="exactly one image per sample"):
        extractor.extract([make_image(), make_image()], PROMPT)


def test_compare_caches_reports_the_mismatch(extractor):
    cache = extractor.extract(make_image(512, 512), PROMPT)
    report = extractor.compare_caches(cache.qwen3, cache.qwen25)
    assert report["dimension_mismatch"] and report["dimension_ratio"] == 2.0
    assert report["qwen3"]["vision_tokens"] == cache.qwen3.num_vision_tokens
    assert set(report["qwen3"]["levels"]) == {"early", "mid", "late"}


def test_unload_frees_and_reloads(tiny_zoo):
    import gc
    import weakref

    from bridgecore.model.extraction import VisionCacheExtractor

    extractor = VisionCacheExtractor(tiny_zoo["qwen3-vl"], tiny_zoo["qwen-image-edit"], condition_area=SMALL_AREA)
    assert not extractor._qwen3.loaded  # lazy
    first = extractor.extract_qwen3_vision(make_image(), PROMPT)
    model_ref = weakref.ref(extractor._qwen3.get().model)
    extractor.unload()
    gc.collect()
    assert model_ref() is None and not extractor._qwen3.loaded
    second = extractor.extract_qwen3_vision(make_image(), PROMPT)
    assert torch.equal(first.levels["late"], second.levels["late"]) and extractor._qwen3.load_count == 2


def test_a_smaller_qwen3_view_gives_fewer_tokens_and_still_fits_the_bridge(tiny_zoo):
    """`qwen3_area`: Qwen3-VL sees the condition image smaller than Qwen2.5-VL does (smaller caches, cheaper
    extraction); both caches still belong to one condition picture and the bridge resamples the smaller grid."""
    from helpers import make_image

    from bridgecore.model.bridge import create_default_bridge
    from bridgecore.model.extraction import VisionCacheExtractor

    image = make_image(640, 480)
    full = VisionCacheExtractor(tiny_zoo["qwen3-vl"], tiny_zoo["qwen-image-edit"], condition_area=512 * 512)
    small = VisionCacheExtractor(tiny_zoo["qwen3-vl"], tiny_zoo["qwen-image-edit"], condition_area=512 * 512,
                                 qwen3_area=256 * 256)
    big, little = full.extract(image, "make it blue"), small.extract(image, "make it blue")
    assert little.qwen3.num_vision_tokens < big.qwen3.num_vision_tokens
    assert little.qwen25.num_vision_tokens == big.qwen25.num_vision_tokens  # the DiT's encoder sees the same
    assert little.qwen3.image_digest == little.qwen25.image_digest == big.qwen25.image_digest
    bridge = create_default_bridge(little.qwen3, little.qwen25, rank=16)
    out = bridge(little.qwen3, little.qwen25)
    assert out.prompt_embeds.shape[1] == little.qwen25.prompt_embeds.shape[0] + bridge.config.appended_tokens
