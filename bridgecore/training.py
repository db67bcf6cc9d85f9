"""Training the bridge against the frozen DiT with Qwen-Image-Edit's own flow-matching loss.

C2C-style: the DiT, the VAE and both VLMs stay frozen; only the bridge learns. One step:

    embeds   = bridge(qwen3 cache, qwen25 cache)                     # [B, L, D25]
    sigma    = shift(logit_normal())                                   # the scheduler's dynamic shift
    noisy    = (1 - sigma) * target + sigma * noise                    # packed latents [B, N, 4C]
    velocity = DiT([noisy ; condition], t=sigma, embeds)[:, :N]
    loss     = mse(velocity, noise - target)

    vision-bridge train --data MANIFEST_OR_CACHE_URL --out CKPT_DIR [--steps N] [--batch-size B] [--lr X]

Checkpoints hold the bridge (safetensors + JSON), the optimizer and scheduler state (safetensors +
JSON), the step and the RNG states, so a killed run resumes on the same loss curve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .bridge import BridgeConfig, VisionCacheBridge
from .training_data import TrainingExample

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Flat training config; the bridge's own fields (rank, lr, weight decay) live in `BridgeConfig`."""

    steps: int = 1000
    batch_size: int = 4
    grad_accumulation: int = 1
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 100
    heldout_fraction: float = 0.1
    seed: int = 0
    learning_rate: float | None = None  # default: BridgeConfig.learning_rate
    gradient_checkpointing: bool = True
    logit_mean: float = 0.0
    logit_std: float = 1.0


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
                       sigmas: torch.Tensor) -> torch.Tensor:
    """Qwen-Image-Edit's training objective for one batch of equal-sized samples.

    Args:
        embeds (`[B, L, D]`), mask (`[B, L]`): prompt embeddings as the DiT reads them.
        condition, target, noise (`[B, N, 4C]`): packed latents; sigmas (`[B]`) in (0, 1).
    """
    s = sigmas.view(-1, 1, 1).to(target.dtype)
    noisy = (1 - s) * target + s * noise
    h, w = latent_hw
    prediction = transformer(
        hidden_states=torch.cat([noisy, condition], dim=1).to(transformer.dtype),
        timestep=sigmas.to(transformer.dtype),
        encoder_hidden_states=embeds.to(transformer.dtype),
        encoder_hidden_states_mask=mask,
        img_shapes=[[(1, h, w), (1, h, w)]] * target.shape[0],
        return_dict=False,
    )[0][:, : target.shape[1]]
    return torch.nn.functional.mse_loss(prediction.float(), (noise - target).float())


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


def save_checkpoint(directory: Path, bridge, optimizer, lr_scheduler, step: int, history: dict) -> None:
    """Bridge + optimizer + scheduler + step + RNG states; written to a temp dir then renamed."""
    temporary = directory.with_name(directory.name + ".tmp")
    temporary.mkdir(parents=True, exist_ok=True)
    bridge.save_pretrained(temporary)
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, temporary / "optimizer.safetensors")
    save_file({"torch": torch.get_rng_state()}, temporary / "rng.safetensors")  # dropout; data and noise are per step
    (temporary / "trainer_state.json").write_text(json.dumps(
        {"step": step, "optimizer": meta, "lr_scheduler": lr_scheduler.state_dict(), "history": history}, indent=1))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    temporary.rename(directory)


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = sorted(out_dir.glob("step_[0-9]*[0-9]"))
    return steps[-1] if steps else None


# -- the trainer ---------------------------------------------------------------------------------------


def _split(examples: list[TrainingExample], fraction: float) -> tuple[list, list]:
    """Deterministic held-out split by key (at least one held-out sample when there are two or more)."""
    import hashlib

    ranked = sorted(examples, key=lambda e: hashlib.sha256(e.key.encode()).hexdigest())
    count = max(1, round(len(ranked) * fraction)) if len(ranked) > 1 else 0
    return ranked[count:], ranked[:count]


