"""CUDA tests on real-width, two-layer models in bf16 (`pytest -m gpu`; skipped without a CUDA device).

The checks are the functions of `realwidth_checks.py`, which `test_realwidth.py` also runs on CPU.
"""

import importlib.util

import numpy as np
import pytest
import torch
from helpers import make_image

from realwidth_checks import (
    PROMPT,
    batched_and_single,
    edit_parity,
    editor_for,
    embedding_cosine,
    planned_memory,
    real_width_zoo,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

AREA = 512 * 512
LAYERS = 2
GIB = 2**30


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    # Built straight on the GPU in bf16 at real widths, saved, then loaded by every test. The vocabularies are cut to
    # 16k rows (the offline tokenizer uses ~600): only the embedding tables shrink, 4.5 GB less to write and read.
    return real_width_zoo(tmp_path_factory.mktemp("realwidth-gpu"), "cuda", layers=LAYERS, vocab_size=16384)


def _images_close(ours: np.ndarray, reference: np.ndarray, unrelated: float) -> None:
    assert np.isfinite(ours).all() and np.isfinite(reference).all()
    diff = np.abs(ours - reference)
    # bf16: rounding differs (batched vs one-by-one on CPU: mean 1.5e-3 against 0.08 between seeds), never by a
    # tenth of the difference between two seeds
    assert diff.mean() < 0.1 * unrelated and diff.max() < 0.25, (diff.mean(), diff.max(), unrelated)


def test_bf16_edit_equals_diffusers_pipeline(zoo):
    from bridgecore.model.edit_prompt import condition_size

    ours, reference, other = edit_parity(zoo, "cuda", AREA)
    width, height = condition_size(make_image(320, 200), AREA)
    assert ours.shape == reference.shape == (height, width, 3)
    unrelated = np.abs(other - ours).mean()
    assert unrelated > 1e-3  # the seed matters: the comparison below is not vacuous
    _images_close(ours, reference, unrelated)


def test_batched_equals_one_by_one_on_cuda(zoo):
    batch, singles, other_seed = batched_and_single(editor_for(zoo, "cuda", AREA))
    unrelated = np.abs(other_seed - singles[0]).mean()
    for out, single in zip(batch, singles):
        _images_close(out, single, unrelated)


def test_one_model_at_a_time_stays_under_the_planned_ceiling(zoo):
    from bridgecore.zoo.real_models import release_memory

    from bridgecore.model.edit_prompt import condition_size

    probe = editor_for(zoo, "cuda", AREA)
    caches = probe.extractor.extract(make_image(320, 200), PROMPT)  # the real token counts, for the planner
    probe.unload()
    del probe
    release_memory()
    width, height = condition_size(make_image(320, 200), AREA)
    plan = planned_memory(zoo, caches, (height, width))["modes"]
    editor = editor_for(zoo, "cuda", AREA, one_model_at_a_time=True)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = editor.generate(make_image(320, 200), PROMPT, num_inference_steps=2, output_type="np")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    after = torch.cuda.memory_allocated() - baseline
    assert np.isfinite(out).all()
    one, everything = plan["one_model_at_a_time"]["peak_bytes"], plan["all_resident"]["peak_bytes"]
    print(f"one model at a time: measured peak {peak / GIB:.2f} GiB, planned {one / GIB:.2f} GiB, "
          f"all resident planned {everything / GIB:.2f} GiB, left after the call {after / GIB:.2f} GiB")
    assert peak <= 1.25 * one + 0.5 * GIB
    assert peak < everything
    assert after < 0.1 * GIB  # every model was freed again


def test_8bit_vlm_loading_on_cuda(zoo):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    try:
        from bitsandbytes.cextension import lib  # its CUDA library must load on this machine
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"bitsandbytes does not import here: {error}")
    if type(lib).__name__ != "CudaBNBNativeLibrary":
        pytest.skip(f"bitsandbytes found no CUDA library for torch {torch.version.cuda} ({type(lib).__name__})")
    from bridgecore.model.edit_prompt import EditPromptEncoder, prepare_condition_images
    from bridgecore.model.loading import LoadOptions, load_edit_text_encoder, resolve_model
    from bridgecore.planning.planner import _plan_model
    from bridgecore.zoo.real_models import release_memory

    resolved = resolve_model(zoo["qwen-image-edit"])
    image = prepare_condition_images([make_image(320, 200)], plus=False, condition_area=AREA)
    embeds, footprints = {}, {}
    for name, options in (("bf16", LoadOptions(device="cuda", dtype="bfloat16")),
                          ("int8", LoadOptions(device="cuda", dtype="bfloat16", load_in_8bit=True))):
        model, processor = load_edit_text_encoder(resolved, options)
        if name == "int8":
            layer = model.model.language_model.layers[0].mlp.up_proj
            assert layer.weight.dtype == torch.int8 and layer.weight.device.type == "cuda"
            planned = _plan_model("qwen25", model).bytes_int8
        footprints[name] = model.get_memory_footprint()
        encoding = EditPromptEncoder(model, processor, condition_area=AREA).encode([PROMPT], [image], resized=True)
        embeds[name] = encoding.prompt_embeds
        del model
        release_memory()
    assert embeds["int8"].shape == embeds["bf16"].shape and torch.isfinite(embeds["int8"]).all()
    assert embedding_cosine(embeds["int8"], embeds["bf16"]) > 0.9
    assert footprints["int8"] < footprints["bf16"]
    assert abs(footprints["int8"] - planned) < 0.1 * planned  # the planner's int8 size is what loads


def _cfg_edit(zoo, seed: int = 3, **options):
    editor = editor_for(zoo, "cuda", AREA, **options)
    return editor.generate(make_image(320, 200), PROMPT, seed=seed, num_inference_steps=3, true_cfg_scale=4.0,
                           negative_prompt=" ", output_type="np"), editor


def test_batched_cfg_equals_sequential_cfg_on_cuda(zoo):
    """True CFG's branches as one padded bf16 batch (steps 2 and 3 batched): the edit of the sequential branches
    up to bf16 rounding."""
    (sequential, _), (batched, editor), (other, _) = _cfg_edit(zoo), _cfg_edit(zoo, batch_cfg=True), _cfg_edit(zoo, seed=4)
    assert editor.pipe.transformer._diffusers_hook.get_hook("batched_cfg").batched_steps == 2
    _images_close(batched, sequential, np.abs(other - sequential).mean())


def test_fp8_dynamic_on_fp8_tensor_cores(zoo):
    """FP8 matmuls (torchao, per-row scales) where the card has FP8 tensor cores: the block projections hold FP8
    weights, the edit stays finite and near the bf16 one (random weights: a numerical check, not quality)."""
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9 or later")
    editor = editor_for(zoo, "cuda", AREA, fp8="dynamic")
    out = editor.generate(make_image(320, 200), PROMPT, seed=3, num_inference_steps=2, output_type="np")
    exact = editor_for(zoo, "cuda", AREA).generate(make_image(320, 200), PROMPT, seed=3, num_inference_steps=2,
                                                   output_type="np")
    layer = editor.pipe.transformer.transformer_blocks[0].attn.to_q
    assert type(layer.weight).__name__ == "Float8Tensor"
    psnr = 10 * np.log10(1.0 / float(np.mean((out - exact) ** 2)))
    print(f"fp8 dynamic vs bf16 on the real-width 2-layer DiT: PSNR {psnr:.1f} dB")
    assert np.isfinite(out).all() and psnr > 20
