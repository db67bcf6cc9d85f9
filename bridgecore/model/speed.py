"""Speed options of the edit pipeline: LoRAs (few-step Lightning ones included), regional compilation,
the attention backend, and streaming the DiT's blocks from host RAM for small cards.

All of them act on the diffusers pipeline after it is loaded (`EnhancedQwenImageEdit(lora=..., compile=True,
attention_backend=..., dit_offload=True)`, `vision-bridge edit --lora ... --compile ...`):

- LoRA: `PATH_OR_ID[:scale]`: a `.safetensors` file, a directory, a hub repo (`owner/name`) or a file in a
  hub repo (`owner/name/path/file.safetensors`). Loaded with diffusers' `load_lora_weights`, weighted with
  `set_adapters`, then fused into the DiT weights and the adapter layers removed: no per-step cost.
- Lightning (lightx2v/Qwen-Image-Lightning, 4- or 8-step distillations): they need the scheduler they were
  distilled with (a fixed exponential shift of 3: `base_shift = max_shift = log 3`, no terminal stretch),
  `true_cfg_scale` 1 (CFG is distilled in) and 4 or 8 steps. `scheduler="auto"` switches to it when a LoRA's
  name contains "lightning"; the step count is read from the name ("8steps").
- Compile: `torch.compile` of the repeated transformer block only (diffusers `compile_repeated_blocks`):
  one block compiles and is reused 60 times, so compile time stays short.
- Attention backend: diffusers' attention dispatcher (`"native"` = torch SDPA, `"_native_cudnn"`,
  `"_native_flash"`, `"flash"` with flash-attn installed, ...).
- DiT offload: diffusers group offloading at block level, with CUDA streams prefetching the next block: the
  20B DiT's blocks live in host RAM, so the DiT needs a few GiB of GPU memory (`vision-bridge plan` prints the
  peak per mode).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# What Qwen-Image-Lightning's `generate_with_diffusers.py` sets on Qwen-Image's FlowMatchEulerDiscreteScheduler
# ("We use shift=3 in distillation"); the other fields equal Qwen-Image's own scheduler config.
LIGHTNING_SCHEDULER_OVERRIDES = dict(base_shift=math.log(3), max_shift=math.log(3), shift=1.0, shift_terminal=None,
                                     time_shift_type="exponential", use_dynamic_shifting=True)
SCHEDULER_CHOICES = ("auto", "default", "lightning")
_STEPS_IN_NAME = re.compile(r"(\d+)[-_ ]?steps?", re.IGNORECASE)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: where it is and its weight."""

    source: str
    scale: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> "LoraSpec":
        """`PATH_OR_ID[:scale]`, e.g. `lightx2v/Qwen-Image-Lightning/Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors:1.0`."""
        source, scale = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep:
            try:
                source, scale = head, float(tail)
            except ValueError:  # a ':' that is part of the path
                pass
        if not source.strip():
            raise ValueError(f"--lora needs PATH_OR_ID[:scale]; got {spec!r}")
        if not math.isfinite(scale):
            raise ValueError(f"LoRA scale must be a finite number; got {spec!r}")
        return cls(source, scale)

    @property
    def is_lightning(self) -> bool:
        return "lightning" in self.source.lower()

    @property
    def distilled_steps(self) -> int | None:
        """The step count a distilled LoRA was trained for, read from its name ("...-8steps-..."), if any."""
        found = _STEPS_IN_NAME.search(Path(self.source).name) or _STEPS_IN_NAME.search(self.source)
        return int(found.group(1)) if found else None

    def load_arguments(self) -> tuple[str, dict]:
        """(`pretrained_model_name_or_path`, kwargs) for diffusers' `load_lora_weights`."""
        path = Path(self.source).expanduser()
        if path.exists():
            return str(path), {}
        parts = self.source.split("/")
        if len(parts) > 2:  # owner/name/path/in/repo.safetensors
            return "/".join(parts[:2]), {"weight_name": "/".join(parts[2:])}
        if len(parts) == 2 and not self.source.startswith((".", "/", "~")):
            return self.source, {}
        raise ValueError(f"LoRA {self.source!r}: no such file or directory, and not a hub id (owner/name[/file])")


def parse_loras(specs: list[str] | tuple[str, ...] | str | None) -> list[LoraSpec]:
    if specs is None:
        return []
    if isinstance(specs, (str, LoraSpec)):
        specs = [specs]
    return [s if isinstance(s, LoraSpec) else LoraSpec.parse(s) for s in specs]


