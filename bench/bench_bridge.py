"""Bridge and edit costs: bridge latency vs one DiT step (tiny, CPU), bridge FLOPs vs a full edit at real
dims (planner), batched vs one-by-one edit throughput (tiny, CPU). Prints ratios; asserts nothing.

    python bench/bench_bridge.py [--zoo DIR] [--steps 4] [--samples 6]
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image, ImageDraw


def timed(fn, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def image(seed: int) -> Image.Image:
    picture = Image.new("RGB", (200, 120), (230, 230 - 8 * seed, 220))
    ImageDraw.Draw(picture).ellipse((20 + seed, 20, 150, 110 - seed), fill=(200, 20, 20 + 12 * seed))
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=".vision-bridge/tiny-zoo")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--area", type=int, default=64 * 64)
    args = parser.parse_args()

    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit
    from bridgecore.planning.planner import plan
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    zoo = build_tiny_zoo(args.zoo)
    editor = EnhancedQwenImageEdit(zoo["qwen-image-edit"], zoo["qwen3-vl"], condition_area=args.area)
    cache = editor.extractor.extract(image(0), "make it blue")
    bridge = editor.bridge_for(cache.qwen3, cache.qwen25)
    with torch.no_grad():
        bridge.gate.fill_(0.5)  # an open gate: the full computation runs
        bridge_s = timed(lambda: bridge(cache.qwen3, cache.qwen25))
    pipe = editor.pipe
    embeds = cache.qwen25.prompt_embeds[None]
    latents = torch.randn(1, 2 * (args.area // 256), pipe.transformer.config.in_channels)
    side = int((args.area // 256) ** 0.5)
    with torch.no_grad():
        dit_s = timed(lambda: pipe.transformer(hidden_states=latents, encoder_hidden_states=embeds,
                                               encoder_hidden_states_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                               timestep=torch.tensor([0.5]), img_shapes=[[(1, side, side)] * 2],
                                               return_dict=False))
    with torch.no_grad():
        bridge.gate.zero_()

    images = [image(i) for i in range(args.samples)]
    prompts = [f"make shape {i} blue" for i in range(args.samples)]
    start = time.perf_counter()
    for i, (picture, prompt) in enumerate(zip(images, prompts)):
        editor.generate(picture, prompt, seed=i, num_inference_steps=args.steps, output_type="np")
    single = args.samples / (time.perf_counter() - start)
    start = time.perf_counter()
    editor.generate(images, prompts, seed=list(range(args.samples)), num_inference_steps=args.steps, output_type="np")
    batched = args.samples / (time.perf_counter() - start)

    report = plan(1024, 1024)
    edit_flops = (report["flops"]["qwen25_extraction"]["total"] + report["flops"]["qwen3_extraction"]["total"]
                  + 50 * report["flops"]["dit_step"])
    print(f"tiny dims, CPU: bridge forward {bridge_s * 1e3:.2f} ms, one DiT step {dit_s * 1e3:.2f} ms, "
          f"bridge / DiT step = {bridge_s / dit_s:.3f}")
    print(f"real dims (planner): bridge {report['bridge']['parameters'] / 1e6:.2f}M params, "
          f"{report['flops']['bridge'] / 1e9:.1f} GFLOP; bridge / one DiT step = {report['bridge']['flops_vs_dit_step']:.2e}; "
          f"bridge / full edit (2 extractions + 50 steps, no CFG) = {report['flops']['bridge'] / edit_flops:.2e}")
    print(f"edits ({args.samples} samples, {args.steps} steps, tiny, CPU): one by one {single:.2f}/s, "
          f"batched {batched:.2f}/s, batched / one-by-one = {batched / single:.2f}x")


if __name__ == "__main__":
    main()
