"""The per-sample vision cache: the contract between extraction, the bridge, training and storage.

One sample is one safetensors blob. Tensor names:

    qwen25.prompt_embeds        [L, D25]   what Qwen-Image-Edit's DiT reads (system prefix dropped)
    qwen25.prompt_embeds_mask   [L]        1 on real tokens
    qwen25.input_ids            [L]        the kept token ids
    qwen25.vision_positions     [N25]      image-token indices in prompt_embeds
    qwen25.grid_thw             [n, 3]     Qwen2.5-VL patch grids (14 px patches, 2x2 merge)
    qwen3.early|mid|late        [L3, D3]   Qwen3-VL LLM hidden states at three depths
    qwen3.deepstack.<i>         [N3, D3]   DeepStack visual features of vision block i (merged)
    qwen3.input_ids             [L3]
    qwen3.vision_positions      [N3]       image-token indices in the Qwen3 sequence
    qwen3.grid_thw              [n, 3]     Qwen3-VL patch grids (16 px patches, 2x2 merge); the last
                                           `reference_images` of them are reference pictures only Qwen3-VL read

Metadata (model ids, revisions, layer indices, prompt, image sizes, dtype, format version) is one
JSON string under the header key `vision_bridge`. No pickle anywhere; bf16 round-trips bit-exactly.

Storage dtypes (`cache_to_bytes(cache, storage_dtype)`) for Qwen3-VL's feature tensors (`qwen3.early|mid|late`,
`qwen3.deepstack.<i>`), each about half the bytes of bf16; reading restores the dtype the cache was computed in:
- "fp8": float8 E4M3 (safetensors' F8_E4M3) with one float32 scale per token (`<name>.scale`, [L, 1], the token's
  absmax / 448). E4M3 keeps 3 mantissa bits: ~2.5% relative error per value, whatever the scale.
- "int8": the tensor's per-channel mean over its tokens (`<name>.mean`, [1, D] float32) is taken out, the rest is
  int8 with one float32 scale per token and group of 128 channels (`<name>.scale`, [L, ceil(D/128)], absmax / 127).
  Hidden states share a large per-channel component across tokens (55-65% of their energy on the tiny Qwen3-VL)
  that carries nothing a token says; removing it and scaling per group (an outlier channel costs only its own
  group's precision) gives ~0.4% relative error on the tiny model's levels against fp8's ~2.5%.

Qwen2.5-VL's `prompt_embeds` stay as computed: they are the DiT's own conditioning, and "no bridge" must stay exactly
Qwen-Image-Edit.

A rewritten instruction's encoding (stage `rewrites`) is the `qwen25.*` half alone: see `payloads.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT_VERSION = 1
METADATA_KEY = "vision_bridge"
LEVEL_NAMES = ("early", "mid", "late")


@dataclass
class Qwen3VisionCache:
    """Qwen3-VL multi-level features of one sample."""

    levels: dict[str, torch.Tensor]  # name -> [L3, D3]
    deepstack: dict[int, torch.Tensor]  # vision block index -> [N3, D3]
    input_ids: torch.Tensor  # [L3]
    vision_positions: torch.Tensor  # [N3]
    grid_thw: torch.Tensor  # [n_images, 3]
    layer_indices: dict[str, int]
    model_id: str
    revision: str
    image_digest: str = ""  # sha256 of the resized condition pixels: ties the two caches to one sample
    reference_images: int = 0  # trailing images only Qwen3-VL read (not the DiT's condition images)
    reference_digest: str = ""  # sha256 of the resized reference pixels

    @property
    def hidden_size(self) -> int:
        return next(iter(self.levels.values())).shape[-1]

    @property
    def condition_images(self) -> int:
        """Images shared with the Qwen2.5-VL cache (the DiT's own condition images)."""
        return int(self.grid_thw.shape[0]) - self.reference_images

    @property
    def num_vision_tokens(self) -> int:
        return int(self.vision_positions.numel())


@dataclass
class Qwen25VisionCache:
    """Qwen-Image-Edit's Qwen2.5-VL prompt embeddings of one sample (the DiT's conditioning)."""

    prompt_embeds: torch.Tensor  # [L, D25]
    prompt_embeds_mask: torch.Tensor  # [L]
    input_ids: torch.Tensor  # [L]
    vision_positions: torch.Tensor  # [N25]
    grid_thw: torch.Tensor  # [n_images, 3]
    model_id: str
    revision: str
    template: str  # "edit" or "edit_plus"
    drop_idx: int
    image_digest: str = ""

    @property
    def hidden_size(self) -> int:
        return self.prompt_embeds.shape[-1]

    @property
    def num_vision_tokens(self) -> int:
        return int(self.vision_positions.numel())


@dataclass
class SampleCache:
    """Both caches of one (images, instruction) sample plus what produced them."""

    qwen3: Qwen3VisionCache
    qwen25: Qwen25VisionCache
    prompt: str
    image_sizes: list[tuple[int, int]]  # original (width, height) of each input image
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "prompt": self.prompt,
            "image_sizes": [list(s) for s in self.image_sizes],
            "dtype": str(self.qwen25.prompt_embeds.dtype).removeprefix("torch."),
            "qwen3": {"model_id": self.qwen3.model_id, "revision": self.qwen3.revision,
                      "layer_indices": self.qwen3.layer_indices, "deepstack_indices": sorted(self.qwen3.deepstack),
                      "image_digest": self.qwen3.image_digest,
                      **({"reference_images": self.qwen3.reference_images,
                          "reference_digest": self.qwen3.reference_digest} if self.qwen3.reference_images else {})},
            "qwen25": qwen25_metadata(self.qwen25),
            "extra": self.extra,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        q3 = self.qwen3
        tensors = {
            **qwen25_tensors(self.qwen25),
            "qwen3.input_ids": q3.input_ids,
            "qwen3.vision_positions": q3.vision_positions,
            "qwen3.grid_thw": q3.grid_thw,
        }
        tensors.update({f"qwen3.{name}": value for name, value in q3.levels.items()})
        tensors.update({f"qwen3.deepstack.{index}": value for index, value in q3.deepstack.items()})
        return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}


