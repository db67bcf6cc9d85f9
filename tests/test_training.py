"""Bridge training: it learns on synthetic triplets, only the bridge moves, resume is exact, bad data refused."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from bridgecore.batch.settings import JobSettings, ModelPool
from bridgecore.synthetic_triplets import write_triplets
from bridgecore.training import BridgeTrainer, TrainConfig
from bridgecore.training_data import prepare_examples

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


def test_training_lowers_heldout_loss_and_only_the_bridge_moves(tmp_path, settings, examples):
    pipe = ModelPool(settings).editor.pipe
    dit_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    trainer = BridgeTrainer(pipe, examples, tmp_path / "ckpt", replace(FAST, steps=80, eval_every=40,
                                                                       checkpoint_every=40))
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert all(p.requires_grad for p in trainer.bridge.parameters())
    metrics = trainer.train(progress=False)
    assert metrics["heldout_loss_trained"] < metrics["heldout_loss_baseline"]
    assert metrics["gate_abs_mean"] > 0
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in dit_before.items())
    for name in ("metrics.json", "loss_curve.png", "config.json", "model.safetensors"):
        assert (tmp_path / "ckpt" / name).exists()


def test_killed_run_resumes_on_the_same_loss_curve(tmp_path, settings, examples):
    pipe = ModelPool(settings).editor.pipe
    straight = BridgeTrainer(pipe, examples, tmp_path / "straight", FAST).train(progress=False)
    BridgeTrainer(pipe, examples, tmp_path / "resumed", replace(FAST, steps=6)).train(progress=False)
    resumed = BridgeTrainer(pipe, examples, tmp_path / "resumed", FAST).train(progress=False)
    assert resumed["history"]["loss"] == straight["history"]["loss"]
    assert resumed["heldout_loss_trained"] == straight["heldout_loss_trained"]


def test_trained_bridge_changes_edits(tmp_path, settings, examples, tiny_zoo):
    from bridgecore.edit_pipeline import EnhancedQwenImageEdit

    BridgeTrainer(ModelPool(settings).editor.pipe, examples, tmp_path / "ckpt", FAST).train(progress=False)
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
        BridgeTrainer(ModelPool(settings).editor.pipe, [examples[0], other], tmp_path / "x", FAST)
