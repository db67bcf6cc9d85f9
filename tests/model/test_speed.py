"""Speed options on the tiny zoo (CPU): LoRA (fused == diffusers' unfused adapter), Lightning scheduler,
regional and whole compile, attention backend, DiT offload, batched CFG, FP8, the step cache: each must leave the
edit as it should be (or, for the approximations, say how far it moved)."""

import logging
import math

import numpy as np
import pytest
import torch
from helpers import make_image, run_cli

from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit, call_with_areas
from bridgecore.model.loading import LoadOptions, load_edit_pipeline, resolve_model
from bridgecore.model.speed import LoraSpec, default_steps, output_fingerprint, parse_loras, resolve_scheduler
from bridgecore.options import named_as_parameters

AREA = 64 * 64
STEPS = 2


@pytest.fixture(scope="module")
def loras(tiny_zoo, tmp_path_factory):
    from bridgecore.zoo.tiny_zoo import build_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    return {"plain": build_tiny_lora(root / "plain" / "tiny-style.safetensors", tiny_zoo["qwen-image-edit"]),
            "lightning": build_tiny_lora(root / "lightning" / "Tiny-Lightning-4steps-V1.0.safetensors",
                                         tiny_zoo["qwen-image-edit"], seed=1)}


def _edit(tiny_zoo, **options):
    editor = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA, **options)
    return editor.generate(make_image(), "make it blue", seed=1, num_inference_steps=STEPS, output_type="np"), editor


@pytest.fixture(scope="module")
def baseline(tiny_zoo):
    return _edit(tiny_zoo)[0]


def test_lora_spec_parsing(tmp_path):
    local = tmp_path / "style.safetensors"
    local.write_bytes(b"")
    assert LoraSpec.parse(f"{local}:0.5") == LoraSpec(str(local), 0.5)
    assert LoraSpec.parse(str(local)).load_arguments() == (str(local), {})
    hub_file = LoraSpec.parse("lightx2v/Qwen-Image-Lightning/Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors:1")
    assert hub_file.load_arguments() == ("lightx2v/Qwen-Image-Lightning",
                                         {"weight_name": "Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors"})
    assert hub_file.is_lightning and hub_file.distilled_steps == 8 and hub_file.scale == 1.0
    assert LoraSpec.parse("owner/name").load_arguments() == ("owner/name", {})
    with pytest.raises(ValueError, match="no such file"):
        LoraSpec.parse("./missing.safetensors").load_arguments()
    with pytest.raises(ValueError, match="finite"):
        LoraSpec.parse("owner/name:nan")
    with pytest.raises(ValueError, match="PATH_OR_ID"):
        LoraSpec.parse(":2")


def test_scheduler_and_steps_follow_the_lora():
    lightning = parse_loras(["x/Qwen-Image-Lightning/Qwen-Image-Edit-Lightning-4steps-V1.0-bf16.safetensors"])
    assert resolve_scheduler("auto", lightning) == "lightning" and default_steps(lightning, "lightning") == 4
    assert resolve_scheduler("auto", parse_loras(["a/b"])) == "default" and default_steps([], "default") == 50
    assert resolve_scheduler("default", lightning) == "default"
    with pytest.raises(ValueError, match="scheduler must be one of"):
        resolve_scheduler("fast", [])
    assert output_fingerprint(lightning, "lightning") != output_fingerprint(parse_loras(["x/y:0.5"]), "lightning")


def test_fused_lora_equals_diffusers_unfused_adapter(tiny_zoo, loras, baseline):
    ours, editor = _edit(tiny_zoo, lora=f"{loras['plain']}:0.7")
    assert np.abs(ours - baseline).max() > 1e-3  # the LoRA does something
    assert not any("lora" in name for name, _ in editor.pipe.transformer.named_parameters())  # fused, layers gone
    reference = load_edit_pipeline(resolve_model(tiny_zoo["qwen-image-edit"]), LoadOptions(device="cpu"))
    reference.load_lora_weights(str(loras["plain"]), adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.7])
    embeds, mask, _ = editor.encode([[make_image()]], ["make it blue"], use_qwen3_vision=True)
    expected = call_with_areas(reference, AREA, AREA,
                               image=make_image(), prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=1.0,
                               num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1),
                               output_type="np").images[0]
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_lora_at_scale_zero_is_the_baseline(tiny_zoo, loras, baseline):
    np.testing.assert_array_equal(_edit(tiny_zoo, lora=f"{loras['plain']}:0")[0], baseline)