STORAGE_DTYPES = ("native", "fp8", "int8")
FP8_MAX = 448.0  # the largest finite float8 E4M3 value
INT8_GROUP = 128  # channels that share an int8 scale within a token
FEATURE_PREFIXES = ("qwen3.early", "qwen3.mid", "qwen3.late", "qwen3.deepstack.")


def is_feature(name: str) -> bool:
    """The large Qwen3-VL float tensors a storage dtype applies to (not ids, positions, grids; never the DiT's own
    Qwen2.5-VL conditioning)."""
    return name.startswith(FEATURE_PREFIXES) and not name.endswith((".scale", ".mean"))


def quantize_fp8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[L, D]` -> (float8 E4M3 `[L, D]`, float32 per-token scales `[L, 1]`): each token scaled to E4M3's range."""
    values = tensor.float()
    scale = values.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (values / scale).to(torch.float8_e4m3fn), scale


def dequantize_fp8(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (quantized.float() * scale).to(dtype)


def int8_groups(width: int) -> int:
    """Scale groups a token of `width` channels has (the last one shorter): what int8 storage stores, and prices."""
    return -(-width // INT8_GROUP)


def quantize_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[L, D]` -> (int8 `[L, D]`, float32 scales `[L, ceil(D/128)]`, float32 channel means `[1, D]`): the
    per-channel mean over the tokens taken out, the rest scaled per token and group of 128 channels."""
    values = tensor.float()
    mean = values.mean(dim=0, keepdim=True) if len(values) else values.new_zeros(1, values.shape[-1])
    centred = values - mean
    groups = int8_groups(values.shape[-1])
    padded = torch.nn.functional.pad(centred, (0, groups * INT8_GROUP - values.shape[-1]))
    blocks = padded.view(len(values), groups, INT8_GROUP)
    scale = blocks.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    quantized = (blocks / scale.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return quantized.view(len(values), -1)[:, : values.shape[-1]].contiguous(), scale, mean


def dequantize_int8(quantized: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    width = quantized.shape[-1]
    per_channel = scale.repeat_interleave(INT8_GROUP, dim=-1)[:, :width]
    return (quantized.float() * per_channel + mean).to(dtype)


def cache_to_bytes(cache: SampleCache, storage_dtype: str = "native") -> bytes:
    """One cache as safetensors bytes; `storage_dtype` "fp8" or "int8" stores Qwen3-VL's feature tensors in a byte a
    value plus their scales (see the module docstring)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}; got {storage_dtype!r}")
    tensors, metadata = cache.tensors(), cache.metadata()
    if storage_dtype == "fp8":
        for name in [n for n in tensors if is_feature(n)]:
            tensors[name], tensors[name + ".scale"] = quantize_fp8(tensors[name])
        metadata["storage_dtype"] = "fp8"
    elif storage_dtype == "int8":
        for name in [n for n in tensors if is_feature(n)]:
            tensors[name], tensors[name + ".scale"], tensors[name + ".mean"] = quantize_int8(tensors[name])
        metadata["storage_dtype"] = "int8"
    return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(metadata)})


