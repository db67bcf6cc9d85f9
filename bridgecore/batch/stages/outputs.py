"""What each stage hands the stages after it: the name it commits under, its entry's extension, how it reads back.

Downstream stages name these objects (`item.output(FUSED)`) rather than a stage name and an extension as strings,
so a reader and the format it reads cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def _cache(data: bytes) -> Any:
    from bridgecore.model.cache_format import cache_from_bytes

    return cache_from_bytes(data)


def _negatives(data: bytes) -> Any:
    from bridgecore.model.payloads import negatives_from_bytes

    return negatives_from_bytes(data)


def _rewritten(data: bytes) -> Any:
    from bridgecore.model.payloads import rewritten_from_bytes

    return rewritten_from_bytes(data)


def _fused(data: bytes) -> Any:
    from bridgecore.model.payloads import fused_from_bytes

    return fused_from_bytes(data)


def _qwen21(data: bytes) -> Any:
    from bridgecore.model.payloads import qwen21_from_bytes

    return qwen21_from_bytes(data)


def _latents(data: bytes) -> Any:
    from bridgecore.model.payloads import latents_from_bytes

    return latents_from_bytes(data)


def _image(data: bytes) -> Any:
    from bridgecore.model.images import decode_image

    return decode_image(data, "the edit")


@dataclass(frozen=True)
class StageOutput:
    """One stage's per-sample output as its readers see it."""

    stage: str  # the stage's name (its output folder)
    extension: str  # the entry holding it in the stage's tar (or the object's suffix)
    decode: Callable[[bytes], Any]
    describes: str

    def read(self, payloads: dict[str, bytes]) -> Any:
        """The object from one sample's committed entries (extension -> bytes)."""
        return self.decode(payloads[self.extension])

    def entry(self, data: bytes) -> dict[str, bytes]:
        """One sample's entries for `SampleResult.done`."""
        return {self.extension: data}


CACHES = StageOutput("caches", "safetensors", _cache,
                     "SampleCache: Qwen3-VL levels and DeepStack, Qwen2.5-VL embeddings")
NEGATIVES = StageOutput("negatives", "safetensors", _negatives,
                        "the negative prompt's Qwen2.5-VL embeddings [L, D]")
REWRITES = StageOutput("rewrites", "safetensors", _rewritten, "(the rewrite's Qwen2.5-VL encoding, its text)")
FUSED = StageOutput("fused", "safetensors", _fused, "(prompt embeddings [L, D], negative embeddings or None)")
QWEN21_CACHES = StageOutput("qwen21-caches", "safetensors", _qwen21, "Qwen-Image-2.1's conditioning tensors")
LATENTS = StageOutput("latents", "safetensors", _latents, "(condition latents, target latents)")
EDITS = StageOutput("edits", "png", _image, "the edited image (PIL)")
QWEN21_EDITS = StageOutput("qwen21-edits", "png", _image, "the edited image (PIL)")
