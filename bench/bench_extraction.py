"""Extraction throughput (single vs batched) and memory (RSS before load, after load, after unload).

    python bench/bench_extraction.py [--zoo DIR] [--samples 16] [--batch 8] [--area 16384]

Prints numbers and ratios; asserts nothing. Uses the tiny zoo (built if missing) unless --qwen3 and
--edit-model name real models.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from PIL import Image, ImageDraw


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def sample_images(count: int) -> list[Image.Image]:
    images = []
    for i in range(count):
        image = Image.new("RGB", (320, 240), (230, 230 - 5 * i, 220))
        ImageDraw.Draw(image).ellipse((20 + i, 30, 200, 200 - i), fill=(200, 20, 20 + 10 * i))
        images.append(image)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=".vision-bridge/tiny-zoo")
    parser.add_argument("--qwen3")
    parser.add_argument("--edit-model")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--area", type=int, default=128 * 128)
    args = parser.parse_args()

    from bridgecore.model.extraction import VisionCacheExtractor
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    zoo = build_tiny_zoo(args.zoo) if not (args.qwen3 and args.edit_model) else {}
    before = rss_mib()
    extractor = VisionCacheExtractor(args.qwen3 or zoo["qwen3-vl"], args.edit_model or zoo["qwen-image-edit"],
                                     condition_area=args.area)
    images = sample_images(args.samples)
    prompts = [f"make shape {i} blue" for i in range(args.samples)]
    extractor.extract(images[0], prompts[0])  # load + warm up
    loaded = rss_mib()
    weights = sum(p.numel() * p.element_size() for m in (extractor._qwen3.get().model, extractor.qwen25_encoder.text_encoder)
                  for p in m.parameters()) / 2**20

    start = time.perf_counter()
    for image, prompt in zip(images, prompts):
        extractor.extract(image, prompt)
    single = args.samples / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, args.samples, args.batch):
        extractor.extract(images[i:i + args.batch], prompts[i:i + args.batch])
    batched = args.samples / (time.perf_counter() - start)

    extractor.unload()
    gc.collect()
    unloaded = rss_mib()
    print(f"extraction, {args.samples} samples, condition area {args.area} px")
    print(f"  one by one : {single:8.2f} samples/s")
    print(f"  batch {args.batch:<4} : {batched:8.2f} samples/s   (batched / single = {batched / single:.2f}x)")
    print(f"  RSS MiB    : before load {before[0]:.0f}, after load {loaded[0]:.0f}, after unload {unloaded[0]:.0f} "
          f"(peak {unloaded[1]:.0f})")
    print(f"  unload freed {loaded[0] - unloaded[0]:.0f} MiB for {weights:.0f} MiB of weights "
          "(the rest of the growth is library code and kernels, which stay loaded)")


if __name__ == "__main__":
    main()