def read_metadata(data: bytes) -> dict[str, Any]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not a vision-bridge cache: the safetensors header has no 'vision_bridge' metadata")
    return json.loads(raw)


def cache_from_bytes(data: bytes) -> SampleCache:
    meta = read_metadata(data)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"cache format version {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    tensors = load_safetensors(data)
    storage = meta.get("storage_dtype", "native")
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"cache storage dtype {storage!r} is not supported (expected one of {STORAGE_DTYPES})")
    if storage != "native":
        dtype = getattr(torch, meta.get("dtype", "bfloat16"))
        for name in [n for n in tensors if is_feature(n)]:
            if storage == "fp8":
                tensors[name] = dequantize_fp8(tensors[name], tensors.pop(name + ".scale"), dtype)
            else:
                tensors[name] = dequantize_int8(tensors[name], tensors.pop(name + ".scale"),
                                                tensors.pop(name + ".mean"), dtype)
    m3, m25 = meta["qwen3"], meta["qwen25"]
    qwen3 = Qwen3VisionCache(
        levels={name: tensors[f"qwen3.{name}"] for name in m3["layer_indices"]},
        deepstack={i: tensors[f"qwen3.deepstack.{i}"] for i in m3["deepstack_indices"]},
        input_ids=tensors["qwen3.input_ids"],
        vision_positions=tensors["qwen3.vision_positions"],
        grid_thw=tensors["qwen3.grid_thw"],
        layer_indices=m3["layer_indices"],
        model_id=m3["model_id"],
        revision=m3["revision"],
        image_digest=m3.get("image_digest", ""),
        reference_images=int(m3.get("reference_images", 0)),
        reference_digest=m3.get("reference_digest", ""),
    )
    return SampleCache(qwen3, qwen25_from(tensors, m25), meta["prompt"], [tuple(s) for s in meta["image_sizes"]],
                       meta.get("extra", {}))


def qwen25_tensors(q25: Qwen25VisionCache) -> dict[str, torch.Tensor]:
    return {"qwen25.prompt_embeds": q25.prompt_embeds, "qwen25.prompt_embeds_mask": q25.prompt_embeds_mask,
            "qwen25.input_ids": q25.input_ids, "qwen25.vision_positions": q25.vision_positions,
            "qwen25.grid_thw": q25.grid_thw}


def qwen25_metadata(q25: Qwen25VisionCache) -> dict[str, Any]:
    return {"model_id": q25.model_id, "revision": q25.revision, "template": q25.template, "drop_idx": q25.drop_idx,
            "image_digest": q25.image_digest}


def qwen25_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Qwen25VisionCache:
    return Qwen25VisionCache(
        prompt_embeds=tensors["qwen25.prompt_embeds"],
        prompt_embeds_mask=tensors["qwen25.prompt_embeds_mask"],
        input_ids=tensors["qwen25.input_ids"],
        vision_positions=tensors["qwen25.vision_positions"],
        grid_thw=tensors["qwen25.grid_thw"],
        model_id=meta["model_id"],
        revision=meta["revision"],
        template=meta["template"],
        drop_idx=meta["drop_idx"],
        image_digest=meta.get("image_digest", ""),
    )


def save_cache(cache: SampleCache, uri: str) -> None:
    """Writes one cache to a local path or fsspec URL."""
    import posixpath

    from bridgecore.storage import Storage

    Storage(posixpath.dirname(str(uri)) or ".").write_bytes(cache_to_bytes(cache), posixpath.basename(str(uri)))


def load_cache(uri: str) -> SampleCache:
    from bridgecore.storage import read_uri

    return cache_from_bytes(read_uri(str(uri)))
