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
- Batched CFG (exact): true CFG's positive and negative forwards run as one batch of two (`BatchedGuidanceHook`).
- FP8 (an approximation): torchao's float8 on the DiT blocks' linear layers, "dynamic" (activations and weights
  in FP8, FP8 tensor cores: compute capability >= 8.9; DiT 38 -> ~25 GiB) or "weights" (FP8 storage, bf16 compute;
  DiT 38 -> ~19 GiB).
- Step cache (an approximation): diffusers' First Block Cache.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bridgecore.options import option

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
            raise CannotRunHereError(f"LoRA {spec.source!r} could not be loaded: {type(error).__name__}: {error}. Give a "
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
    try:
        transformer.set_attention_backend(backend)
    except RuntimeError as error:  # diffusers' requirement checks (a package or a device missing): every sample
        raise CannotRunHereError(f"{option('attention_backend', backend)}: {error}") from None
    _AttentionBackendRegistry.set_active_backend(previous)


def compile_transformer(transformer, options: dict | None = None, whole: bool = False) -> None:
    """Regional compilation: `torch.compile` of each repeated block (they share one compiled graph). `whole`
    compiles the entire DiT instead (one graph: embedders, 60 blocks and head; longer to compile, no Python
    between blocks; with `options={"mode": "reduce-overhead"}` on a GPU it is replayed as a CUDA graph)."""
    # the step cache's hooks decide in Python, outside the graph (torch.compiler.disable): one graph per block
    # cannot hold them, so with the cache on the blocks compile with graph breaks
    options = {"fullgraph": not getattr(transformer, "is_cache_enabled", False)} | (options or {})
    if whole:
        transformer.compile(**options)
    else:
        transformer.compile_repeated_blocks(**options)


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


FP8_MODES = ("off", "dynamic", "weights")


class CannotRunHereError(ValueError):
    """The job's settings cannot run on this machine at all (e.g. FP8 matmuls without FP8 tensor cores): every
    sample would fail the same way, so the stage fails whole instead of committing a failure per sample."""


def conflicting_options(fp8: str = "off", dit_offload: bool = False, batch_cfg: bool = False,
                        step_cache: float = 0.0) -> tuple[str, str, str] | None:
    """The speed options that do not go together, checked once for the editor and the job settings alike:
    (option, option, why) for the first such pair, None when they all do; an unknown fp8 mode is refused."""
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {', '.join(FP8_MODES)}; got {fp8!r}")
    if fp8 != "off" and dit_offload:
        return "fp8", "dit_offload", "FP8 weights take the DiT from 38 GiB to ~19-25 GiB, which fits most cards without offload"
    if batch_cfg and step_cache:
        return "batch_cfg", "step_cache", "the step cache keeps one cache per CFG branch; use one of them"
    return None


def fp8_layer_names(transformer, modulation: bool = False) -> list[str]:
    """The DiT's linear layers that FP8 converts: the attention and MLP projections inside the repeated blocks
    (nearly all of its FLOPs; 13.6B of Qwen-Image's 20.4B parameters), and with `modulation` also the blocks'
    modulation layers (6.8B parameters but one row per image: no FLOPs to speed up, only memory to save). The
    embedders and the output head stay bf16; FP8 matmul kernels need both sides to be multiples of 16."""
    return [f"transformer_blocks.{name}" for name, module in transformer.transformer_blocks.named_modules()
            if isinstance(module, torch.nn.Linear) and (modulation or "_mod" not in name)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0]


def check_fp8_matmuls(device: torch.device) -> None:
    """Refuses FP8 tensor-core matmuls (fp8 "dynamic") on a device without them: compute capability >= 8.9."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is None or capability < (8, 9):
        where = f"compute capability {capability[0]}.{capability[1]}" if capability else device.type
        raise CannotRunHereError(
            f"{option('fp8', 'dynamic')} runs the DiT's matmuls on FP8 tensor cores: it needs a CUDA card of compute "
            f"capability 8.9 or later (L40S, RTX 4090, H100, H200, B200); this DiT is on {where}. "
            f"{option('fp8', 'weights')} stores the weights in FP8 and computes in bf16 on any device.")


def enable_fp8(transformer, mode: str) -> list[str]:
    """FP8 for the DiT's block projections (torchao), after any LoRA is fused. An approximation: the edits change
    (bench/gpu_realdim.py measures how much against the exact edit). Returns the converted layers' names.

    - "dynamic": the projections' weights and activations in FP8 (per-row scales, activations scaled per call):
      FP8 tensor-core matmuls, needs compute capability >= 8.9 (L40S, RTX 4090, H100, H200, B200); the modulation
      layers stay bf16 (they scale every activation). Qwen-Image's DiT: 38.1 -> ~25.4 GiB.
    - "weights": FP8 weights of the projections and the modulation layers, bf16 compute (any device): no speed-up,
      the DiT's weights drop to ~19.1 GiB.
    """
    if mode not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {', '.join(FP8_MODES)}; got {mode!r}")
    if mode == "off":
        return []
    if mode == "dynamic":
        check_fp8_matmuls(next(transformer.parameters()).device)
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError as error:
        raise ValueError(f"fp8 needs torchao (pip install 'vision-bridge[fp8]', torchao >= 0.17): {error}") from None
    names = fp8_layer_names(transformer, modulation=mode == "weights")
    chosen = set(names)
    config = (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if mode == "dynamic"
              else Float8WeightOnlyConfig())
    quantize_(transformer.transformer_blocks, config,
              filter_fn=lambda module, name: f"transformer_blocks.{name}" in chosen)
    logger.info("FP8 (%s): %d linear layers of the DiT's blocks converted", mode, len(names))
    return names


class _NoState:
    def reset(self, *args, **kwargs) -> None:
        pass


class BatchedGuidanceHook:
    """True CFG's two forwards per step as one batch of two (exact up to kernel rounding).

    The pipeline calls its DiT twice per step, in the cache contexts "cond" then "uncond", with the same latents
    and only the prompt embeddings (and their mask) differing. The hook learns the negative inputs at the first
    step's "uncond" call; at every later "cond" call it runs both branches as one batch (the shorter prompt padded
    and masked out: a padded key gets no attention, and the text positions start at the same RoPE index for both),
    returns the positive half and keeps the negative half for the "uncond" call that follows, which it answers
    without running the DiT when that call brings the same latents and negative embeddings (same tensors); any
    other call runs normally. Stateful, so the pipeline's end-of-call reset forgets the learnt inputs.
    """

    _is_stateful = True

    def __init__(self):
        from diffusers.hooks.hooks import StateManager

        self.fn_ref = None
        self.state_manager = StateManager(_NoState)  # receives the pipeline's cache context ("cond"/"uncond")
        self.negative: dict | None = None
        self.ahead: tuple | None = None  # (latents, negative inputs, negative output) of the current step
        self.batched_steps = 0
        self.mask_refused = False  # the attention backend raised on the padding mask: batch only unpadded pairs

    # diffusers.hooks.hooks.ModelHook's interface, duck-typed: importing diffusers.hooks takes ~3 s, and the job
    # settings import this module in processes that never load a model
    def initialize_hook(self, module):
        return module

    def deinitalize_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        return args, kwargs

    def post_forward(self, module, output):
        return output

    def reset_state(self, module):
        self.negative, self.ahead = None, None
        return module

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        context = self.state_manager._context
        if args or kwargs.get("return_dict", True) or context is None or context.name not in ("cond", "uncond"):
            return forward(*args, **kwargs)
        if context.name == "uncond":
            ahead, self.ahead = self.ahead, None
            if ahead is not None and ahead[0] is kwargs["hidden_states"] and ahead[1] == _negative_inputs(kwargs):
                return ahead[2]
            self.negative = _negative_inputs(kwargs)  # learnt: later steps batch the two branches
            return forward(**kwargs)
        self.ahead = None
        negative = self.negative
        if negative is None or negative["img_shapes"] != kwargs.get("img_shapes"):
            return forward(**kwargs)
        if self.mask_refused and _needs_mask(kwargs, negative):
            return forward(**kwargs)
        try:
            positive, negative_output = _batched_branches(forward, kwargs, negative)
        except ValueError as error:  # an attention backend without masks (flash-attn, native flash, ...)
            if "attn_mask" not in str(error):
                raise
            self.mask_refused = True
            logger.warning("batch_cfg: this attention backend takes no mask (%s), and prompts of different lengths "
                           "need one: true CFG's branches run one after the other", error)
            return forward(**kwargs)
        self.ahead = (kwargs["hidden_states"], negative, negative_output)
        self.batched_steps += 1
        return positive


class _Same:
    """Compares by identity: the pipeline passes the same tensor objects at every step."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Same) and other.value is self.value


