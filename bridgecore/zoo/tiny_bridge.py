"""Bridges trained for the tiny trained edit model: the main job's demonstrations that what Qwen3-VL read or saw
reaches the DiT.

- task "read" (`zoo["bridge-tokens"]`): Qwen2.5-VL (the DiT's own encoder) reads "Make the <shape>", Qwen3-VL
  reads the colour too, worded by one of the training templates; half the examples give Qwen2.5-VL the full
  instruction as well, so the bridge learns to add nothing where the DiT already knows (the main job's
  Edit+bridge arm reads full instructions);
- task "saw" (`zoo["bridge-reference"]`): one instruction for every colour, the colour only in a reference
  swatch that Qwen3-VL alone sees.

Trained with the project's own trainer and loss (the DiT, VAE and both VLMs frozen), deterministic from the
recipe and cached in the tiny zoo like the trained edit model (`vision-bridge tiny-models DIR --trained`).

    bridge = VisionCacheBridge.from_pretrained(zoo["bridge-tokens"])
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPORT_NAME = "tiny_bridge_report.json"


@dataclass
class TinyBridgeRecipe:
    """How the tiny bridge is trained; its JSON is part of the zoo's cache key."""

    seed: int = 0
    task: str = "read"  # "read": the colour word only Qwen3-VL reads; "saw": the swatch only Qwen3-VL sees
    full_share: float = 0.5  # read task: share of examples where Qwen2.5-VL reads the full instruction too
    no_harm_from: float = 0.5  # read task: those examples join after this fraction of the steps (form first)
    mode: str = "both"
    num_tokens: int = 1
    train_samples: int = 256
    heldout_samples: int = 32
    steps: int = 800
    batch_size: int = 8
    learning_rate: float = 1e-3

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def train_tiny_bridge(edit_model: str | Path, qwen3_model: str | Path, out_dir: str | Path,
                      recipe: TinyBridgeRecipe = TinyBridgeRecipe(), progress: bool = True) -> dict:
    """Trains the bridge on the redacted-colour task and saves it (config.json + model.safetensors, metrics.json)."""
    from bridgecore.zoo.tiny_edit_model import one_thread

    with one_thread():
        return _train(edit_model, qwen3_model, Path(out_dir), recipe, progress)


def _train(edit_model, qwen3_model, out_dir: Path, recipe: TinyBridgeRecipe, progress: bool) -> dict:
    import torch

    from bridgecore.model.bridge import BridgeConfig
    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit
    from bridgecore.zoo.information_proof import colour_examples, reference_examples
    from bridgecore.zoo.synthetic_triplets import TRAINING_TEMPLATES, make_reference_triplets, make_triplets
    from bridgecore.zoo.tiny_edit_model import REPORT_NAME as EDIT_REPORT
    from bridgecore.training.trainer import BridgeTrainer, TrainConfig

    torch.manual_seed(recipe.seed)
    size = json.loads((Path(edit_model) / EDIT_REPORT).read_text())["config"]["image_size"]
    editor = EnhancedQwenImageEdit(edit_model, qwen3_model, device="cpu", condition_area=size * size)
    total, n_train = recipe.train_samples + recipe.heldout_samples, recipe.train_samples
    # pictures of their own: disjoint from the edit model's training set (seed 0) and the proof's (10_000 + s)
    if recipe.task == "saw":
        examples, _ = reference_examples(editor, make_reference_triplets(total, size, seed=21_000 + recipe.seed), "tiny-saw")
        training, heldout, later = examples[:n_train], examples[n_train:], []
    elif recipe.task == "read":
        triplets = make_triplets(total, size, seed=20_000 + recipe.seed)
        redacted, full = colour_examples(editor, triplets, "tiny-bridge", templates=TRAINING_TEMPLATES, seed=recipe.seed)
        extra = round(n_train * recipe.full_share / (1 - recipe.full_share)) if recipe.full_share < 1 else n_train
        training, later = redacted[:n_train], full[: min(n_train, extra)]
        heldout = redacted[n_train:]
    else:
        raise ValueError(f"task must be 'read' or 'saw'; got {recipe.task!r}")
    first = training[0].cache
    config = BridgeConfig.from_caches(first.qwen3, first.qwen25, mode=recipe.mode, num_tokens=recipe.num_tokens,
                                      reference_images=1 if recipe.task == "saw" else 0)
    # the read task in two phases: form on the redacted examples, then add the full-instruction ones (no harm)
    switch = round(recipe.steps * recipe.no_harm_from) if recipe.task == "read" and later else recipe.steps
    phases = [(training, switch)] + ([(training + later, recipe.steps)] if switch < recipe.steps else [])
    if switch <= 0:  # mixed from the first step
        phases = [(training + later, recipe.steps)]
    for stale in out_dir.glob("step_*"):  # the second phase resumes the latest checkpoint: only this run's
        shutil.rmtree(stale)
    for number, (data, steps) in enumerate(phases):
        train = TrainConfig(steps=steps, batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
                            warmup_steps=20, eval_every=steps, checkpoint_every=steps, seed=recipe.seed,
                            gradient_checkpointing=False)
        metrics = BridgeTrainer(editor.pipe, data, out_dir, train, config, heldout=heldout).train(resume=number > 0,
                                                                                              progress=progress)
    for checkpoint in out_dir.glob("step_*"):  # the final bridge is out_dir itself; resume states are not needed
        shutil.rmtree(checkpoint)
    report = {"recipe": asdict(recipe), "heldout_loss_no_bridge": metrics["heldout_loss_baseline"],
              "heldout_loss_bridge": metrics["heldout_loss_trained"],
              "heldout_loss_qwen3_shuffled": metrics["heldout_loss_qwen3_shuffled"],
              "heldout_loss_level_zeroed": metrics["heldout_loss_level_zeroed"]}
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))
    logger.info("tiny bridge (%s, %s task): held-out loss %.4f without bridge -> %.4f (Qwen3 shuffled: %.4f)", recipe.mode,
                recipe.task, report["heldout_loss_no_bridge"], report["heldout_loss_bridge"], report["heldout_loss_qwen3_shuffled"])
    return report