def test_lightning_lora_brings_its_scheduler(tiny_zoo, loras):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

    editor = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA,
                                   lora=str(loras["lightning"]))
    assert editor.scheduler == "lightning" and editor.default_steps == 4
    scheduler = editor.pipe.scheduler
    config = scheduler.config
    sigmas = np.linspace(1.0, 1 / 4, 4)
    mu = calculate_shift(256, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    # A constant shift of 3 whatever the image size: sigma -> 3 sigma / (1 + 2 sigma), then the final 0.
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), 3 * sigmas / (1 + 2 * sigmas), rtol=1e-5)
    assert math.isclose(config.base_shift, math.log(3)) and config.shift_terminal is None
    out = editor.generate(make_image(), "make it blue", output_type="np")  # 4 steps by default
    assert np.isfinite(out).all()


@pytest.mark.parametrize("options", [{"attention_backend": "_native_math"}, {"dit_offload": True},
                                     {"compile": True, "compile_options": {"backend": "aot_eager"}}],
                         ids=["attention-backend", "dit-offload", "regional-compile"])
def test_speed_option_keeps_the_edit(tiny_zoo, baseline, options):
    # aot_eager traces the repeated block with fullgraph=True as inductor would, without compiling kernels (CPU time).
    out, editor = _edit(tiny_zoo, **options)
    np.testing.assert_allclose(out, baseline, atol=1e-5)
    if options.get("attention_backend"):
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        assert _AttentionBackendRegistry._active_backend == AttentionBackendName.NATIVE  # others keep the default
        assert editor.pipe.transformer.transformer_blocks[0].attn.processor._attention_backend == "_native_math"
    if options.get("compile"):
        block = editor.pipe.transformer.transformer_blocks[0]
        assert getattr(block, "_compiled_call_impl", None) is not None


def test_unknown_attention_backend_is_refused(tiny_zoo):
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], attention_backend="fastest")
    # a known backend this machine cannot run (flash-attn not installed here): the whole job cannot run, so it is
    # CannotRunHereError (the stage fails whole, no failure committed per sample), naming the option
    import importlib.util

    from bridgecore.model.speed import CannotRunHereError, set_attention_backend

    if importlib.util.find_spec("flash_attn") is None:
        pipe = load_edit_pipeline(resolve_model(str(tiny_zoo["qwen-image-edit"])), LoadOptions(device="cpu"))
        with pytest.raises(CannotRunHereError, match="--attention-backend flash: .*flash"):
            set_attention_backend(pipe.transformer, "flash")


def test_edit_command_with_speed_flags(tiny_zoo, loras, tmp_path):
    pass

    from PIL import Image

    source, out = tmp_path / "in.png", tmp_path / "out.png"
    make_image().save(source)
    result = run_cli("edit", source, "--prompt", "make it blue", "--out", out, "--qwen3", tiny_zoo["qwen3-vl"],
                     "--edit-model", tiny_zoo["qwen-image-edit"], "--condition-area", AREA, "--seed", "1",
                     "--lora", loras["lightning"], "--attention-backend", "_native_math")
    assert result.returncode == 0, result.stderr[-2000:]
    editor = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA,
                                   lora=str(loras["lightning"]), attention_backend="_native_math")
    expected = editor.generate(make_image(), "make it blue", seed=1)  # 4 steps: the Lightning LoRA's default
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    refused = run_cli("edit", source, "--prompt", "x", "--out", out, "--qwen3", tiny_zoo["qwen3-vl"],
                      "--edit-model", tiny_zoo["qwen-image-edit"], "--attention-backend", "fastest")
    assert refused.returncode == 2 and "attention_backend must be one of" in refused.stderr


def test_the_step_cache_skips_blocks_and_says_how_far_the_edit_moved(tiny_zoo):
    """The fast mode's First Block Cache: over 8 steps the blocks after the first run on fewer steps than the first
    block does, the edit stays finite and close to the exact one (a random tiny DiT: a numerical check, not a
    quality claim), and 0 is refused by the option itself (0 means off in the settings)."""
    from bridgecore.model.speed import enable_step_cache

    def edit(step_cache: float):
        editor = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA,
                                       step_cache=step_cache)
        blocks = editor.pipe.transformer.transformer_blocks
        calls = {"first": 0, "last": 0}
        assert len(blocks) >= 2
        # the attention inside each block runs only when the block really computes (a skipped block's forward
        # returns its inputs; the cache then adds the residual it kept)
        blocks[0].attn.register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1))
        blocks[-1].attn.register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1))
        out = editor.generate(make_image(), "make it blue", seed=1, num_inference_steps=8, output_type="np")
        return out, calls

    exact, exact_calls = edit(0.0)
    fast, fast_calls = edit(0.9)  # a high threshold: steps after the first are skipped when the first block barely moves
    assert exact_calls == {"first": 8, "last": 8}
    assert fast_calls["first"] == 8 and fast_calls["last"] < 8, fast_calls
    assert np.isfinite(fast).all() and not np.array_equal(fast, exact)
    psnr = 10 * math.log10(1.0 / float(np.mean((fast - exact) ** 2)))
    print(f"step cache 0.9 on the tiny DiT: last block ran {fast_calls['last']}/8 steps, PSNR vs exact {psnr:.1f} dB, "
          f"max abs {float(np.abs(fast - exact).max()):.3f}")
    with pytest.raises(ValueError, match="step_cache must be in"):
        enable_step_cache(None, 0.0)


