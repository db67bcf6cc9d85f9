"""The mechanism proof (tiny zoo, CPU): does the trained bridge carry what only Qwen3-VL read or saw into the DiT,
and does it cost anything where the DiT's own encoder already knows the answer?

Two tasks on the trained tiny edit model, per seed (see `bridgecore/zoo/information_proof.py`):

- read: Qwen2.5-VL (the DiT's own encoder) reads "Make the <shape>", Qwen3-VL reads the colour too, in one of
  eight wordings; half the training examples give Qwen2.5-VL the full instruction (no-harm training);
- saw: one instruction for every colour ("Make the <shape> the colour of the reference") and a swatch picture
  only Qwen3-VL sees.

Each bridge beside a control trained the same way on shuffled Qwen3 caches. Printed: per-seed tables, the
summary (follow rates with 95% Student t intervals over seeds, seeds formed, unseen phrasings, the paired no-harm
difference with a bootstrap over pictures, the saw task's ablations), a verdict, and one JSON line (`follow_rate`,
`no_harm_difference` + `_ci_low`/`_ci_high`, `seeds_formed`, `follow_rate_unseen_templates`,
`vision_follow_rate`, `vision_follow_rate_control`, ...). Prints numbers; asserts nothing.

    python bench/prove_bridge_information.py [--quick] [--seeds 0 1 2] [--workers 2] [--steps N] [--work DIR]

`--quick`: two seeds, shorter training, fewer pictures, no DeepStack bridge: the whole path in under 10 minutes
on 2 idle cores (with `--workers 2`). It shows that each part runs and roughly where the numbers lie; two seeds
cannot show that every seed forms, and its intervals are wide. The full run: 10 seeds, about 1.5 hours on 2 cores.
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
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--full-share", type=float, default=None,
                        help="share of the read task's training examples where Qwen2.5-VL reads the full instruction")
    parser.add_argument("--lr-schedule", default=None, choices=("constant", "cosine"),
                        help="the learning rate after warm-up: constant (default) or a cosine decay to a tenth over "
                        "the whole run")
    parser.add_argument("--no-saw", action="store_true", help="skip the reference-picture task")
    parser.add_argument("--no-deepstack-bridge", action="store_true",
                        help="skip the saw task's DeepStack ablation bridge (trained on the first 3 seeds otherwise)")
    parser.add_argument("--qwen3-area", type=int, default=None,
                        help="Qwen3-VL's view of each condition image in pixels (the job setting qwen3_area), e.g. 1024 "
                        "= 32x32 against the tiny task's 64x64")
    parser.add_argument("--design", default=None, choices=("both", "tokens", "residual"),
                        help="the bridge's mode for every bridge (default: both)")
    parser.add_argument("--cache-dtype", default=None, choices=("native", "fp8", "int8"),
                        help="every cache through this storage dtype before training and evaluation")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=JSON",
                        help="a BridgeConfig field for every bridge, e.g. num_tokens=2 (repeatable)")
    parser.add_argument("--workers", type=int, default=1, help="seeds run in parallel processes (one thread each)")
    parser.add_argument("--reuse", action="store_true", help="take the bridges already trained in --work with these "
                        "settings and decode them again (only a bridge missing there is trained; the DeepStack bridge "
                        "goes with the first 3 seeds of --seeds)")
    parser.add_argument("--summarize", action="store_true", help="only rebuild the tables and the JSON line from the "
                        "per-seed results in --work (result-seed<N>.json, written as each seed finishes)")
    parser.add_argument("--zoo", default=".vision-bridge/tiny-zoo", help="tiny zoo folder (built and trained if missing)")
    parser.add_argument("--work", default=None, help="folder for the bridge checkpoints (default: a temp folder)")
    args = parser.parse_args()

    import torch

    from bridgecore.training.trainer import json_safe
    from bridgecore.zoo.information_proof import (
        QUICK,
        ProofConfig,
        format_summary,
        format_table,
        load_results,
        run_proof,
        summarize,
        verdict,
    )
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    torch.set_num_threads(1)  # tiny models: as fast, and immune to oversubscription on a shared CPU

    config = QUICK if args.quick else ProofConfig()
    overrides = dict(config.overrides)
    for item in args.override:
        name, _, value = item.partition("=")
        if name == "mode":
            parser.error("--override mode=...: use --design (the proof sets the mode itself)")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--override {item}: the value must be JSON (a string in double quotes)")
    for name, value in (("seeds", tuple(args.seeds) if args.seeds else None), ("steps", args.steps),
                        ("full_share", args.full_share), ("saw", False if args.no_saw else None),
                        ("saw_deepstack", False if args.no_deepstack_bridge else None), ("design", args.design),
                        ("lr_schedule", args.lr_schedule),
                        ("qwen3_area", args.qwen3_area),
                        ("cache_dtype", args.cache_dtype), ("reuse", True if args.reuse else None),
                        ("overrides", overrides)):
        if value is not None:
            config = replace(config, **{name: value})
    start = time.time()
    work = args.work or tempfile.mkdtemp(prefix="vb-proof-")
    if args.summarize:
        results = load_results(work, config.seeds)
        summary = summarize(results, config)
        print(format_table(results, config))
        print(format_summary(summary))
        print(verdict(summary))
        print(json.dumps(json_safe(summary)))
        return
    zoo = build_tiny_zoo(args.zoo, trained=True)
    results, summary = run_proof(zoo["qwen-image-edit-trained"], zoo["qwen3-vl"], config, work,
                                 progress=lambda m: print(f"[{time.time() - start:.0f} s] {m}", file=sys.stderr, flush=True),
                                 workers=args.workers)
    print(format_table(results, config))
    print(format_summary(summary))
    print(f"{verdict(summary)}; {time.time() - start:.0f} s")
    summary["seconds"] = round(time.time() - start, 1)
    print(json.dumps(json_safe(summary)))  # strict JSON: an interval over one seed is null, not NaN


if __name__ == "__main__":
    main()
