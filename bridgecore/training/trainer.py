"""Training the bridge against the frozen DiT with Qwen-Image-Edit's own flow-matching loss.

C2C-style: the DiT, the VAE and both VLMs stay frozen; only the bridge learns. One step:

    embeds   = bridge(qwen3 cache, qwen25 cache)                     # [B, L, D25]
    sigma    = shift(logit_normal())                                   # the scheduler's dynamic shift
    noisy    = (1 - sigma) * target + sigma * noise                    # packed latents [B, N, 4C]
    velocity = DiT([noisy ; condition], t=sigma, embeds)[:, :N]
    loss     = mse(velocity, noise - target)

    vision-bridge train --data MANIFEST_OR_CACHE_URL --out CKPT_DIR [--steps N] [--batch-size B] [--lr X]
                        [--ablate-qwen3 none|shuffle|zeros]

Every run measures whether the bridge carries Qwen3-VL information, not just a lower loss: at each
evaluation the trained bridge is also run with the Qwen3 caches permuted across held-out samples, and
`qwen3_information_gain = heldout_loss_qwen3_shuffled - heldout_loss_trained` (bootstrap 95% CI over
held-out samples) goes into `metrics.json`. A bridge that learnt a generic bias scores ~0 there.
`ablate_qwen3="shuffle"` (re-paired with another sample's Qwen3 caches at every step) or `"zeros"` trains
the controls. Checkpoints hold the bridge (safetensors + JSON, with `bridge_statistics.json`: correction
/base RMS ratio, token cosine before/after, gates), the optimizer and scheduler state (safetensors +
JSON), the step and the samples consumed, so a killed run resumes on the same loss curve.

Data stream from an `ExampleSource` (see `data.py`): memory is bounded by the shuffle buffer, not by the data.
With `torch.distributed` initialised (see `batch/training_data.py`, which launches the ranks), each rank trains
on its share of the data streams and the bridge's gradients are summed across ranks before every step (data
parallelism, as DDP does; the bridge is small, so one all-reduce per step costs nothing next to the DiT).
The global batch is `batch_size x data_streams x grad_accumulation` whatever the world size, the noise of each
micro-batch is a function of (seed, step, stream), so N ranks follow the loss curve of one process, and a run
resumes under another world size. Rank 0 evaluates, writes checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from bridgecore.model.bridge import STATISTICS_NAME, BridgeConfig, VisionCacheBridge, identity_bridge
from bridgecore.model.cache_format import Qwen3VisionCache
from bridgecore.training.data import (
    ExampleSource,
    InMemorySource,
    TrainingStreams,
    deal_shards,
    read_refs,
    split_refs,
    stream_loader,
)
from bridgecore.training.examples import TrainingExample

logger = logging.getLogger(__name__)
ABLATIONS = ("none", "shuffle", "zeros")
LR_SCHEDULES = ("constant", "cosine")
HELDOUT_SEED = 12345


@dataclass
class TrainConfig:
    """Flat training config; the bridge's own fields (rank, lr, weight decay) live in `BridgeConfig`."""

    steps: int = 1000
    batch_size: int = 4
    grad_accumulation: int = 1
    warmup_steps: int = 50
    # after warm-up: "constant", or "cosine" down to min_lr_ratio of the rate at step lr_decay_steps (default: steps;
    # a run trained in phases that resume one another gives the whole run's length so the phases share one curve)
    lr_schedule: str = "constant"
    lr_decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 100
    heldout_fraction: float = 0.1
    seed: int = 0
    learning_rate: float | None = None  # default: BridgeConfig.learning_rate
    gradient_checkpointing: bool = True
    logit_mean: float = 0.0
    logit_std: float = 1.0
    ablate_qwen3: str = "none"  # "shuffle": another sample's Qwen3 caches every step; "zeros": zeroed caches
    heldout_repeats: int = 4  # noise/timestep draws per held-out sample (fixed, so evaluations compare)
    max_heldout: int = 256  # held-out examples are read once and kept in memory
    data_streams: int = 1  # independent data streams; each rank takes data_streams / world_size of them
    shuffle_buffer: int = 64  # examples per stream's shuffle buffer (the resident data, with one shard per stream)
    # worker processes reading ahead (a divisor of the rank's streams; 0: a thread per stream); examples already in
    # memory are never read by processes (there is nothing to read ahead, and forking would copy them)
    data_workers: int = 1
    log_every: int = 10  # steps between progress lines (loss, samples/s, data-wait share, GPU memory)

    def __post_init__(self):
        if self.ablate_qwen3 not in ABLATIONS:
            raise ValueError(f"ablate_qwen3 must be one of {ABLATIONS}; got {self.ablate_qwen3!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1]; got {self.min_lr_ratio}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise ValueError(f"lr_decay_steps must be at least 1; got {self.lr_decay_steps}")
        for name in ("steps", "batch_size", "grad_accumulation", "data_streams", "shuffle_buffer", "eval_every",
                     "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        for name in ("seed", "warmup_steps", "data_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {getattr(self, name)}")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning rate must be a finite number > 0; got {self.learning_rate}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0; got {self.max_grad_norm}")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.data_streams * self.grad_accumulation

    def lr_factor(self, step: int) -> float:
        """The learning rate at optimizer step `step` (0-based) as a fraction of the configured rate."""
        warmup = max(1, self.warmup_steps)
        if step + 1 < warmup:
            return (step + 1) / warmup
        if self.lr_schedule == "constant":
            return 1.0
        horizon = self.lr_decay_steps or self.steps
        progress = min(1.0, max(0.0, (step + 1 - warmup) / max(1, horizon - warmup)))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# The one home of a training run's defaults: the CLI (`vision-bridge train`), the `train-bridge` flow and its
# deployments read these (the trainer's own fields, and the bridge's design from `BridgeConfig`).
TRAINING_DEFAULTS: dict = {
    **{name: getattr(TrainConfig(), name) for name in ("steps", "batch_size", "grad_accumulation", "eval_every", "seed",
                                                       "ablate_qwen3", "shuffle_buffer", "data_workers")},
    **{name: getattr(BridgeConfig(), name) for name in ("learning_rate", "rank", "mode", "num_tokens")},
}


@dataclass(frozen=True)
class Ranks:
    """This process's place in a `torch.distributed` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sums the tensors across ranks, in place (one flat all-reduce)."""
        if self.world_size == 1 or not tensors:
            return
        import torch.distributed as dist

        # one buffer on the gradients' device (NCCL takes CUDA tensors only; the loss tally lives on the CPU), in
        # float64 so the tally's precision survives
        device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
        flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


# -- the loss ------------------------------------------------------------------------------------------


def sample_sigmas(scheduler, image_seq_len: int, batch: int, generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """Logit-normal t, shifted exactly as the scheduler shifts its inference sigmas for this resolution."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

    t = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(batch, generator=generator))
    if not scheduler.config.get("use_dynamic_shifting", False):
        return t
    mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                         scheduler.config.get("max_shift", 1.15))
    return scheduler.time_shift(mu, 1.0, t.clamp(1e-4, 1 - 1e-4))


def flow_matching_loss(transformer, embeds: torch.Tensor, mask: torch.Tensor, condition: torch.Tensor,
                       target: torch.Tensor, latent_hw: tuple[int, int], noise: torch.Tensor,
                       sigmas: torch.Tensor, condition_hw: tuple[tuple[int, int], ...] | None = None,
                       reduce: bool = True) -> torch.Tensor:
    """Qwen-Image-Edit's training objective for one batch of equal-sized samples.

    Args:
        embeds (`[B, L, D]`), mask (`[B, L]`): prompt embeddings as the DiT reads them.
        target, noise (`[B, N, 4C]`): packed latents; sigmas (`[B]`) in (0, 1).
        condition (`[B, sum N_i, 4C]`): every condition image's packed latents, concatenated in order.
        condition_hw: each condition image's packed grid (default: one, of `latent_hw`), for the DiT's RoPE.
        reduce: mean over the batch (default) or one loss per sample `[B]`.
    """
    s = sigmas.view(-1, 1, 1).to(target.dtype)
    noisy = (1 - s) * target + s * noise
    h, w = latent_hw
    grids = [(1, ch, cw) for ch, cw in (condition_hw or ((h, w),))]
    prediction = transformer(
        hidden_states=torch.cat([noisy, condition], dim=1).to(transformer.dtype),
        timestep=sigmas.to(transformer.dtype),
        encoder_hidden_states=embeds.to(transformer.dtype),
        encoder_hidden_states_mask=mask,
        img_shapes=[[(1, h, w), *grids]] * target.shape[0],
        return_dict=False,
    )[0][:, : target.shape[1]]
    errors = (prediction.float() - (noise - target).float()).pow(2)
    return errors.mean() if reduce else errors.mean(dim=(1, 2))


# -- checkpoints ---------------------------------------------------------------------------------------


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, bridge, optimizer, lr_scheduler, step: int, history: dict,
                    statistics: dict | None = None, data: dict | None = None) -> None:
    """Bridge (+ its statistics) + optimizer + scheduler + step + RNG states; written to a temp dir then renamed."""
    temporary = directory.with_name(directory.name + ".tmp")
    temporary.mkdir(parents=True, exist_ok=True)
    bridge.save_pretrained(temporary)
    if statistics is not None:
        (temporary / STATISTICS_NAME).write_text(json.dumps({"step": step, **statistics}, indent=1))
    tensors, meta = _optimizer_to_files(optimizer)
    # bytes, then an ordinary write: safetensors' save_file creates files readable by their owner only
    (temporary / "optimizer.safetensors").write_bytes(save(tensors))
    (temporary / "trainer_state.json").write_text(json.dumps(
        {"step": step, "optimizer": meta, "lr_scheduler": lr_scheduler.state_dict(), "history": history,
         "data": data or {}}, indent=1))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    temporary.rename(directory)


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted(out_dir.glob("step_[0-9]*[0-9]"))
    return steps[-1] if steps else None


# -- the trainer ---------------------------------------------------------------------------------------


def _step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """A generator per (seed, step, micro-batch): batches, noise and sigmas are a pure function of the step,
    so a resumed run draws exactly what the uninterrupted run would have drawn."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


def _image_count(example: TrainingExample) -> int:
    return int(example.cache.qwen3.grid_thw.shape[0])


def detached_qwen3(qwen3: Qwen3VisionCache) -> Qwen3VisionCache:
    """A Qwen3 cache that may be paired with another sample's Qwen2.5 cache (the ablations do so on purpose)."""
    from dataclasses import replace

    return replace(qwen3, image_digest="")


def zeroed_qwen3(qwen3: Qwen3VisionCache) -> Qwen3VisionCache:
    """The same cache with every feature zeroed: the bridge gets positions and grids, no content."""
    from dataclasses import replace

    return replace(qwen3, levels={k: torch.zeros_like(v) for k, v in qwen3.levels.items()},
                   deepstack={k: torch.zeros_like(v) for k, v in qwen3.deepstack.items()})


def without_level(qwen3: Qwen3VisionCache, level: str) -> Qwen3VisionCache:
    """The same cache with one Qwen3 level zeroed ("early", "mid", "late", or "deepstack" for all DeepStack
    features): what the per-level ablation evaluates the trained bridge on."""
    from dataclasses import replace

    if level == "deepstack":
        return replace(qwen3, deepstack={k: torch.zeros_like(v) for k, v in qwen3.deepstack.items()})
    return replace(qwen3, levels={k: torch.zeros_like(v) if k == level else v for k, v in qwen3.levels.items()})


POSITION_ABLATIONS = ("text", "vision", "reference")


def without_positions(qwen3: Qwen3VisionCache, which: str) -> Qwen3VisionCache:
    """The same cache with every level (and DeepStack feature) zeroed at one kind of position: "text" (every
    non-image token), "vision" (every image token, references included) or "reference" (the reference pictures'
    tokens only): which of Qwen3-VL's positions carry what the bridge uses."""
    from dataclasses import replace

    if which not in POSITION_ABLATIONS:
        raise ValueError(f"which must be one of {POSITION_ABLATIONS}; got {which!r}")
    length = next(iter(qwen3.levels.values())).shape[0]
    vision = torch.zeros(length, dtype=torch.bool)
    vision[qwen3.vision_positions] = True
    tokens_per_image = (qwen3.grid_thw.prod(-1) // 4).tolist()
    first_reference = int(sum(tokens_per_image[: qwen3.condition_images]))
    reference_rows = torch.arange(qwen3.num_vision_tokens) >= first_reference  # rows of the DeepStack features
    if which == "text":
        zero, zero_rows = ~vision, torch.zeros(qwen3.num_vision_tokens, dtype=torch.bool)
    elif which == "vision":
        zero, zero_rows = vision, torch.ones(qwen3.num_vision_tokens, dtype=torch.bool)
    else:
        zero = torch.zeros(length, dtype=torch.bool)
        zero[qwen3.vision_positions[reference_rows]] = True
        zero_rows = reference_rows

    def masked(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return tensor.masked_fill(rows.to(tensor.device).unsqueeze(-1), 0)

    return replace(qwen3, levels={k: masked(v, zero) for k, v in qwen3.levels.items()},
                   deepstack={k: masked(v, zero_rows) for k, v in qwen3.deepstack.items()})


def derangement(count: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point (a shuffled order, each index moved by one place)."""
    if count < 2:
        raise ValueError(f"a derangement needs at least 2 items; got {count}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    permutation = [0] * count
    for i, index in enumerate(order):
        permutation[index] = order[(i + 1) % count]
    return permutation


def shuffled_qwen3(examples: list[TrainingExample], seed: int = 0) -> list[Qwen3VisionCache]:
    """Qwen3 caches permuted across `examples` with no sample keeping its own (a derangement within each
    group of equal image count). A group of one keeps its own cache; a warning says so."""
    result: list = [None] * len(examples)
    groups: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(_image_count(example), []).append(index)
    for count, members in sorted(groups.items()):
        if len(members) < 2:
            logger.warning("only one held-out sample with %d image(s): its Qwen3 cache cannot be shuffled", count)
            result[members[0]] = examples[members[0]].cache.qwen3
            continue
        for member, other in zip(members, derangement(len(members), seed + count)):
            result[member] = detached_qwen3(examples[members[other]].cache.qwen3)
    return result


def paired_gain(worse: np.ndarray, better: np.ndarray, seed: int = 0) -> tuple[float, list[float]]:
    """mean(worse - better) over paired samples and its bootstrap 95% CI."""
    from bridgecore.stats import bootstrap_ci

    differences = np.asarray(worse, dtype=np.float64) - np.asarray(better, dtype=np.float64)
    if differences.size == 0 or not np.isfinite(differences).all():
        return float("nan"), [float("nan"), float("nan")]
    return float(differences.mean()), list(bootstrap_ci(differences, resamples=2000, seed=seed))


class BridgeTrainer:
    """Trains a `VisionCacheBridge` against a frozen edit pipeline's DiT, on examples in memory or streamed from an
    `ExampleSource`."""

    def __init__(self, pipe, data: list[TrainingExample] | ExampleSource, out_dir: str | Path,
                 config: TrainConfig = TrainConfig(), bridge_config: BridgeConfig | None = None,
                 ranks: Ranks | None = None, heldout: list[TrainingExample] | None = None):
        """`heldout`: a fixed evaluation set instead of a split of `data` (then every example of `data` trains; an
        experiment that trains on two views of one picture keeps both views out of its evaluation this way)."""
        if isinstance(data, list):  # in memory: every example can be checked before any step
            if data:
                first = data[0].cache
                checker = VisionCacheBridge(bridge_config or BridgeConfig.from_caches(first.qwen3, first.qwen25))
                for example in data:
                    checker.check_caches(example.cache.qwen3, example.cache.qwen25)
            data = InMemorySource(data)
        self.source = data
        refs = self.source.refs()
        if not refs:
            raise ValueError("no training examples")
        self.pipe, self.config, self.out_dir = pipe, config, Path(out_dir)
        self.ranks = ranks or Ranks.current()
        if config.data_streams % self.ranks.world_size:
            raise ValueError(f"{config.data_streams} data streams cannot be shared by {self.ranks.world_size} ranks: "
                             "use a multiple of the number of GPUs")
        self.after_checkpoint = None  # e.g. upload the run to object storage
        self.device = pipe.transformer.device
        if heldout is None:
            self.train_refs, heldout_refs = split_refs(refs, config.heldout_fraction, config.max_heldout)
        else:
            self.train_refs, heldout_refs = refs, []
        if not self.train_refs:
            raise ValueError("every example went to the held-out split; add data or lower heldout_fraction")
        self.dealt = deal_shards(self.train_refs, config.data_streams)
        # read once and kept: the evaluation (rank 0's) compares every bridge on the same examples
        if heldout is not None:
            self.heldout = list(heldout) if self.ranks.main else []
        else:
            self.heldout = read_refs(self.source, heldout_refs) if self.ranks.main else []
        if bridge_config is None:
            first = (self.heldout or read_refs(self.source, self.train_refs[:1]))[0].cache
            bridge_config = BridgeConfig.from_caches(first.qwen3, first.qwen25)
        self.bridge_config = bridge_config
        with _seeded(config.seed, self.device):  # every rank (and every rerun) starts from the same bridge
            self.bridge = VisionCacheBridge(self.bridge_config).to(self.device)
        for example in self.heldout:  # refuse mismatched caches before any step (training batches: as they come)
            self.bridge.check_caches(example.cache.qwen3, example.cache.qwen25)
        self.heldout_shuffled = shuffled_qwen3(self.heldout, config.seed) if len(self.heldout) > 1 else []
        for module in (pipe.transformer, pipe.vae):
            module.requires_grad_(False).eval()
        if config.gradient_checkpointing and hasattr(pipe.transformer, "enable_gradient_checkpointing"):
            pipe.transformer.enable_gradient_checkpointing()

    # -- the loss ----------------------------------------------------------------------------------------

    def _training_qwen3(self, batch: list[TrainingExample], partners: list) -> list[Qwen3VisionCache]:
        """The Qwen3 caches the bridge sees in training: the sample's own, or the ablation's (for "shuffle", the
        stream paired each example with another from its shuffle buffer)."""
        if self.config.ablate_qwen3 == "zeros":
            return [zeroed_qwen3(e.cache.qwen3) for e in batch]
        if self.config.ablate_qwen3 == "shuffle":
            return [detached_qwen3((other or example).cache.qwen3) for example, other in zip(batch, partners)]
        return [e.cache.qwen3 for e in batch]

    def _loss(self, bridge, batch, generator: torch.Generator, qwen3s: list | None = None,
              repeats: int = 1, reduce: bool = True) -> torch.Tensor:
        output = bridge(qwen3s or [e.cache.qwen3 for e in batch], [e.cache.qwen25 for e in batch])
        embeds = output.prompt_embeds.to(self.device).repeat_interleave(repeats, 0)
        mask = output.prompt_embeds_mask.to(self.device).repeat_interleave(repeats, 0)
        target = torch.stack([e.target for e in batch]).to(self.device).repeat_interleave(repeats, 0)
        condition = torch.stack([e.condition for e in batch]).to(self.device).repeat_interleave(repeats, 0)
        noise = torch.randn(target.shape, generator=generator).to(self.device, target.dtype)
        sigmas = sample_sigmas(self.pipe.scheduler, target.shape[1], target.shape[0], generator, self.config).to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            return flow_matching_loss(self.pipe.transformer, embeds, mask, condition, target, batch[0].latent_hw,
                                      noise, sigmas, batch[0].condition_hw, reduce=reduce)

    # -- evaluation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def heldout_losses(self, bridge, qwen3s: list | None = None, examples: list | None = None) -> np.ndarray:
        """Per held-out sample loss `[n]`, with noise and sigmas fixed per sample (the same in every call, for
        every bridge and every choice of Qwen3 caches, so losses compare pairwise). `examples` replaces the
        held-out examples one for one (e.g. with other Qwen2.5 caches)."""
        was_training = bridge.training
        bridge.eval()
        losses = []
        for index, example in enumerate(examples or self.heldout):
            generator = torch.Generator().manual_seed(HELDOUT_SEED * 1_000_003 + index)
            qwen3 = [qwen3s[index]] if qwen3s is not None else None
            losses.append(self._loss(bridge, [example], generator, qwen3, self.config.heldout_repeats).item())
        bridge.train(was_training)
        return np.asarray(losses, dtype=np.float64)

    def heldout_loss(self, bridge) -> float:
        """Mean held-out loss (nan without held-out samples)."""
        return float(self.heldout_losses(bridge).mean()) if self.heldout else float("nan")

    def evaluate(self, bridge) -> dict:
        """Held-out loss with the real Qwen3 caches and with caches shuffled across held-out samples, per sample."""
        trained = self.heldout_losses(bridge)
        shuffled = self.heldout_losses(bridge, self.heldout_shuffled) if self.heldout_shuffled else np.full(len(trained), np.nan)
        return {"trained": trained, "qwen3_shuffled": shuffled}

    def level_ablation(self, bridge) -> dict[str, float]:
        """Mean held-out loss with each Qwen3 level the bridge reads zeroed at evaluation (DeepStack too when
        it is used): the larger the rise over the trained loss, the more that level carries."""
        if not self.heldout:
            return {}
        levels = [*bridge.config.levels, *(["deepstack"] if bridge.config.use_deepstack else [])]
        return {level: _mean(self.heldout_losses(bridge, [without_level(e.cache.qwen3, level) for e in self.heldout]))
                for level in levels}

    def statistics(self, bridge) -> dict:
        """Correction/base RMS ratio, token cosine before/after and gates, on held-out (else training) samples."""
        examples = self.heldout[:16] or read_refs(self.source, self.train_refs[:16])
        return bridge.correction_statistics([e.cache.qwen3 for e in examples], [e.cache.qwen25 for e in examples])

    # -- training ----------------------------------------------------------------------------------------

    def train(self, resume: bool = True, progress: bool = True) -> dict:
        """Runs (or resumes) training; rank 0 writes checkpoints, `metrics.json` and `loss_curve.png` to `out_dir`
        and returns the metrics (other ranks return {})."""
        config, bridge, ranks = self.config, self.bridge, self.ranks
        lr = self.bridge_config.learning_rate if config.learning_rate is None else config.learning_rate
        optimizer = torch.optim.AdamW(bridge.parameter_groups(lr, self.bridge_config.weight_decay))
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: config.lr_factor(step))
        step, history = 0, {"step": [], "loss": [], "samples_per_s": [], "data_wait_share": [], "heldout_step": [],
                            "heldout_loss": [], "heldout_loss_qwen3_shuffled": [], "statistics": []}
        checkpoint = latest_checkpoint(self.out_dir) if resume else None
        if checkpoint is not None:
            step, history = self._restore(checkpoint, optimizer, lr_scheduler)
            logger.info("resumed from %s at step %d (%d samples seen)", checkpoint, step, step * config.global_batch)
        baseline = self.heldout_losses(identity_bridge(self.bridge_config).to(self.device))  # no bridge
        frozen_before = _fingerprint(self.pipe.transformer)
        mine = list(range(ranks.rank, config.data_streams, ranks.world_size))
        streams = TrainingStreams(self.source, self.train_refs, self.dealt, mine, config.seed, config.batch_size,
                                  config.shuffle_buffer, config.ablate_qwen3 == "shuffle",
                                  skip=step * config.grad_accumulation)  # a stream's position: global, not per rank
        readers = 0 if isinstance(self.source, InMemorySource) else config.data_workers
        batches = iter(stream_loader(streams, readers))
        from bridgecore.console import bar as progress_bar

        bar = progress_bar(total=config.steps, initial=step, desc="train", unit="step", disable=not progress or not ranks.main)
        bridge.train()
        evaluation = None
        try:
            with _seeded(config.seed, self.device):  # the caller's random state comes back after training
                while step < config.steps:
                    started = time.perf_counter()
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        total, waited = self._accumulate(bridge, batches, mine, step)
                    except ValueError as error:  # bad data read by a loader worker: its first line, not two tracebacks
                        try:
                            clean = type(error)(_first_meaningful_line(str(error)))
                        except TypeError:  # an exception type with another constructor
                            clean = ValueError(_first_meaningful_line(str(error)))
                        raise clean from None
                    ranks.sum_([p.grad for p in bridge.parameters() if p.grad is not None] + [total])
                    torch.nn.utils.clip_grad_norm_(bridge.parameters(), config.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    step += 1
                    seconds = time.perf_counter() - started
                    history["step"].append(step)
                    history["loss"].append(float(total[0]))
                    history["samples_per_s"].append(float(total[1]) / seconds)
                    history["data_wait_share"].append(waited / seconds)
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(total[0]):.4f}", refresh=False)  # shown at the next timed redraw: a log gets no line per step
                    if ranks.main and (step % config.log_every == 0 or step == config.steps):
                        logger.info("step %d/%d: loss %.5f, %.1f samples/s, data wait %.0f%%%s", step, config.steps,
                                    float(total[0]), history["samples_per_s"][-1], 100 * history["data_wait_share"][-1],
                                    _gpu_memory(self.device))
                    statistics = None
                    if ranks.main and (step % config.eval_every == 0 or step == config.steps):
                        evaluation = self.evaluate(bridge)
                        statistics = self.statistics(bridge)
                        history["heldout_step"].append(step)
                        history["heldout_loss"].append(_mean(evaluation["trained"]))
                        history["heldout_loss_qwen3_shuffled"].append(_mean(evaluation["qwen3_shuffled"]))
                        history["statistics"].append(statistics)
                        logger.info("step %d: train loss %.5f, held-out %.5f (Qwen3 shuffled %.5f)", step,
                                    float(total[0]), history["heldout_loss"][-1], history["heldout_loss_qwen3_shuffled"][-1])
                    if ranks.main and (step % config.checkpoint_every == 0 or step == config.steps):
                        save_checkpoint(self.out_dir / f"step_{step:06d}", bridge, optimizer, lr_scheduler, step, history,
                                        statistics or self.statistics(bridge),
                                        data={"samples_seen": step * config.global_batch,
                                              "data_streams": config.data_streams, "world_size": ranks.world_size})
                        if self.after_checkpoint is not None:
                            self.after_checkpoint()
        finally:
            bar.close()
            del batches  # stops the reader threads / worker processes
        bridge.eval()
        if _fingerprint(self.pipe.transformer) != frozen_before:
            raise AssertionError("the frozen DiT changed during training")
        if not ranks.main:
            return {}
        return self._finish(baseline, evaluation or self.evaluate(bridge), history)

    def _accumulate(self, bridge, batches, mine: list[int], step: int) -> tuple[torch.Tensor, float]:
        """Gradients of one optimizer step from this rank's streams, each micro-batch's loss scaled so that the sum
        over every stream and micro-batch (across ranks) is their mean. Returns (loss, samples) and the seconds
        spent waiting for data."""
        config = self.config
        scale = 1.0 / (config.data_streams * config.grad_accumulation)
        total, waited = torch.zeros(2, dtype=torch.float64), 0.0
        for micro in range(config.grad_accumulation):
            for stream in mine:
                before = time.perf_counter()
                got, batch, partners = next(batches)
                waited += time.perf_counter() - before
                if got != stream:
                    raise RuntimeError(f"data stream order broken: expected stream {stream}, got {got}")
                for example in batch:
                    bridge.check_caches(example.cache.qwen3, example.cache.qwen25)
                generator = _step_generator(config.seed, step, micro * config.data_streams + stream)
                torch.manual_seed(generator.initial_seed())  # dropout: the same draws on any world size
                loss = self._loss(bridge, batch, generator, self._training_qwen3(batch, partners)) * scale
                loss.backward()
                total += torch.tensor([loss.item(), len(batch)], dtype=torch.float64)
        return total, waited

    def _restore(self, checkpoint: Path, optimizer, lr_scheduler) -> tuple[int, dict]:
        trained = VisionCacheBridge.from_pretrained(checkpoint, expect=self.bridge_config)
        ours, theirs = self.bridge_config, trained.config
        if (theirs.token_streams, theirs.token_fusion) != (ours.token_streams, ours.token_fusion):
            raise ValueError(f"{checkpoint} was trained with token_streams={theirs.token_streams}, "
                             f"token_fusion={theirs.token_fusion!r}; this run asks for {ours.token_streams}, "
                             f"{ours.token_fusion!r}: train into a new --out (or resume it with its own design)")
        if (theirs.mode, theirs.appended_tokens, theirs.rank) != (ours.mode, ours.appended_tokens, ours.rank):
            raise ValueError(f"{checkpoint} is a {theirs.mode} bridge (K={theirs.appended_tokens}, rank {theirs.rank}); "
                             f"this run asks for {ours.mode} (K={ours.appended_tokens}, rank {ours.rank}): resume it with "
                             f"--mode {theirs.mode} --num-tokens {max(1, theirs.appended_tokens)} --rank {theirs.rank}, "
                             "or train into a new --out")
        self.bridge.load_state_dict(trained.state_dict())
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        data = state.get("data", {})
        streams = data.get("data_streams", 1)
        seen = data.get("samples_seen")
        if streams == self.config.data_streams and seen is not None and seen != state["step"] * self.config.global_batch:
            raise ValueError(f"{checkpoint} saw {seen} samples in {state['step']} steps (a global batch of "
                             f"{seen // max(1, state['step'])}); this run's global batch is {self.config.global_batch}: "
                             "resume with the batch size and accumulation it was trained with, or train into a new --out")
        if streams != self.config.data_streams:
            raise ValueError(f"{checkpoint} was trained with {streams} data streams; this run asks for "
                             f"{self.config.data_streams}: resume with --data-streams {streams} (any number of GPUs that "
                             "divides it), or train into a new --out")
        optimizer.load_state_dict(_optimizer_from_files(load_file(checkpoint / "optimizer.safetensors"), state["optimizer"]))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        history = state["history"]
        for key in ("samples_per_s", "data_wait_share"):  # absent from checkpoints written before streaming
            history.setdefault(key, [None] * len(history["step"]))
        return state["step"], history

    def _finish(self, baseline: np.ndarray, evaluation: dict, history: dict) -> dict:
        self.bridge.save_pretrained(self.out_dir)  # the final bridge loads from out_dir itself
        statistics = self.statistics(self.bridge)
        (self.out_dir / STATISTICS_NAME).write_text(json.dumps(statistics, indent=1))
        trained, shuffled = evaluation["trained"], evaluation["qwen3_shuffled"]
        information_gain, information_ci = paired_gain(shuffled, trained, self.config.seed)
        gain, gain_ci = paired_gain(baseline, trained, self.config.seed)
        baseline_loss = _mean(baseline)
        level_ablation = self.level_ablation(self.bridge)
        metrics = {
            "heldout_loss_baseline": baseline_loss,
            "heldout_loss_trained": _mean(trained),
            "heldout_loss_qwen3_shuffled": _mean(shuffled),
            "qwen3_information_gain": information_gain,
            "qwen3_information_gain_ci": information_ci,
            "qwen3_information_gain_relative": information_gain / baseline_loss if baseline_loss else float("nan"),
            "heldout_gain": gain,
            "heldout_gain_ci": gain_ci,
            # the paired no-harm check of every run: the bridge vs Qwen-Image-Edit alone on the same held-out samples,
            # noise and timesteps (a bridge that costs where it adds nothing would be refused by any user)
            "no_harm": {"verdict": ("helps" if gain_ci[0] > 0 else "HURTS" if gain_ci[1] < 0 else "no measurable difference")
                        if np.isfinite(gain_ci).all() else "not measured",
                        "loss_without_bridge": baseline_loss, "loss_with_bridge": _mean(trained)},
            "heldout_loss_level_zeroed": level_ablation,
            "ablate_qwen3": self.config.ablate_qwen3,
            "bridge_mode": self.bridge_config.mode,
            "bridge_tokens": self.bridge_config.appended_tokens,
            "bridge_statistics": statistics,
            "gates": self.bridge.gate_values(),
            "gate_abs_mean": (float(np.mean([abs(v) for v in self.bridge.gate_values().values()]))
                              if self.bridge.gate_values() else None),
            "final_train_loss": history["loss"][-1] if history["loss"] else float("nan"),
            "steps": history["step"][-1] if history["step"] else 0,
            "train_examples": len(self.train_refs),
            "world_size": self.ranks.world_size,
            "data_streams": self.config.data_streams,
            "global_batch": self.config.global_batch,
            "samples_per_s": _mean(np.asarray([v for v in history["samples_per_s"] if v is not None])),
            "data_wait_share": _mean(np.asarray([v for v in history["data_wait_share"] if v is not None])),
            "heldout_examples": len(self.heldout),
            "heldout_per_sample": {"key": [e.key for e in self.heldout], "baseline": baseline.tolist(),
                                   "trained": trained.tolist(), "qwen3_shuffled": shuffled.tolist()},
            "config": asdict(self.config),
            "history": history,
        }
        (self.out_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1))
        plot_loss_curve(history, baseline_loss, self.out_dir / "loss_curve.png")
        return metrics


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Runs the block from `seed`, then gives the process its random state back."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _gpu_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f", GPU memory peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def _first_meaningful_line(text: str) -> str:
    """A DataLoader worker's exception arrives as "Caught X in DataLoader worker ... Original Traceback ...": the
    original message is its last line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def json_safe(value):
    """NaN -> None, so metrics.json is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fingerprint(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum().item() for p in module.parameters()))


def plot_loss_curve(history: dict, baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    if history["step"]:
        window = max(1, len(history["loss"]) // 50)
        smooth = np.convolve(history["loss"], np.ones(window) / window, mode="valid")
        axis.plot(history["step"][window - 1:], smooth, label="train loss (smoothed)", alpha=0.8)
    if history["heldout_step"]:
        axis.plot(history["heldout_step"], history["heldout_loss"], "o-", label="held-out loss (trained bridge)")
        shuffled = [np.nan if v is None else v for v in history.get("heldout_loss_qwen3_shuffled", [])]
        if shuffled and not all(np.isnan(shuffled)):
            axis.plot(history["heldout_step"], shuffled, "s--",
                      label="held-out loss (trained bridge, Qwen3 caches shuffled across samples)")
    if not math.isnan(baseline):
        axis.axhline(baseline, color="gray", linestyle="--", label="held-out loss (zero-init = Qwen-Image-Edit)")
    axis.set_xlabel("step")
    axis.set_ylabel("flow-matching loss")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
