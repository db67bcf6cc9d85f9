"""The cache file is the contract between stages: round trips must be bit-exact, no pickle involved."""

import pytest
import torch
from safetensors.torch import save

from bridgecore.model.cache_format import (
    Qwen3VisionCache,
    Qwen25VisionCache,
    SampleCache,
    cache_from_bytes,
    cache_to_bytes,
    load_cache,
    save_cache,
)


def _random_cache(dtype=torch.bfloat16) -> SampleCache:
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(dtype)  # noqa: E731
    qwen3 = Qwen3VisionCache(
        levels={"early": rand(30, 16), "mid": rand(30, 16), "late": rand(30, 16)},
        deepstack={8: rand(12, 16), 16: rand(12, 16), 24: rand(12, 16)},
        input_ids=torch.arange(30), vision_positions=torch.arange(5, 17), grid_thw=torch.tensor([[1, 6, 8]]),
        layer_indices={"early": 9, "mid": 18, "late": 27}, model_id="Qwen/Qwen3-VL-8B-Instruct", revision="abc",
    )
    qwen25 = Qwen25VisionCache(
        prompt_embeds=rand(25, 8), prompt_embeds_mask=torch.ones(25, dtype=torch.long), input_ids=torch.arange(25),
        vision_positions=torch.arange(1, 13), grid_thw=torch.tensor([[1, 6, 8]]), model_id="Qwen/Qwen-Image-Edit",
        revision="def", template="edit", drop_idx=64,
    )
    return SampleCache(qwen3, qwen25, "Change the text 'Hello' to 'Goodbye'", [(640, 480)], {"key": "s1"})


def test_bf16_round_trip_is_bit_exact(tmp_path):
    cache = _random_cache()
    path = tmp_path / "c.safetensors"
    save_cache(cache, str(path))
    back = load_cache(str(path))
    for name, tensor in cache.tensors().items():
        restored = back.tensors()[name]
        assert restored.dtype == tensor.dtype
        assert torch.equal(restored.view(torch.int16) if tensor.dtype == torch.bfloat16 else restored,
                           tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor), name
    assert back.metadata() == cache.metadata()
    assert back.metadata()["dtype"] == "bfloat16"


def test_bytes_are_deterministic():
    assert cache_to_bytes(_random_cache()) == cache_to_bytes(_random_cache())


def test_foreign_safetensors_is_refused():
    with pytest.raises(ValueError, match="not a vision-bridge cache"):
        cache_from_bytes(save({"x": torch.zeros(2)}))


def test_fp8_storage_halves_the_bytes_within_a_few_percent():
    """Storage dtype fp8: the feature tensors as float8 E4M3 with one scale per token (half of bf16 plus 4 bytes a
    token), read back in the computed dtype within a few percent; ids, positions and grids stay exact."""
    from bridgecore.model.cache_format import STORAGE_DTYPES, quantize_fp8

    generator = torch.Generator().manual_seed(1)
    big = _random_cache()
    big.qwen3.levels = {k: torch.randn(600, 512, generator=generator).to(torch.bfloat16) for k in big.qwen3.levels}
    native, fp8 = cache_to_bytes(big), cache_to_bytes(big, "fp8")
    assert 0.49 < len(fp8) / len(native) < 0.53
    back = cache_from_bytes(fp8)
    assert back.metadata()["dtype"] == "bfloat16" and "fp8" in STORAGE_DTYPES
    for name, tensor in big.qwen3.levels.items():
        restored = back.qwen3.levels[name]
        assert restored.dtype == torch.bfloat16 and restored.shape == tensor.shape
        assert float((restored.float() - tensor.float()).norm() / tensor.float().norm()) < 0.04
    assert torch.equal(back.qwen3.vision_positions, big.qwen3.vision_positions)
    assert torch.equal(back.qwen25.prompt_embeds_mask, big.qwen25.prompt_embeds_mask)
    # one scale per token: a token 1000x larger than the others keeps its neighbours' precision
    skewed = torch.randn(4, 64, generator=generator)
    skewed[0] *= 1000
    quantized, scale = quantize_fp8(skewed)
    relative = ((quantized.float() * scale)[1:] - skewed[1:]).norm() / skewed[1:].norm()
    assert scale.shape == (4, 1) and float(relative) < 0.04
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        cache_to_bytes(big, "int4")


def test_int8_storage_takes_the_shared_channel_component_out_and_keeps_an_outlier_channel_in_its_group():
    """Storage dtype int8: per-channel means out, int8 per token and group of 128 channels. On hidden-state-like
    tensors (a large component every token shares, as the tiny Qwen3-VL's levels have) it is several times closer
    to the values than fp8 in the same bytes; an outlier channel costs only its own group's precision (one scale per
    token would spread it over every channel); an unknown storage dtype in a header is refused."""
    import json

    from safetensors.torch import load, save

    from bridgecore.model.cache_format import INT8_GROUP, METADATA_KEY, STORAGE_DTYPES, quantize_int8

    generator = torch.Generator().manual_seed(2)
    shared = 3 * torch.randn(1, 512, generator=generator)  # what every token has in common
    big = _random_cache()
    big.qwen3.levels = {k: (shared + torch.randn(600, 512, generator=generator)).to(torch.bfloat16)
                        for k in big.qwen3.levels}
    native, fp8, int8 = (cache_to_bytes(big, dtype) for dtype in ("native", "fp8", "int8"))
    assert "int8" in STORAGE_DTYPES and 0.49 < len(int8) / len(native) < 0.54
    back_fp8, back_int8 = cache_from_bytes(fp8), cache_from_bytes(int8)
    for name, tensor in big.qwen3.levels.items():
        restored = back_int8.qwen3.levels[name]
        assert restored.dtype == torch.bfloat16 and restored.shape == tensor.shape
        error = lambda back: float((back.float() - tensor.float()).norm() / tensor.float().norm())  # noqa: E731
        assert error(restored) < 0.01 and error(back_fp8.qwen3.levels[name]) > 3 * error(restored)
    assert torch.equal(back_int8.qwen3.input_ids, big.qwen3.input_ids)
    assert back_int8.qwen25.prompt_embeds.view(torch.int16).equal(big.qwen25.prompt_embeds.view(torch.int16))
    # an outlier channel (x1000) in the first group: the second group keeps its precision
    values = torch.randn(8, 2 * INT8_GROUP, generator=generator)
    values[:, 3] *= 1000
    quantized, scale, mean = quantize_int8(values)
    assert quantized.dtype == torch.int8 and scale.shape == (8, 2) and mean.shape == (1, 2 * INT8_GROUP)
    restored = quantized.float() * scale.repeat_interleave(INT8_GROUP, dim=-1) + mean
    second = values[:, INT8_GROUP:]
    assert float((restored[:, INT8_GROUP:] - second).norm() / second.norm()) < 0.01
    # a width that is not a multiple of the group: the last group is shorter, nothing is padded into the file
    odd = torch.randn(5, 200, generator=generator)
    quantized, scale, _ = quantize_int8(odd)
    assert quantized.shape == (5, 200) and scale.shape == (5, 2)
    tensors = load(int8)
    header = json.loads(json.loads(int8[8:8 + int.from_bytes(int8[:8], "little")])["__metadata__"][METADATA_KEY])
    header["storage_dtype"] = "int4"
    with pytest.raises(ValueError, match="storage dtype 'int4' is not supported"):
        cache_from_bytes(save(tensors, metadata={METADATA_KEY: json.dumps(header)}))
