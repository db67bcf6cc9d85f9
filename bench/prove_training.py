"""Proof that the training machinery learns (tiny random zoo, CPU): held-out flow-matching loss of the trained
bridge vs the zero-init bridge (= Qwen-Image-Edit as is), and the Qwen3 information gain every run measures
(held-out loss with Qwen3 caches shuffled across samples minus with the real ones, 95% CI), for several seeds.
Prints numbers; asserts nothing.

    python bench/prove_training.py [--seeds 0 1 2] [--steps 300] [--samples 32]

This proves the machinery (loss, gradients, optimizer, data path), not information transfer: the random tiny
DiT ignores what its conditioning says. `bench/prove_bridge_information.py` is the mechanism proof.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    from bridgecore.batch.settings import JobSettings
    from bridgecore.zoo.synthetic_triplets import write_triplets
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo
    from bridgecore.batch.training_data import run_training
    from bridgecore.training.trainer import TrainConfig

    zoo = build_tiny_zoo(".vision-bridge/tiny-zoo")
    settings = JobSettings(str(zoo["qwen3-vl"]), str(zoo["qwen-image-edit"]), condition_area=64 * 64)
    work = Path(tempfile.mkdtemp(prefix="vb-train-"))
    print(f"{'seed':>4} {'held-out zero-init':>19} {'held-out trained':>17} {'change':>8} {'Qwen3 shuffled':>15} "
          f"{'information gain [95% CI]':>34} {'corr/base RMS':>14} {'gates text, vision':>19}")
    for seed in args.seeds:
        manifest = write_triplets(work / f"data{seed}", args.samples, seed=seed)
        config = TrainConfig(steps=args.steps, batch_size=4, eval_every=max(1, args.steps // 4),
                             checkpoint_every=args.steps, warmup_steps=10, heldout_fraction=0.25, seed=seed,
                             learning_rate=args.lr)
        metrics = run_training(str(manifest), work / f"ckpt{seed}", settings, config, progress=False)
        base, trained = metrics["heldout_loss_baseline"], metrics["heldout_loss_trained"]
        low, high = metrics["qwen3_information_gain_ci"]
        gates, stats = metrics["gates"], metrics["bridge_statistics"]
        print(f"{seed:>4} {base:>19.5f} {trained:>17.5f} {(trained - base) / base:>+8.2%} "
              f"{metrics['heldout_loss_qwen3_shuffled']:>15.5f} "
              f"{metrics['qwen3_information_gain']:>+12.6f} [{low:+.6f}, {high:+.6f}] "
              f"{stats['correction_rms_ratio']:>14.3f} " + (f"{gates['text']:>+9.3f}, {gates['vision']:+.3f}" if gates
                                                             else f"{'no gates (' + metrics['bridge_mode'] + ')':>19}"))


if __name__ == "__main__":
    main()
