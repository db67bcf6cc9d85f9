"""Offline tiny model zoo: small random models of the *real* classes, saved in Hugging Face layout.

The tiny models differ from the real ones only in sizes: the same classes, the same processors,
the same special tokens and chat templates, Qwen3-VL's 32 px tokens (patch 16, merge 2) and
DeepStack, Qwen2.5-VL's 28 px tokens (patch 14, merge 2). Everything is seeded, so two builds
are bit-identical, and nothing touches the network. Loaders read them back through the same
`from_pretrained` path as real checkpoints.

    vision-bridge tiny-models DIR [--trained]  # DIR/qwen3-vl, DIR/qwen-image-edit, DIR/qwen-image-edit-plus,
                                               # DIR/qwen-image-2.1
                                               # (+ DIR/qwen-image-edit-trained: see tiny_edit_model.py)
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from bridgecore.model.chat_templates import QWEN3_VL_CHAT_TEMPLATE, QWEN25_VL_CHAT_TEMPLATE  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

# Qwen's special tokens, in the order (and relative ids) of the real vocabulary (151643...).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Text the tiny BPE is trained on: the pipelines' templates plus typical edit instructions, so
# that the tokenizer merges real words the way a real one would (fewer, but real, merges).
_TOKENIZER_CORPUS = [
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate.",
    "Picture 1: Picture 2: Picture 3: system user assistant You are a helpful assistant.",
    "Change the text 'Hello' to 'Goodbye'. Move the red circle to the right of the blue square.",
    "Make the blue square yellow. Swap the green triangle and the red circle. Read the text in the image.",
    "Describe this image. Replace the sky with a sunset. Remove the person on the left. Add a hat.",
    "The quick brown fox jumps over the lazy dog 0123456789 left right up down above below between.",
]


@dataclass(frozen=True)
class TinySizes:
    """Dimensions of the tiny zoo. The Qwen3 side is wider than the Qwen2.5 side, as in the real pair."""

    qwen3_text_hidden: int = 128
    qwen3_text_layers: int = 4
    qwen3_vision_hidden: int = 64
    qwen3_vision_depth: int = 4
    qwen3_deepstack: tuple[int, ...] = (1, 2, 3)
    qwen25_text_hidden: int = 64
    qwen25_text_layers: int = 3
    qwen25_vision_hidden: int = 64
    qwen25_vision_depth: int = 4
    dit_layers: int = 2
    dit_heads: int = 2
    dit_head_dim: int = 32
    vae_base_dim: int = 16
    vae_z_dim: int = 4
    bpe_vocab: int = 600
    seed: int = 0


def build_tokenizer(sizes: TinySizes = TinySizes()):
    """A real `Qwen2Tokenizer` over a byte-level BPE trained offline, with Qwen's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    from tokenizers import Regex

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=sizes.bpe_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)
        vocab = json.loads(Path(tmp, "vocab.json").read_text())
        merges = [
            tuple(line.split(" "))
            for line in Path(tmp, "merges.txt").read_text().splitlines()
            if line and not line.startswith("#")
        ]
    start = len(vocab)
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[token] = start + offset
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        model_max_length=131072,
    )
    tokenizer.padding_side = "right"
    return tokenizer


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(ids), "special tokens must have distinct ids"
    return ids


def build_qwen3_vl(out_dir: Path, sizes: TinySizes = TinySizes()) -> Path:
    """Tiny `Qwen3VLForConditionalGeneration` + `Qwen3VLProcessor` (patch 16, merge 2, DeepStack)."""
    model, processor = _tiny_qwen3_vl(sizes, sizes.seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _tiny_qwen3_vl(sizes: TinySizes, seed: int, min_pixels: int = 64 * 32 * 32):
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = build_tokenizer(sizes)
    ids = _token_ids(tokenizer)
    head_dim = 32
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=sizes.qwen3_text_hidden,
            intermediate_size=2 * sizes.qwen3_text_hidden,
            num_hidden_layers=sizes.qwen3_text_layers,
            num_attention_heads=sizes.qwen3_text_hidden // head_dim,
            num_key_value_heads=2,
            head_dim=head_dim,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                             "mrope_section": [6, 5, 5], "mrope_interleaved": True},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=sizes.qwen3_vision_depth,
            hidden_size=sizes.qwen3_vision_hidden,
            intermediate_size=2 * sizes.qwen3_vision_hidden,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=sizes.qwen3_text_hidden,
            num_position_embeddings=256,
            deepstack_visual_indexes=list(sizes.qwen3_deepstack),
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": min_pixels, "longest_edge": 16384 * 32 * 32},
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    return model, processor