def test_batched_cfg_is_the_sequential_edit_in_one_forward_per_step(tiny_zoo):
    """True CFG with a positive prompt longer than the negative one: the two branches run as one padded, masked
    batch from the second step on (the first learns the negative inputs), the DiT runs once per step instead of
    twice, and the edit equals the sequential one (float32: up to rounding). A second edit (another prompt length)
    relearns: the pipeline's end-of-call reset forgets the first call's negatives."""
    def edit(prompt: str, **options):
        editor = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA, **options)
        forwards = []
        editor.pipe.transformer.register_forward_pre_hook(lambda module, args: forwards.append(1))
        blocks = editor.pipe.transformer.transformer_blocks
        batches = []
        blocks[0].register_forward_hook(lambda module, args, output: batches.append(output[1].shape[0]))
        out = editor.generate(make_image(), prompt, seed=1, num_inference_steps=4, true_cfg_scale=4.0,
                              negative_prompt=" ", output_type="np")
        return out, batches, editor

    long_prompt = "make the red square blue and twice as large, keep the background"
    sequential, sequential_batches, _ = edit(long_prompt)
    batched, batched_batches, editor = edit(long_prompt, batch_cfg=True)
    assert sequential_batches == [1] * 8  # 4 steps x 2 branches
    assert batched_batches == [1, 1, 2, 2, 2]  # step 1 apart (learning), then one batch of two per step
    np.testing.assert_allclose(batched, sequential, atol=1e-5)
    assert np.ptp(sequential) > 0.1  # a real image, not a constant
    hook = editor.pipe.transformer._diffusers_hook.get_hook("batched_cfg")
    assert hook.batched_steps == 3 and hook.negative is None  # reset at the end of the pipeline call
    again = editor.generate(make_image(), "blue", seed=1, num_inference_steps=4, true_cfg_scale=4.0,
                            negative_prompt=" ", output_type="np")
    reference = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA).generate(
        make_image(), "blue", seed=1, num_inference_steps=4, true_cfg_scale=4.0, negative_prompt=" ", output_type="np")
    np.testing.assert_allclose(again, reference, atol=1e-5)
    assert hook.batched_steps == 6
    # without CFG nothing is batched and the edit is untouched
    plain = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA, batch_cfg=True)
    np.testing.assert_array_equal(plain.generate(make_image(), "blue", seed=1, num_inference_steps=2, output_type="np"),
                                  EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"],
                                                        condition_area=AREA).generate(
                                      make_image(), "blue", seed=1, num_inference_steps=2, output_type="np"))


