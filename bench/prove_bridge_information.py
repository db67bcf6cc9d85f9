"""The mechanism proof (tiny zoo, CPU): does the trained bridge carry Qwen3-VL information into the DiT?

On the trained tiny edit model, Qwen2.5-VL (the DiT's own encoder) reads "Make the <shape>" with the
colour word removed while Qwen3-VL reads the full instruction. Per seed, each bridge design (residual,
tokens, both) is trained, and a control of the default design is trained on Qwen3 caches shuffled across
samples. The headline is counterfactual: held-out images are edited with Qwen3-VL reading every colour
word in turn (Qwen2.5-VL's prompt unchanged), and the decoded colour is read back:

- follow rate: decoded colour == the colour Qwen3-VL read (guessing: 17%);
- changed rate: the edit changes at all when only Qwen3-VL's colour word changes;
- fraction captured = (L_control - L_bridge) / (L_control - L_reference) on held-out flow-matching loss.

Intervals are 95% Student t over seeds. The last line is one JSON object (`follow_rate`,
`follow_rate_control`, `fraction_captured`, `fraction_captured_ci_low`, `fraction_captured_ci_high`, per-design
numbers under `designs`, and the earlier `gain_real`, `gain_shuffled`, `diff`). Prints numbers; asserts nothing.

    python bench/prove_bridge_information.py [--quick] [--seeds 0 1 2 3 4] [--designs tokens] [--steps N] [--work DIR]
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
    parser.add_argument("--quick", action="store_true", help="2 seeds, fewer samples and steps (under 10 minutes on 2 cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--designs", nargs="+", default=None, choices=("residual", "tokens", "both"))
    parser.add_argument("--default-design", default=None, choices=("residual", "tokens", "both"),
                        help="the design of the headline numbers and of the shuffled-Qwen3 control")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--num-tokens", type=int, default=None)
    parser.add_argument("--zoo", default=".vision-bridge/tiny-zoo", help="tiny zoo folder (built and trained if missing)")
    parser.add_argument("--work", default=None, help="folder for the bridge checkpoints (default: a temp folder)")
    args = parser.parse_args()

    import torch

    from bridgecore.zoo.information_proof import QUICK, ProofConfig, format_summary, format_table, run_proof
    from bridgecore.training.trainer import json_safe
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    torch.set_num_threads(1)  # tiny models: as fast, and immune to oversubscription on a shared CPU

    config = QUICK if args.quick else ProofConfig()
    for name, value in (("seeds", tuple(args.seeds) if args.seeds else None), ("steps", args.steps),
                        ("designs", tuple(args.designs) if args.designs else None),
                        ("default_design", args.default_design), ("num_tokens", args.num_tokens)):
        if value is not None:
            config = replace(config, **{name: value})
    if config.default_design not in config.designs:
        config = replace(config, designs=(*config.designs, config.default_design))
    start = time.time()
    zoo = build_tiny_zoo(args.zoo, trained=True)
    work = args.work or tempfile.mkdtemp(prefix="vb-proof-")
    results, summary = run_proof(zoo["qwen-image-edit-trained"], zoo["qwen3-vl"], config, work,
                                 progress=lambda m: print(f"[{time.time() - start:.0f} s] {m}", file=sys.stderr, flush=True))
    print(format_table(results, config))
    print(format_summary(summary))
    verdict = "captures" if summary["bridge_beats_shuffled_control"] else "does NOT capture"
    print(f"the {summary['design']} bridge {verdict} part of the reference's advantage over the shuffled-Qwen3 control: "
          f"fraction {summary['fraction_captured']:+.2f} [95% CI {summary['fraction_captured_ci_low']:+.2f}, "
          f"{summary['fraction_captured_ci_high']:+.2f}] over {summary['seeds']} seeds; follow rate "
          f"{summary['follow_rate']:.0%} vs control {summary['follow_rate_control']:.0%}; {time.time() - start:.0f} s")
    summary["seconds"] = round(time.time() - start, 1)
    print(json.dumps(json_safe(summary)))  # strict JSON: an interval over one seed is null, not NaN


if __name__ == "__main__":
    main()