def _tiny_text_encoder(tokenizer, sizes: TinySizes):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = _token_ids(tokenizer)
    head_dim = 16
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=sizes.qwen25_text_hidden,
            intermediate_size=2 * sizes.qwen25_text_hidden,
            num_hidden_layers=sizes.qwen25_text_layers,
            num_attention_heads=sizes.qwen25_text_hidden // head_dim,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=sizes.qwen25_vision_depth,
            hidden_size=sizes.qwen25_vision_hidden,
            intermediate_size=2 * sizes.qwen25_vision_hidden,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1, 3],
            out_hidden_size=sizes.qwen25_text_hidden,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(sizes.seed + 1)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _tiny_edit_pipeline(plus: bool, sizes: TinySizes, like_2511: bool = False):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = build_tokenizer(sizes)
    text_encoder = _tiny_text_encoder(tokenizer, sizes)
    image_processor = Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},  # the real processor's limits
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN25_VL_CHAT_TEMPLATE,
    )
    torch.manual_seed(sizes.seed + 2)
    # Three temporal/spatial downsamples as in the real VAE: 8x spatial compression.
    vae = AutoencoderKLQwenImage(
        base_dim=sizes.vae_base_dim, z_dim=sizes.vae_z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * sizes.vae_z_dim, latents_std=[1.0] * sizes.vae_z_dim,
    ).eval()
    torch.manual_seed(sizes.seed + 3)
    head_dim = sizes.dit_head_dim
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * sizes.vae_z_dim, out_channels=sizes.vae_z_dim,
        num_layers=sizes.dit_layers, attention_head_dim=head_dim, num_attention_heads=sizes.dit_heads,
        joint_attention_dim=sizes.qwen25_text_hidden,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
        zero_cond_t=like_2511,  # Edit-2511: condition-image tokens modulated at t = 0
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
        shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return cls(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
               processor=processor, transformer=transformer)


def build_edit_pipeline(out_dir: Path, plus: bool = False, sizes: TinySizes = TinySizes(),
                        like_2511: bool = False) -> Path:
    """Tiny `QwenImageEditPipeline` (or `...PlusPipeline`) directory, loadable with `from_pretrained`;
    `like_2511`: a Plus pipeline configured as Qwen-Image-Edit-2511 (its DiT's `zero_cond_t`)."""
    _tiny_edit_pipeline(plus or like_2511, sizes, like_2511).save_pretrained(out_dir)
    return out_dir