def _step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """A generator per (seed, step, micro-batch): batches, noise and sigmas are a pure function of the step,
    so a resumed run draws exactly what the uninterrupted run would have drawn."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


def _batch_for_step(groups: list[list[TrainingExample]], batch_size: int, generator: torch.Generator) -> list:
    """Samples a batch of equal latent size (the DiT takes one resolution per batch), groups by size."""
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.float)
    group = groups[int(torch.multinomial(sizes, 1, generator=generator))]
    order = torch.randperm(len(group), generator=generator)[:batch_size].tolist()
    return [group[i] for i in order]


class BridgeTrainer:
    """Trains a `VisionCacheBridge` on prepared examples against a frozen edit pipeline's DiT."""

    def __init__(self, pipe, examples: list[TrainingExample], out_dir: str | Path, config: TrainConfig = TrainConfig(),
                 bridge_config: BridgeConfig | None = None):
        if not examples:
            raise ValueError("no training examples")
        self.pipe, self.config, self.out_dir = pipe, config, Path(out_dir)
        self.device = pipe.transformer.device
        first = examples[0].cache
        expected = BridgeConfig.from_caches(first.qwen3, first.qwen25)
        self.bridge_config = bridge_config or expected
        self.bridge = VisionCacheBridge(self.bridge_config).to(self.device)
        for example in examples:  # refuse mismatched caches before any step
            self.bridge.check_caches(example.cache.qwen3, example.cache.qwen25)
        self.train_set, self.heldout = _split(examples, config.heldout_fraction)
        if not self.train_set:
            raise ValueError("every example went to the held-out split; add data or lower heldout_fraction")
        for module in (pipe.transformer, pipe.vae):
            module.requires_grad_(False).eval()
        if config.gradient_checkpointing and hasattr(pipe.transformer, "enable_gradient_checkpointing"):
            pipe.transformer.enable_gradient_checkpointing()

    def _embeds(self, bridge, batch: list[TrainingExample]):
        output = bridge([e.cache.qwen3 for e in batch], [e.cache.qwen25 for e in batch])
        return output.prompt_embeds.to(self.device), output.prompt_embeds_mask.to(self.device)

    def _loss(self, bridge, batch, generator: torch.Generator) -> torch.Tensor:
        embeds, mask = self._embeds(bridge, batch)
        target = torch.stack([e.target for e in batch]).to(self.device)
        condition = torch.stack([e.condition for e in batch]).to(self.device)
        noise = torch.randn(target.shape, generator=generator).to(self.device, target.dtype)
        sigmas = sample_sigmas(self.pipe.scheduler, target.shape[1], len(batch), generator, self.config).to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            return flow_matching_loss(self.pipe.transformer, embeds, mask, condition, target, batch[0].latent_hw,
                                      noise, sigmas)

    @torch.no_grad()
    def heldout_loss(self, bridge, repeats: int = 4) -> float:
        """Mean loss over the held-out samples with fixed noise and sigmas (comparable across calls)."""
        if not self.heldout:
            return float("nan")
        generator = torch.Generator().manual_seed(12345)
        losses = [self._loss(bridge, [example], generator).item() for _ in range(repeats) for example in self.heldout]
        return float(np.mean(losses))

    def train(self, resume: bool = True, progress: bool = True) -> dict:
        """Runs (or resumes) training; writes checkpoints, `metrics.json` and `loss_curve.png` to `out_dir`."""
        config, bridge = self.config, self.bridge
        lr = config.learning_rate or self.bridge_config.learning_rate
        optimizer = torch.optim.AdamW(bridge.parameters(), lr=lr, weight_decay=self.bridge_config.weight_decay)
        warmup = max(1, config.warmup_steps)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        step, history = 0, {"step": [], "loss": [], "heldout_step": [], "heldout_loss": []}
        checkpoint = latest_checkpoint(self.out_dir) if resume else None
        if checkpoint is not None:
            step, history = self._restore(checkpoint, optimizer, lr_scheduler)
            logger.info("resumed from %s at step %d", checkpoint, step)
        baseline = self.heldout_loss(VisionCacheBridge(self.bridge_config).to(self.device))
        frozen_before = _fingerprint(self.pipe.transformer)
        groups: dict[tuple, list] = {}
        for example in self.train_set:
            groups.setdefault((example.latent_hw, tuple(example.target.shape)), []).append(example)
        groups_list = [groups[key] for key in sorted(groups)]
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="train", unit="step", disable=not progress)
        bridge.train()
        while step < config.steps:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(config.grad_accumulation):
                generator = _step_generator(config.seed, step, micro)
                batch = _batch_for_step(groups_list, config.batch_size, generator)
                loss = self._loss(bridge, batch, generator) / config.grad_accumulation
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(bridge.parameters(), config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            step += 1
            history["step"].append(step)
            history["loss"].append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            if step % config.eval_every == 0 or step == config.steps:
                history["heldout_step"].append(step)
                history["heldout_loss"].append(self.heldout_loss(bridge))
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(self.out_dir / f"step_{step:06d}", bridge, optimizer, lr_scheduler, step, history)
        bar.close()
        bridge.eval()
        if _fingerprint(self.pipe.transformer) != frozen_before:
            raise AssertionError("the frozen DiT changed during training")
        return self._finish(baseline, history)

    def _restore(self, checkpoint: Path, optimizer, lr_scheduler) -> tuple[int, dict]:
        trained = VisionCacheBridge.from_pretrained(checkpoint, expect=self.bridge_config)
        self.bridge.load_state_dict(trained.state_dict())
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        optimizer.load_state_dict(_optimizer_from_files(load_file(checkpoint / "optimizer.safetensors"), state["optimizer"]))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        rng = load_file(checkpoint / "rng.safetensors")
        torch.set_rng_state(rng["torch"])
        return state["step"], state["history"]

    def _finish(self, baseline: float, history: dict) -> dict:
        self.bridge.save_pretrained(self.out_dir)  # the final bridge loads from out_dir itself
        metrics = {
            "heldout_loss_baseline": baseline,
            "heldout_loss_trained": history["heldout_loss"][-1] if history["heldout_loss"] else float("nan"),
            "final_train_loss": history["loss"][-1] if history["loss"] else float("nan"),
            "gate_abs_mean": self.bridge.gate.abs().mean().item(),
            "steps": history["step"][-1] if history["step"] else 0,
            "train_examples": len(self.train_set),
            "heldout_examples": len(self.heldout),
            "config": asdict(self.config),
            "history": history,
        }
        (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        plot_loss_curve(history, baseline, self.out_dir / "loss_curve.png")
        return metrics


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
    if not math.isnan(baseline):
        axis.axhline(baseline, color="gray", linestyle="--", label="held-out loss (zero-init = Qwen-Image-Edit)")
    axis.set_xlabel("step")
    axis.set_ylabel("flow-matching loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_training(data_uri: str, out_dir: str | Path, settings, config: TrainConfig = TrainConfig(),
                 bridge_overrides: dict | None = None, progress: bool = True) -> dict:
    """Prepares (or reuses) caches and latents under `out_dir/data`, then trains; returns the metrics."""
    from .batch.settings import ModelPool
    from .training_data import prepare_examples

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = prepare_examples(data_uri, str(out_dir / "data"), settings)
    first = examples[0].cache
    bridge_config = BridgeConfig.from_caches(first.qwen3, first.qwen25, **(bridge_overrides or {}))
    trainer = BridgeTrainer(ModelPool(settings).editor.pipe, examples, out_dir, config, bridge_config)
    return trainer.train(progress=progress)