def test_fp8_weights_convert_the_block_projections_and_dynamic_needs_fp8_tensor_cores(tiny_zoo, baseline):
    """fp8="weights" (FP8 storage, bf16 compute) runs anywhere: every attention/MLP projection and modulation layer
    of the blocks holds an FP8 tensor, the embedders and the head stay as they were, and the edit moves a little (a
    random tiny DiT: a numerical check). fp8="dynamic" (FP8 matmuls) is refused off FP8 tensor cores, saying why."""
    pytest.importorskip("torchao")
    from bridgecore.model.speed import enable_fp8, fp8_layer_names

    out, editor = _edit(tiny_zoo, fp8="weights")
    transformer = editor.pipe.transformer
    converted = set(fp8_layer_names(transformer, modulation=True))  # "weights" stores the modulation layers too
    kinds = {name: type(module.weight).__name__ for name, module in transformer.named_modules()
             if isinstance(module, torch.nn.Linear)}
    assert converted and all(kinds[name] == "Float8Tensor" for name in converted)
    assert all(kind == "Parameter" for name, kind in kinds.items() if name not in converted), kinds  # embedders, head
    # 8 attention + 4 MLP projections a block, + 2 modulation layers ("dynamic" leaves those in bf16)
    assert len(converted) == 14 * len(transformer.transformer_blocks)
    assert len(fp8_layer_names(transformer)) == 12 * len(transformer.transformer_blocks)
    assert not any("_mod" in name for name in fp8_layer_names(transformer))
    assert np.isfinite(out).all() and not np.array_equal(out, baseline)
    psnr = 10 * math.log10(1.0 / float(np.mean((out - baseline) ** 2)))
    assert psnr > 25, psnr
    print(f"fp8 weights on the tiny DiT: PSNR vs exact {psnr:.1f} dB, max abs {float(np.abs(out - baseline).max()):.4f}")
    with pytest.raises(ValueError, match="--fp8 dynamic runs .*compute capability 8.9 or later.*this DiT is on cpu. "
                                         "--fp8 weights stores"):
        enable_fp8(transformer, "dynamic")
    # through the editor: the refusal comes out of the first edit, and the failed load is not tried twice
    refused = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA, fp8="dynamic")
    with pytest.raises(ValueError, match="compute capability 8.9"):
        refused.generate(make_image(), "make it blue", num_inference_steps=STEPS, output_type="np")
    assert refused._pipe.attempts == 1  # counted, not read from the log (Prefect's logging set-up replaces handlers)
    with pytest.raises(ValueError, match="fp8 must be one of"):
        EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], fp8="int4")
    # the editor names the options as its user gave them: flags at the command line, parameters in a flow
    with pytest.raises(ValueError, match="--fp8 with --dit-offload: not supported together"):
        EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], fp8="weights", dit_offload=True)
    with named_as_parameters(), pytest.raises(ValueError, match="the fp8 parameter with the dit_offload parameter"):
        EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], fp8="weights", dit_offload=True)


def test_whole_transformer_compile_keeps_the_edit(tiny_zoo, baseline):
    """The whole DiT as one graph (aot_eager: traced with fullgraph as inductor would be, no kernels compiled)."""
    from bridgecore.model.speed import compile_transformer

    editor = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA)
    compile_transformer(editor.pipe.transformer, {"backend": "aot_eager"}, whole=True)
    assert editor.pipe.transformer._compiled_call_impl is not None
    out = editor.generate(make_image(), "make it blue", seed=1, num_inference_steps=STEPS, output_type="np")
    np.testing.assert_allclose(out, baseline, atol=1e-5)


def test_the_step_cache_compiles(tiny_zoo):
    """The step cache's hooks leave the graph (torch.compiler.disable): with them a block cannot compile as one
    graph (fullgraph failed with "Skip inlining torch.compiler.disable()'d function"), so compile allows the
    breaks, and the compiled fast edit equals the eager one."""
    def edit(**options):
        editor = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA,
                                       step_cache=0.9, **options)
        return editor.generate(make_image(), "make it blue", seed=1, num_inference_steps=8, output_type="np")

    np.testing.assert_allclose(edit(compile=True, compile_options={"backend": "aot_eager"}), edit(), atol=1e-5)


def test_batched_cfg_compiles_across_batches_and_falls_back_where_masks_are_refused(tiny_zoo):
    """Compiled with batched CFG, the blocks see batch 1 then 2, masks or none, other lengths per edit: with a
    graph per shape, torch's recompile limit stopped the third edit (FailOnRecompileLimitHit under fullgraph), so
    it compiles for dynamic shapes; every edit equals the eager sequential one. A backend that refuses attention
    masks (native flash) makes the hook run the branches one after the other, with the same edit."""
    options = dict(true_cfg_scale=4.0, negative_prompt=" ", num_inference_steps=3, output_type="np")
    compiled = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA,
                                     batch_cfg=True, compile=True, compile_options={"backend": "eager"})
    reference = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA)
    for prompts in (["blue"], ["make it much bluer please", "red"], ["a", "bb", "make the square green", "x"]):
        images = [make_image(seed=i) for i in range(len(prompts))]
        for out, expected in zip(compiled.generate(images, prompts, seed=1, **options),
                                 reference.generate(images, prompts, seed=1, **options)):
            np.testing.assert_allclose(out, expected, atol=1e-5)
    flash = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], condition_area=AREA,
                                  batch_cfg=True, attention_backend="_native_flash")
    np.testing.assert_allclose(flash.generate(make_image(), "make it blue please", seed=1, **options),
                               reference.generate(make_image(), "make it blue please", seed=1, **options), atol=1e-5)
    hook = flash.pipe.transformer._diffusers_hook.get_hook("batched_cfg")
    assert hook.mask_refused and hook.batched_steps == 0
