"""A tiny Qwen-Image-Edit whose conditioning matters: the tiny zoo's VAE and DiT, trained on CPU.

The random tiny zoo proves the machinery but cannot show information transfer: a random DiT ignores
what its prompt says. This trains, deterministically from a seed and in about a minute of CPU, the
tiny zoo's own `AutoencoderKLQwenImage` (to reconstruct the pictures, so decoded edits mean something)
and `QwenImageTransformer2DModel` (with Qwen-Image-Edit's flow-matching objective, on the embeddings the
zoo's frozen Qwen2.5-VL gives, M-RoPE-correct as at inference) on the synthetic edit task of
`synthetic_triplets.py`: "Make the <shape> <colour>". The text encoder stays the zoo's random one.
The result is a normal pipeline directory (`from_pretrained`), plus `training_report.json` (held-out
loss with correct vs shuffled instructions, edit success) and `edits_grid.png`.

    vision-bridge tiny-models DIR --trained     # DIR/qwen-image-edit-trained
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bridgecore.model.edit_prompt import EditPromptEncoder, pad_prompt_embeds
from bridgecore.zoo.synthetic_triplets import COLOURS, Triplet, edit_success, make_triplets
from bridgecore.training.trainer import TrainConfig, derangement, flow_matching_loss, sample_sigmas

logger = logging.getLogger(__name__)

REPORT_NAME = "training_report.json"
GRID_NAME = "edits_grid.png"
UNCONDITIONAL_PROMPT = " "  # Qwen's examples use " " as the negative prompt: trained as the unconditional branch


@dataclass
class TinyEditTrainConfig:
    """Recipe of the trained tiny edit model; its JSON is part of the zoo's cache key."""

    seed: int = 0
    image_size: int = 64
    train_triplets: int = 1024
    heldout_triplets: int = 64
    vae_encoder_steps: int = 100
    vae_decoder_steps: int = 600
    vae_batch_size: int = 16
    vae_crop: int = 32  # the VAE is convolutional: 32 px crops train it 4x faster than full pictures
    vae_learning_rate: float = 3e-3
    vae_latent_noise: float = 0.05  # relative to the latents' std
    dit_steps: int = 2000
    dit_batch_size: int = 32
    dit_learning_rate: float = 1e-3
    dit_warmup_steps: int = 100
    unconditional_fraction: float = 0.1  # prompt " " in 10% of samples, so true CFG has a trained negative
    heldout_repeats: int = 4
    grid_rows: int = 6
    inference_steps: int = 20

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# The same recipe, shorter: what the test suite trains once per session (its DiT already reads the instruction).
TEST_RECIPE = TinyEditTrainConfig(train_triplets=256, heldout_triplets=32, vae_encoder_steps=30, vae_decoder_steps=30,
                                  dit_steps=1200, grid_rows=3, inference_steps=10)


# -- data ------------------------------------------------------------------------------------------------