def resolve_scheduler(choice: str, loras: list[LoraSpec]) -> str:
    """"default" or "lightning": `auto` picks Lightning's scheduler when a Lightning LoRA is given."""
    if choice not in SCHEDULER_CHOICES:
        raise ValueError(f"scheduler must be one of {SCHEDULER_CHOICES}; got {choice!r}")
    if choice == "auto":
        return "lightning" if any(spec.is_lightning for spec in loras) else "default"
    return choice


def default_steps(loras: list[LoraSpec], scheduler: str, fallback: int = 50) -> int:
    """The step count to use when none is given: a distilled LoRA's own (4 or 8), else `fallback`."""
    if scheduler == "lightning":
        counts = {spec.distilled_steps for spec in loras if spec.distilled_steps}
        if len(counts) == 1:
            return counts.pop()
        logger.warning("Lightning scheduler without a step count in the LoRA name; using 8 steps")
        return 8
    return fallback


def load_loras(pipe, loras: list[LoraSpec], fuse: bool = True) -> None:
    """Loads, weights and (by default) fuses `loras` into the pipeline's DiT."""
    if not loras:
        return
    names = []
    for index, spec in enumerate(loras):
        source, kwargs = spec.load_arguments()
        name = f"lora_{index}"
        try:
            pipe.load_lora_weights(source, adapter_name=name, **kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(f"LoRA {spec.source!r} could not be loaded: {type(error).__name__}: {error}. Give a "
                             "local .safetensors file or directory, or pre-download the hub repo "
                             "(`hf download OWNER/NAME`) when offline.") from None
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[spec.scale for spec in loras])
    if fuse:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go (no per-step overhead)
    logger.info("LoRAs %s %s", ", ".join(f"{s.source} x{s.scale:g}" for s in loras), "fused" if fuse else "active")


def use_lightning_scheduler(pipe) -> None:
    """Replaces the pipeline's scheduler by the one Qwen-Image-Lightning was distilled with."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**pipe.scheduler.config,
                                                                  **LIGHTNING_SCHEDULER_OVERRIDES})


def attention_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return sorted(member.value for member in AttentionBackendName)


def set_attention_backend(transformer, backend: str) -> None:
    """Routes this DiT's attention through diffusers' dispatcher backend `backend` (checks its requirements).

    diffusers also makes `backend` the process-wide default for every other model; that default is put back,
    so only this transformer changes (its processors name their backend explicitly)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    if backend not in attention_backends():
        raise ValueError(f"attention_backend must be one of {attention_backends()}; got {backend!r}")
    previous = _AttentionBackendRegistry._active_backend
    transformer.set_attention_backend(backend)
    _AttentionBackendRegistry.set_active_backend(previous)


def compile_transformer(transformer, options: dict | None = None) -> None:
    """Regional compilation: `torch.compile` of each repeated block (they share one compiled graph)."""
    transformer.compile_repeated_blocks(**({"fullgraph": True} | (options or {})))


def enable_dit_offload(transformer, device: torch.device) -> None:
    """Keeps the DiT's blocks in host RAM and streams them in one at a time (prefetching on a CUDA stream)."""
    transformer.to("cpu")
    cuda = device.type == "cuda"
    transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                     offload_type="block_level", num_blocks_per_group=1, use_stream=cuda,
                                     non_blocking=cuda)


def enable_step_cache(transformer, threshold: float) -> None:
    """The fast mode's step cache: diffusers' First Block Cache. At each step the first block runs; when its output
    moved less than `threshold` (relative L1) since the last full step, the remaining blocks are skipped and their
    cached residual is added. The pipeline keeps separate caches for true CFG's two branches ("cond", "uncond").
    An approximation: the edits change (how much is measured by bench/gpu_realdim.py on the same seeds)."""
    from diffusers.hooks import FirstBlockCacheConfig

    if not 0 < threshold < 1:
        raise ValueError(f"step_cache must be in (0, 1); got {threshold}")
    if len(getattr(transformer, "transformer_blocks", ())) < 2:  # a head block to decide, a tail to skip
        raise ValueError("the step cache needs a DiT with at least two transformer blocks")
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def output_fingerprint(loras: list[LoraSpec], scheduler: str) -> str:
    """What the speed options change in the outputs (LoRA contents and weights, scheduler): part of a cache key.
    Compile and the attention backend change only rounding and are left out."""
    digest = hashlib.sha256(scheduler.encode())
    for spec in loras:
        digest.update(f"|{spec.source}|{spec.scale!r}".encode())
        path = Path(spec.source).expanduser()
        files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
        for file in files:
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]