def _negative_inputs(kwargs: dict) -> dict:
    return {"embeds": _Same(kwargs["encoder_hidden_states"]), "mask": _Same(kwargs.get("encoder_hidden_states_mask")),
            "img_shapes": kwargs.get("img_shapes"), "guidance": _Same(kwargs.get("guidance")),
            "attention_kwargs": kwargs.get("attention_kwargs")}


def _needs_mask(kwargs: dict, negative: dict) -> bool:
    return not (kwargs.get("encoder_hidden_states_mask") is None and negative["mask"].value is None
                and kwargs["encoder_hidden_states"].shape[1] == negative["embeds"].value.shape[1])


def _padded(embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, own = embeds.shape[:2]
    mask = torch.ones(batch, own, dtype=torch.bool, device=embeds.device) if mask is None else mask.to(torch.bool)
    return F.pad(embeds, (0, 0, 0, length - own)), F.pad(mask, (0, length - own), value=False)


def _batched_branches(forward, kwargs: dict, negative: dict):
    """One forward of [positive; negative]: returns the two branches' outputs, each as the DiT returns it."""
    pos_embeds, pos_mask = kwargs["encoder_hidden_states"], kwargs.get("encoder_hidden_states_mask")
    neg_embeds, neg_mask = negative["embeds"].value, negative["mask"].value
    batch = pos_embeds.shape[0]
    if not _needs_mask(kwargs, negative):
        embeds, mask = torch.cat([pos_embeds, neg_embeds]), None  # nothing to pad: the unmasked attention path
    else:
        length = max(pos_embeds.shape[1], neg_embeds.shape[1])
        (pos_embeds, pos_mask), (neg_embeds, neg_mask) = (_padded(pos_embeds, pos_mask, length),
                                                          _padded(neg_embeds, neg_mask, length))
        embeds, mask = torch.cat([pos_embeds, neg_embeds]), torch.cat([pos_mask, neg_mask])
    hidden = kwargs["hidden_states"]
    timestep = kwargs["timestep"]
    guidance = kwargs.get("guidance")
    both = dict(kwargs, hidden_states=torch.cat([hidden, hidden]), encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                timestep=torch.cat([timestep, timestep]) if timestep.ndim else timestep,
                guidance=torch.cat([guidance, guidance]) if guidance is not None and guidance.ndim else guidance,
                img_shapes=list(kwargs["img_shapes"]) * 2 if kwargs.get("img_shapes") is not None else None)
    output = forward(**both)
    sample, rest = output[0], tuple(output[1:])
    return (sample[:batch], *rest), (sample[batch:], *rest)


def enable_batched_cfg(transformer) -> BatchedGuidanceHook:
    """Runs true CFG's two branches as one batched forward (see `BatchedGuidanceHook`); exact, not an approximation."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook("batched_cfg") is None:
        registry.register_hook(BatchedGuidanceHook(), "batched_cfg")
    return registry.get_hook("batched_cfg")


def disable_batched_cfg(transformer) -> None:
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(transformer).remove_hook("batched_cfg", recurse=False)


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
