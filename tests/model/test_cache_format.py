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
