"""The mechanism proof (tiny zoo, CPU): does the trained bridge carry Qwen3-VL information into the DiT?

On the trained tiny edit model, Qwen2.5-VL (the DiT's own encoder) reads "Make the <shape>" with the
colour word removed while Qwen3-VL reads the full instruction. Per seed the bridge is trained normally and
with Qwen3 caches shuffled across samples (the control); the table gives held-out flow-matching loss, gain
over the zero-init bridge and decoded edit success for: the zero-init bridge, the trained bridge, the
trained bridge evaluated with shuffled Qwen3 caches, the shuffle-trained bridge, and, as a reference, the DiT
given the full instruction by its own encoder (what a perfect transfer could reach). The last line is
one JSON object: gains as fractions of the baseline held-out loss, `diff = gain_real - gain_shuffled` with a
95% CI resampling seeds and held-out samples. Prints numbers; asserts nothing.

    python bench/prove_bridge_information.py [--quick] [--seeds 0 1 2] [--steps N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and steps (a few minutes on 2 cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--zoo", default=".vision-bridge/tiny-zoo", help="tiny zoo folder (built and trained if missing)")
    parser.add_argument("--work", default=None, help="folder for the bridge checkpoints (default: a temp folder)")
    args = parser.parse_args()

    import torch

    from bridgecore.information_proof import QUICK, ProofConfig, format_table, run_proof
    from bridgecore.tiny_zoo import build_tiny_zoo

    torch.set_num_threads(1)  # tiny models: as fast, and immune to oversubscription on a shared CPU

    config = QUICK if args.quick else ProofConfig()
    if args.seeds:
        config = replace(config, seeds=tuple(args.seeds))
    if args.steps:
        config = replace(config, steps=args.steps)
    start = time.time()
    zoo = build_tiny_zoo(args.zoo, trained=True)
    work = args.work or tempfile.mkdtemp(prefix="vb-proof-")
    results, summary = run_proof(zoo["qwen-image-edit-trained"], zoo["qwen3-vl"], config, work,
                                 progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(results))
    verdict = "beats" if summary["bridge_beats_shuffled_control"] else "does NOT beat"
    print(f"the trained bridge {verdict} the shuffled-Qwen3 control: diff {summary['diff']:+.2%} of the baseline loss "
          f"[95% CI {summary['diff_ci_low']:+.2%}, {summary['diff_ci_high']:+.2%}] over {summary['seeds']} seeds "
          f"x {summary['heldout_samples']} held-out samples; {time.time() - start:.0f} s")
    summary["seconds"] = round(time.time() - start, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
