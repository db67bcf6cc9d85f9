"""Bridge training: it learns on synthetic triplets, only the bridge moves, every run measures the Qwen3
information it uses (shuffled-cache evaluation with a CI), ablations, Edit-Plus conditioning as at inference,
resume is exact, bad data refused."""

import json
from dataclasses import replace

import numpy as np
import pytest
from helpers import LOADED
import torch

from bridgecore.batch.model_pool import ModelPool
from bridgecore.batch.settings import JobSettings
from bridgecore.zoo.synthetic_triplets import write_triplets
from bridgecore.training.trainer import BridgeTrainer, TrainConfig, shuffled_qwen3
from bridgecore.batch.training_data import prepare_examples

AREA = 64 * 64
FAST = TrainConfig(steps=12, batch_size=4, eval_every=6, checkpoint_every=6, warmup_steps=2, heldout_fraction=0.25,
                   learning_rate=1e-3)


@pytest.fixture(scope="module")
def settings(tiny_zoo):
    return JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=AREA)


@pytest.fixture(scope="module")
def examples(tmp_path_factory, settings):
    folder = tmp_path_factory.mktemp("triplets")
    manifest = write_triplets(folder / "data", 16, seed=0)
    return prepare_examples(str(manifest), str(folder / "work"), settings)


def test_examples_are_packed_latents_with_caches(examples):
    example = examples[0]
    assert example.target.shape == example.condition.shape and example.target.ndim == 2
    assert example.latent_hw[0] * example.latent_hw[1] == example.target.shape[0]
    assert example.cache.qwen25.prompt_embeds.ndim == 2 and not torch.equal(example.target, example.condition)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["residual", "tokens"])
def test_training_lowers_heldout_loss_and_only_the_bridge_moves(tmp_path, settings, examples, mode):
    from bridgecore.model.bridge import BridgeConfig

    pipe = ModelPool(settings, LOADED).editor.pipe
    dit_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    first = examples[0].cache
    trainer = BridgeTrainer(pipe, examples, tmp_path / "ckpt", replace(FAST, steps=80, eval_every=40, checkpoint_every=40),
                            BridgeConfig.from_caches(first.qwen3, first.qwen25, mode=mode))
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert all(p.requires_grad for p in trainer.bridge.parameters())
    metrics = trainer.train(progress=False)
    assert metrics["heldout_loss_trained"] < metrics["heldout_loss_baseline"]
    assert metrics["bridge_mode"] == mode and (metrics["gate_abs_mean"] > 0 if mode == "residual" else
                                              metrics["bridge_tokens"] == 2 and metrics["gate_abs_mean"] is None)
    # the paired no-harm check of every run: it helps here (lower held-out loss), and says so
    low, high = metrics["heldout_gain_ci"]
    assert metrics["no_harm"]["verdict"] == ("helps" if low > 0 else "HURTS" if high < 0 else "no measurable difference")
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in dit_before.items())
    for name in ("metrics.json", "loss_curve.png", "config.json", "model.safetensors", "bridge_statistics.json"):
        assert (tmp_path / "ckpt" / name).exists()
    # The Qwen3 ablation is part of every run: shuffled-cache loss, the paired gain and its CI.
    saved = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    per_sample = saved["heldout_per_sample"]
    assert len(per_sample["trained"]) == len(per_sample["qwen3_shuffled"]) == saved["heldout_examples"] == 4
    gain = np.mean(per_sample["qwen3_shuffled"]) - np.mean(per_sample["trained"])
    assert saved["qwen3_information_gain"] == pytest.approx(gain)
    low, high = saved["qwen3_information_gain_ci"]
    assert low <= saved["qwen3_information_gain"] <= high
    assert saved["heldout_loss_qwen3_shuffled"] != saved["heldout_loss_trained"]
    assert len(saved["history"]["heldout_loss_qwen3_shuffled"]) == len(saved["history"]["heldout_step"]) == 2
    # What the bridge does to the embeddings, recorded at every evaluation and in every checkpoint.
    stats = saved["bridge_statistics"]
    if mode == "residual":
        assert 0 < stats["correction_rms_ratio"] and stats["correction_rms_ratio_token_max"] < 0.5
        assert {"token_cosine_base", "token_cosine_enhanced", "gate_text", "gate_vision"} <= set(stats)
    else:  # the sample's own tokens are untouched; the information is in the appended ones
        assert stats["correction_rms_ratio"] == 0 and stats["appended_tokens"] == metrics["bridge_tokens"] == 2 and stats["appended_rms_ratio"] > 0
    # Per-level ablation in every run: held-out loss with each Qwen3 level zeroed at evaluation.
    zeroed = saved["heldout_loss_level_zeroed"]
    assert set(zeroed) == {"early", "mid", "late"} and all(np.isfinite(list(zeroed.values())))
    assert any(v != saved["heldout_loss_trained"] for v in zeroed.values())
    checkpoint_stats = json.loads((tmp_path / "ckpt" / "step_000040" / "bridge_statistics.json").read_text())
    assert checkpoint_stats["step"] == 40 and "correction_rms_ratio" in checkpoint_stats