def build_qwen_image_21(out_dir: Path, sizes: TinySizes = TinySizes()) -> Path:
    """Tiny `QwenImage21Pipeline`: a Qwen3-VL text encoder (its own weights: 2.1 ships a fine-tuned one), the
    single-stream block-causal DiT and the 64-channel, 16x VAE, as in the real pipeline.

    Its processor accepts images from 32x32 px: 2.1 fills one vision slot per 2x2 latent tokens, so the encoder
    must see the condition image at the size the VAE sees it (the real processor's 256x256 floor is below any
    real output resolution, but above the tiny tests' 64 px)."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )

    text_encoder, processor = _tiny_qwen3_vl(sizes, sizes.seed + 20, min_pixels=32 * 32)
    torch.manual_seed(sizes.seed + 21)
    vae = AutoencoderKLQwenImage21(  # four downsamples: 16x spatial, as the real one; z_dim is the DiT's input
        base_dim=8, decoder_base_dim=8, z_dim=64, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
        latents_mean=[0.0] * 64, latents_std=[1.0] * 64,
    ).eval()
    torch.manual_seed(sizes.seed + 22)
    head_dim = sizes.dit_head_dim
    transformer = QwenImage21Transformer2DModel(
        num_layers=sizes.dit_layers, attention_head_dim=head_dim, num_attention_heads=sizes.dit_heads,
        context_in_dim=sizes.qwen3_text_hidden, axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
        shift=1.0, use_dynamic_shifting=True,
    )
    QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, processor=processor,
                        transformer=transformer).save_pretrained(out_dir)
    return out_dir


TRAINED_EDIT_MODEL = "qwen-image-edit-trained"
TINY_BRIDGE = "bridge-tokens"
TINY_REFERENCE_BRIDGE = "bridge-reference"


def build_tiny_zoo(root: str | Path, sizes: TinySizes = TinySizes(), overwrite: bool = False, trained: bool = False,
                   trained_recipe=None, bridge: bool = False, bridge_recipe=None, reference_bridge: bool = False,
                   reference_recipe=None) -> dict[str, Path]:
    """Writes the four tiny models under `root`; skips those already present unless `overwrite`.

    With `trained`, also `qwen-image-edit-trained`: the tiny edit pipeline with its VAE and DiT trained on
    the synthetic edit task (`tiny_edit_model.TinyEditTrainConfig`, or `trained_recipe`), cached like the
    rest: rebuilt only when missing or when the recipe changed. With `bridge` (implies `trained`), also
    `bridge-tokens`: a bridge trained for that model with the colour word hidden from Qwen2.5-VL
    (`tiny_bridge.TinyBridgeRecipe`, or `bridge_recipe`), retrained when its recipe or the edit model changed.
    With `reference_bridge` (implies `trained`), also `bridge-reference`: a bridge trained to carry a reference
    swatch only Qwen3-VL sees (`TinyBridgeRecipe(task="saw")`, or `reference_recipe`).
    """
    from bridgecore.zoo.tiny_bridge import TinyBridgeRecipe, train_tiny_bridge
    from bridgecore.zoo.tiny_edit_model import TinyEditTrainConfig, train_tiny_edit_model

    root = Path(root)
    targets = {
        "qwen3-vl": lambda p: build_qwen3_vl(p, sizes),
        "qwen-image-edit": lambda p: build_edit_pipeline(p, plus=False, sizes=sizes),
        "qwen-image-edit-plus": lambda p: build_edit_pipeline(p, plus=True, sizes=sizes),
        "qwen-image-2.1": lambda p: build_qwen_image_21(p, sizes),
    }
    stamps = {name: {"seed": sizes.seed} for name in targets}
    if trained or bridge or reference_bridge:
        recipe = trained_recipe or TinyEditTrainConfig(seed=sizes.seed)
        targets[TRAINED_EDIT_MODEL] = lambda p: train_tiny_edit_model(root / "qwen-image-edit", p, recipe)
        stamps[TRAINED_EDIT_MODEL] = {"seed": sizes.seed, "recipe": json.loads(recipe.fingerprint())}
    if bridge:
        chosen = bridge_recipe or TinyBridgeRecipe(seed=sizes.seed)
        targets[TINY_BRIDGE] = lambda p: train_tiny_bridge(root / TRAINED_EDIT_MODEL, root / "qwen3-vl", p, chosen)
        stamps[TINY_BRIDGE] = {"edit_model": stamps[TRAINED_EDIT_MODEL], "recipe": json.loads(chosen.fingerprint())}
    if reference_bridge:
        saw = reference_recipe or TinyBridgeRecipe(seed=sizes.seed, task="saw")
        targets[TINY_REFERENCE_BRIDGE] = lambda p: train_tiny_bridge(root / TRAINED_EDIT_MODEL, root / "qwen3-vl", p, saw)
        stamps[TINY_REFERENCE_BRIDGE] = {"edit_model": stamps[TRAINED_EDIT_MODEL], "recipe": json.loads(saw.fingerprint())}
    paths = {}
    root.mkdir(parents=True, exist_ok=True)
    # processes sharing one zoo (parallel test workers, two jobs started at once on the tiny fallback) build each
    # model once: the others wait, then find its marker
    with FileLock(root / ".tiny-zoo.lock"):
        for name, build in targets.items():
            path = root / name
            marker = path / ".tiny-zoo-complete"
            if overwrite or not marker.exists() or json.loads(marker.read_text()) != stamps[name]:
                logger.info("building tiny %s in %s", name, path)
                path.mkdir(parents=True, exist_ok=True)
                build(path)
                marker.write_text(json.dumps(stamps[name]))
            paths[name] = path
    return paths


def tiny_plus_model_beside(edit_model: str) -> str | None:
    """The tiny zoo's Edit-Plus model when `edit_model` is one of the zoo's models (decided from the files alone):
    the application's policy for `JobSettings.for_job(plus_model_beside=...)`."""
    edit = Path(edit_model)
    plus = edit.parent / "qwen-image-edit-plus"
    if (edit / ".tiny-zoo-complete").is_file() and (plus / ".tiny-zoo-complete").is_file():
        return str(plus)
    return None


def build_tiny_lora(out_file: str | Path, edit_model: str | Path, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA for the tiny edit pipeline's DiT, with random (non-zero) up-projections so it changes outputs,
    saved in diffusers' LoRA format (`load_lora_weights` reads it). Offline."""
    from diffusers import QwenImageEditPipeline, QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out_file = Path(out_file)
    transformer = QwenImageTransformer2DModel.from_pretrained(edit_model, subfolder="transformer")
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                       "add_k_proj", "add_v_proj", "to_add_out"]))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    QwenImageEditPipeline.save_lora_weights(out_file.parent, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                            weight_name=out_file.name)
    return out_file
