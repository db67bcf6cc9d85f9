"""Stage `latents`: VAE latents of a training triplet's condition images and target (GPU; training data).

The edit pipeline's own VAE encoding (resize to the condition size, normalise, argmax latents, pack),
so training sees exactly what the pipeline would. Reads only the plan (images), not the caches.
"""

from __future__ import annotations

from ..records import SampleResult
from ..settings import JobSettings
from ..stage import Stage, StageContext, StageItem


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


class LatentsStage(Stage):
    name = "latents"
    models = ("dit",)
    code = ("edit_prompt", "images")

    def settings_of(self, settings: JobSettings) -> dict:
        return {"edit_model": settings.edit_model, "edit_revision": settings.revision(settings.edit_model),
                "condition_area": settings.condition_area}

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        import torch
        from safetensors.torch import save as save_tensors

        from ...edit_prompt import condition_size
        from ...images import load_image

        pipe = ctx.models.editor.pipe
        results = []
        for item in items:
            sample = item.sample
            if not sample.target:
                results.append(SampleResult.failed(sample, "no target image: not a training triplet"))
                continue
            # Every condition image is VAE-encoded at its own size, as the pipelines do (Edit-Plus: several);
            # the output takes the size of the last one (Edit-Plus sizes its output from `image[-1]`).
            sources, target = [load_image(uri) for uri in sample.images], load_image(sample.target)
            if sources[-1].size != target.size:
                results.append(SampleResult.failed(
                    sample, f"target size {target.size} differs from source size {sources[-1].size}"))
                continue
            sizes = [condition_size(source, ctx.settings.condition_area) for source in sources]
            conditions = [encode_latents(pipe, source, w, h) for source, (w, h) in zip(sources, sizes)]
            width, height = sizes[-1]
            tensors = {"condition": torch.cat(conditions), "target": encode_latents(pipe, target, width, height)}
            payload = save_tensors({k: v.cpu().contiguous() for k, v in tensors.items()})
            results.append(SampleResult.done(sample, {"safetensors": payload}, latent_hw=[height // 16, width // 16],
                                             condition_hw=[[h // 16, w // 16] for w, h in sizes]))
        return results
