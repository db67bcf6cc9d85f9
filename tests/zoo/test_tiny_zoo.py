"""The tiny zoo: real classes, real token behaviour, deterministic, loadable like real checkpoints."""

import hashlib
import json

import pytest

from bridgecore.zoo.tiny_zoo import QWEN_SPECIAL_TOKENS, build_qwen3_vl, build_tokenizer


def test_build_is_deterministic(tmp_path, tiny_zoo):
    build_qwen3_vl(tmp_path / "again")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "again" / "model.safetensors") == digest(tiny_zoo["qwen3-vl"] / "model.safetensors")


def test_config_token_ids_match_the_tokenizer(tiny_zoo):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo["qwen3-vl"])
    config = json.loads((tiny_zoo["qwen3-vl"] / "config.json").read_text())
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    text_encoder = json.loads((tiny_zoo["qwen-image-edit"] / "text_encoder" / "config.json").read_text())
    assert text_encoder["image_token_id"] == config["image_token_id"]


def test_special_tokens_are_atomic_and_text_is_byte_level():
    tokenizer = build_tokenizer()
    for token in QWEN_SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    text = "Change the text 'Привет' to '你好' ✓"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: nothing is unknown


def test_classes_and_grids_are_the_real_ones(tiny_zoo):
    qwen3 = json.loads((tiny_zoo["qwen3-vl"] / "config.json").read_text())
    assert qwen3["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert qwen3["vision_config"]["patch_size"] == 16 and qwen3["vision_config"]["spatial_merge_size"] == 2
    assert len(qwen3["vision_config"]["deepstack_visual_indexes"]) >= 2
    index = json.loads((tiny_zoo["qwen-image-edit"] / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    assert json.loads((tiny_zoo["qwen-image-edit-plus"] / "model_index.json").read_text())["_class_name"] == (
        "QwenImageEditPlusPipeline")
    encoder = json.loads((tiny_zoo["qwen-image-edit"] / "text_encoder" / "config.json").read_text())
    assert encoder["vision_config"]["patch_size"] == 14 and encoder["vision_config"]["spatial_merge_size"] == 2


@pytest.mark.slow
def test_trained_edit_model_follows_its_instruction(trained_zoo):
    """The trained tiny DiT's held-out loss is clearly lower with the right instructions than with shuffled ones;
    it loads through from_pretrained like any pipeline and shows its edits in a grid."""
    from diffusers import QwenImageEditPipeline

    from bridgecore.zoo.tiny_edit_model import GRID_NAME, REPORT_NAME

    path = trained_zoo["qwen-image-edit-trained"]
    report = json.loads((path / REPORT_NAME).read_text())
    low, high = report["instruction_gain_ci"]
    assert low > 0, report
    assert report["heldout_loss_correct_instruction"] < 0.8 * report["heldout_loss_shuffled_instruction"]
    pipe = QwenImageEditPipeline.from_pretrained(path)
    assert pipe.vae.config.latents_std != [1.0] * 4  # the trained VAE's own latent statistics
    assert (path / GRID_NAME).stat().st_size > 0


def test_trained_edit_model_is_deterministic(tmp_path, tiny_zoo):
    """Two trainings from the same seed give the same weights, bit for bit (a few steps of each stage)."""
    from bridgecore.zoo.tiny_edit_model import TinyEditTrainConfig, train_tiny_edit_model

    micro = TinyEditTrainConfig(train_triplets=8, heldout_triplets=4, vae_encoder_steps=2, vae_decoder_steps=2,
                                vae_batch_size=4, dit_steps=3, dit_batch_size=4, dit_warmup_steps=1, heldout_repeats=1,
                                grid_rows=2, inference_steps=2)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    for run in ("a", "b"):
        train_tiny_edit_model(tiny_zoo["qwen-image-edit"], tmp_path / run, micro)
    for part in ("transformer", "vae"):
        assert digest(tmp_path / "a" / part / "diffusion_pytorch_model.safetensors") == digest(
            tmp_path / "b" / part / "diffusion_pytorch_model.safetensors")
    assert digest(tmp_path / "a" / "vae" / "config.json") == digest(tmp_path / "b" / "vae" / "config.json")


def test_qwen_image_21_is_the_real_pipeline_class(tiny_zoo):
    index = json.loads((tiny_zoo["qwen-image-2.1"] / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImage21Pipeline"
    assert index["text_encoder"] == ["transformers", "Qwen3VLForConditionalGeneration"]
    assert index["transformer"] == ["diffusers", "QwenImage21Transformer2DModel"]
    dit = json.loads((tiny_zoo["qwen-image-2.1"] / "transformer" / "config.json").read_text())
    encoder = json.loads((tiny_zoo["qwen-image-2.1"] / "text_encoder" / "config.json").read_text())
    assert dit["context_in_dim"] == encoder["text_config"]["hidden_size"]  # the DiT reads Qwen3-VL's width
    assert dit["causal_condition"] is True
    # its own encoder weights, not the Qwen3-VL-Instruct of the zoo (2.1 ships a fine-tuned encoder)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tiny_zoo["qwen-image-2.1"] / "text_encoder" / "model.safetensors") != digest(
        tiny_zoo["qwen3-vl"] / "model.safetensors")
