"""Simple synthetic edit triplets (source, instruction, target) for training smoke tests and proofs.

"Make the <shape> <colour>": a scene of two shapes on a plain background, the target with one shape
recoloured. Deterministic per seed. Written in the batch pipeline's manifest format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (210, 40, 40), "green": (40, 170, 70), "blue": (40, 70, 210), "yellow": (230, 200, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30)}


def _scene(size: int, shapes: list[tuple[str, str, tuple[int, int, int, int]]], background) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for kind, colour, box in shapes:
        (draw.rectangle if kind == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def write_triplets(folder: str | Path, count: int, size: int = 64, seed: int = 0) -> Path:
    """Writes `count` triplets and `manifest.jsonl` (id, image, instruction, target) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        background = tuple(rng.randint(200, 250) for _ in range(3))
        a = rng.randint(2, size // 2 - 12)
        square = ("square", rng.choice(list(COLOURS)), (a, a, a + size // 3, a + size // 3))
        b = rng.randint(size // 2, size - size // 4 - 2)
        circle = ("circle", rng.choice(list(COLOURS)), (b, b // 2, b + size // 4, b // 2 + size // 4))
        which = rng.choice([0, 1])
        shapes = [square, circle]
        new_colour = rng.choice([c for c in COLOURS if c != shapes[which][1]])
        edited = list(shapes)
        edited[which] = (shapes[which][0], new_colour, shapes[which][2])
        source, target = f"{index:05d}_source.png", f"{index:05d}_target.png"
        _scene(size, shapes, background).save(folder / source)
        _scene(size, edited, background).save(folder / target)
        rows.append({"id": f"triplet-{index:05d}", "image": source, "target": target,
                     "instruction": f"Make the {shapes[which][0]} {new_colour}"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest
