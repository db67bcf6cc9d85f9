"""Proof that the training machinery learns (tiny zoo, CPU): held-out flow-matching loss of the trained bridge
vs the zero-init bridge (= Qwen-Image-Edit as is), for several seeds. Prints numbers; asserts nothing.

    python bench/prove_training.py [--seeds 0 1 2] [--steps 300] [--samples 32]

This proves the machinery (loss, gradients, optimizer, data path), not real-model quality.
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
    from bridgecore.synthetic_triplets import write_triplets
    from bridgecore.tiny_zoo import build_tiny_zoo
    from bridgecore.training import TrainConfig, run_training

    zoo = build_tiny_zoo(".vision-bridge/tiny-zoo")
    settings = JobSettings(str(zoo["qwen3-vl"]), str(zoo["qwen-image-edit"]), condition_area=64 * 64)
    work = Path(tempfile.mkdtemp(prefix="vb-train-"))
    print(f"{'seed':>4} {'held-out zero-init':>19} {'held-out trained':>17} {'change':>8} {'gate |mean|':>12}")
    for seed in args.seeds:
        manifest = write_triplets(work / f"data{seed}", args.samples, seed=seed)
        config = TrainConfig(steps=args.steps, batch_size=4, eval_every=max(1, args.steps // 4),
                             checkpoint_every=args.steps, warmup_steps=10, heldout_fraction=0.25, seed=seed,
                             learning_rate=args.lr)
        metrics = run_training(str(manifest), work / f"ckpt{seed}", settings, config, progress=False)
        base, trained = metrics["heldout_loss_baseline"], metrics["heldout_loss_trained"]
        print(f"{seed:>4} {base:>19.5f} {trained:>17.5f} {(trained - base) / base:>+8.2%} {metrics['gate_abs_mean']:>12.5f}")


if __name__ == "__main__":
    main()