def _pixels(images) -> torch.Tensor:
    """PIL images -> [B, 3, 1, H, W] in [-1, 1], as the pipeline's image processor gives them to the VAE."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).unsqueeze(2)


@dataclass
class EncodedTriplets:
    """Tensors the DiT trains on: packed latents `[N, T, 4C]`, prompt embeddings per sample `[L_i, D]`."""

    triplets: list[Triplet]
    condition: torch.Tensor
    target: torch.Tensor
    embeds: list[torch.Tensor]
    unconditional: list[torch.Tensor]
    latent_hw: tuple[int, int]


@torch.no_grad()
def encode_pictures(pipe, images, batch_size: int = 64) -> torch.Tensor:
    """`batch.stages.latents.encode_latents` for many same-sized pictures at once: packed latents `[N, T, 4C]`."""
    width, height = images[0].size
    packed = []
    for start in range(0, len(images), batch_size):
        pixels = pipe.image_processor.preprocess(images[start:start + batch_size], height, width).unsqueeze(2)
        latents = pipe._encode_vae_image(pixels.to(pipe.vae.device, pipe.vae.dtype), generator=None)  # [B, C, 1, h, w]
        batch, channels, _, h, w = latents.shape
        packed.append(pipe._pack_latents(latents, batch, channels, h, w))
    return torch.cat(packed)


@torch.no_grad()
def encode_prompts(encoder: EditPromptEncoder, triplets: list[Triplet], prompts: list[str],
                   batch_size: int = 64) -> list[torch.Tensor]:
    """Qwen2.5-VL embeddings `[L_i, D]` of (each triplet's source picture, the given prompt), batched."""
    embeds = []
    for start in range(0, len(triplets), batch_size):
        images = [[t.source] for t in triplets[start:start + batch_size]]
        encoding = encoder.encode(prompts[start:start + batch_size], images)
        embeds.extend(encoding.prompt_embeds[b, : len(encoding.input_ids[b])].clone() for b in range(len(images)))
    return embeds


@torch.no_grad()
def encode_triplets(pipe, encoder: EditPromptEncoder, triplets: list[Triplet]) -> EncodedTriplets:
    """VAE latents (the pipeline's own encoding) and Qwen2.5-VL embeddings of correct and " " prompts."""
    size = triplets[0].source.size
    condition = encode_pictures(pipe, [t.source for t in triplets])
    target = encode_pictures(pipe, [t.target for t in triplets])
    embeds = encode_prompts(encoder, triplets, [t.instruction for t in triplets])
    unconditional = encode_prompts(encoder, triplets, [UNCONDITIONAL_PROMPT] * len(triplets))
    latent_hw = (size[1] // 16, size[0] // 16)
    return EncodedTriplets(triplets, condition, target, embeds, unconditional, latent_hw)


# -- training --------------------------------------------------------------------------------------------


def _cosine_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _crops(pictures: torch.Tensor, config: TinyEditTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """A batch of random crops (offsets on the 8 px latent grid) of random pictures: `[B, 3, 1, crop, crop]`."""
    index = torch.randint(0, pictures.shape[0], (config.vae_batch_size,), generator=generator)
    y, x = (int(v) for v in torch.randint(0, (config.image_size - config.vae_crop) // 8 + 1, (2,), generator=generator) * 8)
    return pictures[index][..., y:y + config.vae_crop, x:x + config.vae_crop]


def train_vae(vae, triplets: list[Triplet], config: TinyEditTrainConfig) -> dict[str, list[float]]:
    """Two stages, each learning in seconds (trained end to end from random init, this tiny channel-normalised
    VAE stalls for hundreds of steps at one mean colour):

    1. encoder: latent channels 0-2 regress the picture downsampled 8x (its colours); channel 3 is free;
    2. decoder: reconstruction (MSE) from the frozen encoder's latents plus a little noise (the DiT's latents
       are never exact).
    """
    pictures = _pixels([image for t in triplets for image in (t.source, t.target)])  # [2N, 3, 1, H, W]
    generator = torch.Generator().manual_seed(config.seed)
    losses: dict[str, list[float]] = {"encoder": [], "decoder": []}
    encoder = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.train().requires_grad_(False)
    from bridgecore.console import bar

    for stage, parameters, steps in (("encoder", encoder, config.vae_encoder_steps),
                                     ("decoder", decoder, config.vae_decoder_steps)):
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(parameters, lr=config.vae_learning_rate)
        for _ in bar(range(steps), desc=f"tiny VAE {stage}", unit="step", leave=False):
            batch = _crops(pictures, config, generator)
            if stage == "encoder":
                latents = vae.encode(batch).latent_dist.mode()
                loss = F.mse_loss(latents[:, :3], F.avg_pool3d(batch, (1, 8, 8)))
            else:
                with torch.no_grad():
                    latents = vae.encode(batch).latent_dist.mode()
                noisy = latents + config.vae_latent_noise * latents.std() * torch.randn(latents.shape, generator=generator)
                loss = F.mse_loss(vae.decode(noisy).sample, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses[stage].append(loss.item())
        for parameter in parameters:
            parameter.requires_grad_(False)
    vae.eval()
    return losses


@torch.no_grad()
def set_latent_statistics(vae, triplets: list[Triplet]) -> None:
    """Per-channel mean/std of the trained VAE's latents, stored where the pipelines read them."""
    modes = torch.cat([vae.encode(_pixels([t.source for t in triplets[i:i + 64]])).latent_dist.mode()
                       for i in range(0, len(triplets), 64)])  # [N, C, 1, h, w]
    channels = modes.transpose(0, 1).flatten(1)
    vae.register_to_config(latents_mean=channels.mean(1).tolist(), latents_std=channels.std(1).tolist())


def _batch_embeds(data: EncodedTriplets, index: list[int], unconditional: list[bool]):
    chosen = [data.unconditional[i] if u else data.embeds[i] for i, u in zip(index, unconditional)]
    return pad_prompt_embeds(chosen)


def train_dit(pipe, data: EncodedTriplets, config: TinyEditTrainConfig) -> list[float]:
    """Qwen-Image-Edit's flow-matching loss (the bridge trainer's own), on the cached tensors."""
    transformer = pipe.transformer
    transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.dit_learning_rate, weight_decay=0.01)
    schedule = _cosine_schedule(optimizer, config.dit_warmup_steps, config.dit_steps)
    generator = torch.Generator().manual_seed(config.seed + 1)
    sigma_config = TrainConfig()
    losses = []
    from bridgecore.console import bar

    for _ in bar(range(config.dit_steps), desc="tiny DiT", unit="step", leave=False):
        index = torch.randint(0, len(data.embeds), (config.dit_batch_size,), generator=generator).tolist()
        drop = (torch.rand(len(index), generator=generator) < config.unconditional_fraction).tolist()
        embeds, mask = _batch_embeds(data, index, drop)
        target = data.target[index]
        noise = torch.randn(target.shape, generator=generator)
        sigmas = sample_sigmas(pipe.scheduler, target.shape[1], len(index), generator, sigma_config)
        loss = flow_matching_loss(transformer, embeds, mask, data.condition[index], target, data.latent_hw, noise, sigmas)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    transformer.eval().requires_grad_(False)
    return losses


# -- evaluation ------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_losses(pipe, data: EncodedTriplets, embeds: list[torch.Tensor], repeats: int, seed: int) -> np.ndarray:
    """Per-sample flow-matching loss with fixed noise and sigmas per (sample, repeat): `[N]`."""
    losses = np.zeros(len(embeds))
    for i, sample_embeds in enumerate(embeds):
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        target = data.target[i:i + 1].expand(repeats, -1, -1)
        noise = torch.randn(target.shape, generator=generator)
        sigmas = sample_sigmas(pipe.scheduler, target.shape[1], repeats, generator, TrainConfig())
        batch, mask = pad_prompt_embeds([sample_embeds] * repeats)
        losses[i] = flow_matching_loss(pipe.transformer, batch, mask, data.condition[i:i + 1].expand(repeats, -1, -1),
                                       target, data.latent_hw, noise, sigmas).item()
    return losses


def edit_grid(rows: list[tuple[Triplet, object, str, object]], scale: int = 3):
    """source | target | edit (its instruction) | edit (another instruction), labelled, one row per sample."""
    from PIL import Image, ImageDraw

    size = rows[0][0].source.width * scale
    label_height, columns = 14, 4
    grid = Image.new("RGB", (columns * size, len(rows) * (size + 2 * label_height)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (triplet, edited, other_instruction, other_edit) in enumerate(rows):
        y = r * (size + 2 * label_height)
        panels = [("source", triplet.source), ("target", triplet.target), (triplet.instruction, edited),
                  (other_instruction, other_edit)]
        for c, (label, image) in enumerate(panels):
            grid.paste(image.convert("RGB").resize((size, size), Image.NEAREST), (c * size, y + 2 * label_height))
            draw.text((c * size + 2, y + 1), label[:30], fill=(0, 0, 0))
    return grid


def _other_instruction(triplet: Triplet) -> str:
    """The same picture, the other shape, another colour: shows that the edit follows the words."""
    other_shape = "circle" if triplet.shape == "square" else "square"
    current = triplet.shapes[other_shape][0]
    colour = next(c for c in COLOURS if c not in (current, triplet.colour))
    return f"Make the {other_shape} {colour}"


# -- the recipe ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_thread():
    """Tiny models are overhead-bound: one intra-op thread is as fast, gives the same bits on any machine, and
    is immune to OpenMP oversubscription on a shared CPU (measured: 2 threads 30x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_tiny_edit_model(random_pipeline_dir: str | Path, out_dir: str | Path,
                          config: TinyEditTrainConfig = TinyEditTrainConfig()) -> dict:
    """Trains the VAE and the DiT of a tiny zoo pipeline and saves the trained pipeline to `out_dir`."""
    with one_thread():
        return _train_tiny_edit_model(random_pipeline_dir, out_dir, config)


def _train_tiny_edit_model(random_pipeline_dir: str | Path, out_dir: str | Path, config: TinyEditTrainConfig) -> dict:
    from diffusers import QwenImageEditPipeline

    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit
    from bridgecore.stats import bootstrap_ci

    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    pipe = QwenImageEditPipeline.from_pretrained(random_pipeline_dir)
    pipe.text_encoder.requires_grad_(False)
    area = config.image_size**2
    triplets = make_triplets(config.train_triplets + config.heldout_triplets, config.image_size, config.seed)
    train, heldout = triplets[: config.train_triplets], triplets[config.train_triplets:]
    # 1. VAE: reconstruct the pictures; latent statistics go in its config, as the real VAE's do.
    vae_losses = train_vae(pipe.vae, train, config)
    set_latent_statistics(pipe.vae, train)
    # 2. DiT on cached latents and embeddings (the frozen Qwen2.5-VL, as the edit pipeline encodes).
    encoder = EditPromptEncoder(pipe.text_encoder, pipe.processor, condition_area=area)
    train_data, heldout_data = encode_triplets(pipe, encoder, train), encode_triplets(pipe, encoder, heldout)
    dit_losses = train_dit(pipe, train_data, config)
    pipe.save_pretrained(out_dir)
    # 3. Evidence that the instruction matters: held-out loss with the correct instructions vs the same
    #    pictures with another sample's instruction (only the words differ).
    shuffled = encode_prompts(encoder, heldout, [heldout[j].instruction for j in derangement(len(heldout), config.seed)])
    correct = heldout_losses(pipe, heldout_data, heldout_data.embeds, config.heldout_repeats, config.seed)
    wrong = heldout_losses(pipe, heldout_data, shuffled, config.heldout_repeats, config.seed)
    # 4. Decoded edits, through the saved directory and the library's own editor (baseline path: no Qwen3-VL).
    editor = EnhancedQwenImageEdit(out_dir, "qwen3-not-loaded", device="cpu", condition_area=area)
    sources = [t.source for t in heldout]
    edits = editor.generate(sources, [t.instruction for t in heldout], use_qwen3_vision=False, seed=config.seed,
                            num_inference_steps=config.inference_steps, true_cfg_scale=1.0)
    success = [edit_success(t, e) for t, e in zip(heldout, edits)]
    rows = heldout[: config.grid_rows]
    others = [_other_instruction(t) for t in rows]
    other_edits = editor.generate([t.source for t in rows], others, use_qwen3_vision=False, seed=config.seed,
                                  num_inference_steps=config.inference_steps, true_cfg_scale=1.0)
    edit_grid(list(zip(rows, edits, others, other_edits))).save(out_dir / GRID_NAME)
    report = {
        "heldout_loss_correct_instruction": float(correct.mean()),
        "heldout_loss_shuffled_instruction": float(wrong.mean()),
        "instruction_gain": float((wrong - correct).mean()),
        "instruction_gain_ci": list(bootstrap_ci(wrong - correct, seed=config.seed)),
        "heldout_edit_success": float(np.mean(success)),
        "heldout_samples": len(heldout),
        "final_vae_encoder_loss": float(np.mean(vae_losses["encoder"][-20:])),
        "final_vae_reconstruction_loss": float(np.mean(vae_losses["decoder"][-20:])),
        "final_dit_loss": float(np.mean(dit_losses[-50:])),
        "config": asdict(config),
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))
    logger.info("tiny edit model: held-out loss %.4f (correct instruction) vs %.4f (shuffled); edit success %.2f",
                report["heldout_loss_correct_instruction"], report["heldout_loss_shuffled_instruction"],
                report["heldout_edit_success"])
    return report
