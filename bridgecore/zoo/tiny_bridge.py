"""A bridge trained for the tiny trained edit model, on its task with the colour word hidden from Qwen2.5-VL.

The main job's demonstration that Qwen3-VL's instruction reaches the DiT: Qwen2.5-VL (the DiT's own
encoder) reads "Make the <shape>", Qwen3-VL reads "Make the <shape> <colour>", and the bridge is trained
with the project's own trainer and loss (the DiT, VAE and both VLMs frozen). Deterministic from its
recipe and cached in the tiny zoo like the trained edit model (`vision-bridge tiny-models DIR --trained`).

    bridge = VisionCacheBridge.from_pretrained(zoo["bridge-tokens"])   # the token path (with the correction)
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
    from bridgecore.zoo.information_proof import redacted_examples
    from bridgecore.zoo.synthetic_triplets import make_triplets
    from bridgecore.zoo.tiny_edit_model import REPORT_NAME as EDIT_REPORT
    from bridgecore.training.trainer import BridgeTrainer, TrainConfig

    torch.manual_seed(recipe.seed)
    size = json.loads((Path(edit_model) / EDIT_REPORT).read_text())["config"]["image_size"]
    editor = EnhancedQwenImageEdit(edit_model, qwen3_model, device="cpu", condition_area=size * size)
    total = recipe.train_samples + recipe.heldout_samples
    # pictures of their own: disjoint from the edit model's training set (seed 0) and the proof's (10_000 + s)
    triplets = make_triplets(total, size, seed=20_000 + recipe.seed)
    examples, _ = redacted_examples(editor, triplets, "tiny-bridge")
    first = examples[0].cache
    config = BridgeConfig.from_caches(first.qwen3, first.qwen25, mode=recipe.mode, num_tokens=recipe.num_tokens)
    train = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
                        warmup_steps=20, eval_every=recipe.steps, checkpoint_every=recipe.steps, seed=recipe.seed,
                        heldout_fraction=recipe.heldout_samples / total, gradient_checkpointing=False)
    metrics = BridgeTrainer(editor.pipe, examples, out_dir, train, config).train(resume=False, progress=progress)
    for checkpoint in out_dir.glob("step_*"):  # the final bridge is out_dir itself; resume states are not needed
        shutil.rmtree(checkpoint)
    report = {"recipe": asdict(recipe), "heldout_loss_no_bridge": metrics["heldout_loss_baseline"],
              "heldout_loss_bridge": metrics["heldout_loss_trained"],
              "heldout_loss_qwen3_shuffled": metrics["heldout_loss_qwen3_shuffled"],
              "heldout_loss_level_zeroed": metrics["heldout_loss_level_zeroed"]}
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))
    logger.info("tiny bridge (%s): held-out loss %.4f without bridge -> %.4f (Qwen3 shuffled: %.4f)", recipe.mode,
                report["heldout_loss_no_bridge"], report["heldout_loss_bridge"], report["heldout_loss_qwen3_shuffled"])
    return report