def test_the_cosine_schedule_decays_after_warm_up_to_its_floor_at_the_horizon():
    cosine = replace(FAST, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1, lr_decay_steps=20)
    factors = [cosine.lr_factor(step) for step in range(25)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]  # warm-up, as the constant schedule
    assert all(a > b for a, b in zip(factors[3:19], factors[4:20]))  # strictly down to the horizon ...
    assert factors[19] == pytest.approx(0.1) and factors[24] == pytest.approx(0.1)  # ... then the floor
    assert [replace(cosine, lr_schedule="constant").lr_factor(s) for s in (3, 19, 24)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        replace(FAST, lr_schedule="linear")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_killed_run_resumes_on_the_same_loss_curve(tmp_path, settings, examples, schedule):
    pipe = ModelPool(settings, LOADED).editor.pipe
    config = replace(FAST, lr_schedule=schedule, lr_decay_steps=FAST.steps)  # the killed run knows the whole length
    straight = BridgeTrainer(pipe, examples, tmp_path / "straight", config).train(progress=False)
    BridgeTrainer(pipe, examples, tmp_path / "resumed", replace(config, steps=6)).train(progress=False)
    resumed = BridgeTrainer(pipe, examples, tmp_path / "resumed", config).train(progress=False)
    assert resumed["history"]["loss"] == straight["history"]["loss"]
    if schedule == "cosine":  # the schedule reached the optimizer: the curve left the constant rate's after warm-up
        constant = BridgeTrainer(pipe, examples, tmp_path / "constant", FAST).train(progress=False)
        assert constant["history"]["loss"][:1] == straight["history"]["loss"][:1]
        assert constant["history"]["loss"] != straight["history"]["loss"]
    assert resumed["heldout_loss_trained"] == straight["heldout_loss_trained"]
    # another global batch cannot continue the curve (its data position would be wrong): refused, naming it
    with pytest.raises(ValueError, match="this run's global batch is 2"):
        BridgeTrainer(pipe, examples, tmp_path / "resumed", replace(FAST, steps=20, batch_size=2)).train(progress=False)


def test_trained_bridge_changes_edits(tmp_path, settings, examples, tiny_zoo):
    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit

    BridgeTrainer(ModelPool(settings, LOADED).editor.pipe, examples, tmp_path / "ckpt", FAST).train(progress=False)
    editor = EnhancedQwenImageEdit(tiny_zoo["qwen-image-edit"], tiny_zoo["qwen3-vl"], bridge=tmp_path / "ckpt",
                                   condition_area=AREA)
    from PIL import Image

    source = Image.new("RGB", (64, 64), (200, 100, 50))
    trained = editor.generate(source, "Make the square blue", num_inference_steps=2, output_type="np")
    baseline = editor.generate(source, "Make the square blue", num_inference_steps=2, output_type="np",
                               use_qwen3_vision=False)
    assert not np.array_equal(trained, baseline)


def test_bad_data_is_refused_before_training(tmp_path, settings, examples):
    from PIL import Image

    folder = write_triplets(tmp_path / "data", 2).parent
    Image.new("RGB", (80, 64)).save(folder / "00001_target.png")
    with pytest.raises(ValueError, match="target size .* differs from source"):
        prepare_examples(str(folder / "manifest.jsonl"), str(tmp_path / "work"), settings)
    (tmp_path / "empty.jsonl").write_text('{"image": "missing.png", "instruction": "x", "target": "t.png"}\n')
    with pytest.raises(ValueError, match="no usable training triplets"):
        prepare_examples(str(tmp_path / "empty.jsonl"), str(tmp_path / "work2"), settings)
    other = replace(examples[1], cache=replace(examples[1].cache, qwen25=replace(examples[1].cache.qwen25,
                                                                                   revision="other-revision")))
    with pytest.raises(ValueError, match="revision"):
        BridgeTrainer(ModelPool(settings, LOADED).editor.pipe, [examples[0], other], tmp_path / "x", FAST)


def test_qwen3_ablations(tmp_path, settings, examples):
    """'shuffle' pairs every sample with another sample's Qwen3 caches, 'zeros' zeroes them, held-out shuffling
    is a derangement; the control trains and says which ablation it ran."""
    pipe = ModelPool(settings, LOADED).editor.pipe
    shuffled = shuffled_qwen3(examples[:6], seed=0)
    for example, qwen3 in zip(examples[:6], shuffled):
        assert not torch.equal(qwen3.levels["late"], example.cache.qwen3.levels["late"]) and qwen3.image_digest == ""
    control = BridgeTrainer(pipe, examples, tmp_path / "shuffle", replace(FAST, steps=2, ablate_qwen3="shuffle"))
    batch, partners = examples[:4], examples[1:5]  # the data stream pairs each example with another from its buffer
    for example, qwen3 in zip(batch, control._training_qwen3(batch, partners)):
        assert not torch.equal(qwen3.levels["late"], example.cache.qwen3.levels["late"])
    assert control.train(progress=False)["ablate_qwen3"] == "shuffle"
    zeros = BridgeTrainer(pipe, examples, tmp_path / "zeros", replace(FAST, steps=2, ablate_qwen3="zeros"))
    assert all(not q.levels["mid"].any() and not any(d.any() for d in q.deepstack.values())
               for q in zeros._training_qwen3(batch, partners))
    with pytest.raises(ValueError, match="ablate_qwen3 must be one of"):
        TrainConfig(ablate_qwen3="random")


@pytest.fixture(scope="module")
def plus_settings(tiny_zoo):
    return JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit-plus"]), condition_area=AREA)


@pytest.mark.parametrize("plus", [False, True])
def test_training_conditions_the_dit_as_inference_does(tmp_path, settings, plus_settings, plus):
    """The condition latents and grids the trainer gives the DiT are the ones the edit pipeline gives it at
    inference (captured from the pipeline's own transformer call), for one image and for Edit-Plus's two."""
    job = plus_settings if plus else settings
    manifest = write_triplets(tmp_path / "data", 2, seed=3, images_per_sample=2 if plus else 1)
    examples = prepare_examples(str(manifest), str(tmp_path / "work"), job)
    example = sorted(examples, key=lambda e: e.key)[0]
    h, w = example.latent_hw
    assert len(example.condition_hw) == (2 if plus else 1)
    captured = {}
    editor = ModelPool(job, LOADED).editor
    hook = editor.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    try:
        folder = tmp_path / "data"
        images = [folder / "00000_source.png"] + ([folder / "00000_picture2.png"] if plus else [])
        editor.generate(images if plus else images[0], "x", use_qwen3_vision=False, num_inference_steps=2,
                        output_type="np")
    finally:
        hook.remove()
    assert captured["img_shapes"][0] == [(1, h, w), *[(1, ch, cw) for ch, cw in example.condition_hw]]
    torch.testing.assert_close(captured["hidden_states"][0, h * w:], example.condition, atol=1e-5, rtol=1e-5)


def test_edit_plus_training_reads_every_condition_image(tmp_path, plus_settings):
    """2-image triplets ('Make the square the colour of picture 2'): the loss depends on picture 2's latents,
    and the trainer runs on them."""
    manifest = write_triplets(tmp_path / "data", 8, seed=1, images_per_sample=2)
    examples = prepare_examples(str(manifest), str(tmp_path / "work"), plus_settings)
    pipe = ModelPool(plus_settings, LOADED).editor.pipe
    trainer = BridgeTrainer(pipe, examples, tmp_path / "ckpt", replace(FAST, steps=4, eval_every=4, checkpoint_every=4))
    example = trainer.heldout[0]
    first_tokens = example.condition_hw[0][0] * example.condition_hw[0][1]
    other = example.condition.clone()
    other[first_tokens:] = torch.randn(other[first_tokens:].shape, generator=torch.Generator().manual_seed(0))
    swapped = replace(example, condition=other)
    assert trainer.heldout_losses(trainer.bridge, examples=[swapped])[0] != trainer.heldout_losses(trainer.bridge)[0]
    metrics = trainer.train(progress=False)
    assert np.isfinite(metrics["heldout_loss_trained"])


def test_tokens_sit_where_inference_puts_them_in_any_batch(settings, examples):
    """The DiT's loss of a sample in a batch of prompts of different lengths equals its loss alone: the appended
    tokens are packed before padding, so their RoPE positions (max_vid_index + j of the padded tensor) are the
    same in a training batch as in a single-sample edit."""
    from bridgecore.model.bridge import BridgeConfig, VisionCacheBridge
    from bridgecore.training.trainer import flow_matching_loss

    pipe = ModelPool(settings, LOADED).editor.pipe
    by_length = {}
    for example in examples:
        by_length.setdefault(example.cache.qwen25.prompt_embeds.shape[0], example)
    assert len(by_length) >= 2, "the triplets should have prompts of different lengths"
    batch = [by_length[length] for length in sorted(by_length)[:3]]
    first = batch[0].cache
    torch.manual_seed(0)
    bridge = VisionCacheBridge(BridgeConfig.from_caches(first.qwen3, first.qwen25, mode="tokens", num_tokens=2)).eval()
    generator = torch.Generator().manual_seed(0)
    target = torch.stack([e.target for e in batch])
    noise = torch.randn(target.shape, generator=generator)
    sigmas = torch.full((len(batch),), 0.6)
    condition = torch.stack([e.condition for e in batch])
    with torch.no_grad():
        out = bridge([e.cache.qwen3 for e in batch], [e.cache.qwen25 for e in batch])
        together = flow_matching_loss(pipe.transformer, out.prompt_embeds, out.prompt_embeds_mask, condition, target,
                                      batch[0].latent_hw, noise, sigmas, reduce=False)
        for i, example in enumerate(batch):
            alone = bridge(example.cache.qwen3, example.cache.qwen25)
            single = flow_matching_loss(pipe.transformer, alone.prompt_embeds, alone.prompt_embeds_mask, condition[i:i + 1],
                                        target[i:i + 1], example.latent_hw, noise[i:i + 1], sigmas[i:i + 1], reduce=False)
            torch.testing.assert_close(together[i], single[0], rtol=1e-4, atol=1e-6)
        # the same tokens placed after the padding would be read at other positions: another loss
        shifted = torch.zeros_like(out.prompt_embeds)
        mask = torch.zeros_like(out.prompt_embeds_mask)
        shortest = batch[0].cache.qwen25.prompt_embeds.shape[0]
        length = out.prompt_embeds.shape[1]
        shifted[0, :shortest] = out.prompt_embeds[0, :shortest]
        shifted[0, length - 2:] = out.prompt_embeds[0, shortest:shortest + 2]
        mask[0, :shortest] = 1
        mask[0, length - 2:] = 1
        late = flow_matching_loss(pipe.transformer, shifted[:1], mask[:1], condition[:1], target[:1], batch[0].latent_hw,
                                  noise[:1], sigmas[:1], reduce=False)
    assert not torch.allclose(late[0], together[0], rtol=1e-4, atol=1e-6)


def test_damaged_caches_are_found_by_verify_and_end_training_in_one_line(tmp_path, settings):
    """Flipped bytes in a committed caches tar: `--verify` (summarize with verify) finds and uncommits it; training
    that reads such a shard stops in one line naming it, uncommits it, and the same command then recomputes it."""
    from bridgecore.batch.fingerprints import fingerprints
    from bridgecore.batch.job_plan import read_job
    from bridgecore.batch.pipelines import STAGES
    from bridgecore.batch.summary import summarize
    from bridgecore.batch.training_data import DamagedDataError, prepare_data
    from bridgecore.storage import Storage

    manifest = write_triplets(tmp_path / "data", 8, seed=2)
    work = str(tmp_path / "work")
    prepare_data(str(manifest), work, settings, shard_size=4, loaded=LOADED)

    def flip(tar):
        data = bytearray(tar.read_bytes())
        data[len(data) // 2] ^= 0xFF
        tar.write_bytes(bytes(data))

    store = STAGES["caches"].store(Storage(work), fingerprints("training-data", settings)["caches"])
    shards = sorted(store.done_shards())
    assert len(shards) == 2
    flip(tmp_path / "work" / "caches" / store.fingerprint / "data" / f"{shards[0]}.tar")
    from bridgecore.batch.job_plan import JOBS

    (job,) = {name.split(".", 1)[0] for name in Storage(work).list(JOBS)}  # the one planning job of this output
    assert read_job(Storage(work), job)
    summary = summarize(work, job, "training-data", settings, verify=True)
    assert summary["damaged"] == [shards[0]] and shards[0] not in store.done_shards()
    # the next preparation recomputes it; then damage found by training itself
    source = prepare_data(str(manifest), work, settings, shard_size=4, loaded=LOADED)
    assert shards[0] in store.done_shards()
    flip(tmp_path / "work" / "caches" / store.fingerprint / "data" / f"{shards[1]}.tar")
    pipe = ModelPool(settings, LOADED).editor.pipe
    with pytest.raises(DamagedDataError) as refused:
        BridgeTrainer(pipe, source, tmp_path / "ckpt", replace(FAST, steps=4, data_workers=1)).train(progress=False)
    message = str(refused.value)
    assert "\n" not in message and shards[1] in message and "run the same `vision-bridge train` command" in message
    assert shards[1] not in store.done_shards()
    source = prepare_data(str(manifest), work, settings, shard_size=4, loaded=LOADED)
    assert np.isfinite(BridgeTrainer(pipe, source, tmp_path / "ckpt2", replace(FAST, steps=2)).train(
        progress=False)["heldout_loss_trained"])


def test_train_shards_its_own_data_so_every_stream_has_some(tmp_path):
    """`train --data MANIFEST --nproc-per-node 2` on 24 samples built one 64-sample shard and failed after two
    minutes in rank 1; the shard size now fits the streams, and too few samples are refused in one line."""
    from bridgecore.batch.training_data import streamable_shard_size

    manifest = str(write_triplets(tmp_path / "data", 24, seed=4))
    assert streamable_shard_size(manifest, 64, 2) == 12
    assert streamable_shard_size(manifest, 8, 2) == 8  # a size that already fits is kept
    with pytest.raises(ValueError, match="24 samples for 32 data streams"):
        streamable_shard_size(manifest, 64, 32)


def test_the_training_bar_writes_a_few_lines_to_a_log_not_one_per_step(tmp_path, settings, examples, capsys):
    """Redirected (stderr not a terminal), the bar is one line per half minute and one at the end: the loss shown
    on it must not redraw it every step (it did: 1,600 lines for the main job's two tiny bridges)."""
    pipe = ModelPool(settings, LOADED).editor.pipe
    BridgeTrainer(pipe, examples, tmp_path / "ckpt", replace(FAST, steps=40, eval_every=40, checkpoint_every=40)).train(
        progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train:")]
    assert 1 <= len(lines) <= 3, lines
    assert "40/40" in lines[-1] and "loss=" in lines[-1]
