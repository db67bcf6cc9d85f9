"""The edit pipeline's own VAE encoding of an image, as the DiT reads it: packed, normalised latents (the training
targets and conditions; see stage `latents`)."""

from __future__ import annotations


def encode_latents(pipe, image, width: int, height: int):
    """The edit pipeline's own VAE encoding: `[N, 4C]` packed, normalised latents."""
    import torch

    with torch.no_grad():
        return _encode(pipe, image, width, height)


def _encode(pipe, image, width: int, height: int):
    pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(image, height, width), height, width)
    pixels = pixels.unsqueeze(2).to(pipe.vae.device, pipe.vae.dtype)  # [1, 3, 1, H, W]
    latents = pipe._encode_vae_image(pixels, generator=None)  # [1, C, 1, h, w], normalised
    _, channels, _, h, w = latents.shape
    return pipe._pack_latents(latents, 1, channels, h, w)[0]
