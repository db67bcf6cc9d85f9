"""Synthetic edit triplets (source, instruction, target) whose result depends on the instruction.

"Make the <shape> <colour>": a square (left half) and a circle (right half) on a light background; the
target recolours the named shape. Which shape and which colour come only from the instruction, so an
editor that ignores it cannot do better than guess. Used to train the tiny edit model
(`tiny_edit_model.py`), the bridge's tests and proofs. Deterministic per seed.

With `images_per_sample=2` the sample is an Edit-Plus one: picture 2 is a swatch of the new colour
and the instruction says "Make the <shape> the colour of picture 2".

Two variants test what a bridge generalises to (see `information_proof.py`):

- phrasings: `TRAINING_TEMPLATES` word the instruction several ways, with the colour word both after a
  space and glued to punctuation (a byte-level BPE gives " red" and "red" different tokens);
  `HELDOUT_TEMPLATES` are never trained on;
- a reference picture (`make_reference_triplets`): the new colour exists only as a swatch picture and the
  instruction is the same for every colour, "Make the <shape> the colour of the reference".
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (210, 40, 40), "green": (40, 170, 70), "blue": (40, 70, 210), "yellow": (230, 200, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30)}
SHAPES = ("square", "circle")

CANONICAL_TEMPLATE = "Make the {shape} {colour}"  # the one phrasing the tiny edit model was trained on
TRAINING_TEMPLATES = (
    CANONICAL_TEMPLATE,
    "Paint the {shape} {colour}",
    "Change the {shape} to {colour}",
    "Turn the {shape} {colour}, please",
    "Colour the {shape} {colour}",
    "Make the {shape}:{colour}",  # no space before the colour: other tokens for the same word
    "Recolour the {shape} '{colour}'",
    "{colour} is for the {shape}",
)
# never trained on; "space" / "no space": how the colour word is tokenised (after a space, or glued)
HELDOUT_TEMPLATES = {
    "The {shape} should become {colour}": "space",
    "Make the {shape} {colour} now, please": "space",
    "Give the {shape} a {colour} look": "space",
    "Set the {shape} colour={colour}": "no space",
    "Make the {shape} ({colour})": "no space",
}
REFERENCE_INSTRUCTION = "Make the {shape} the colour of the reference"


@dataclass
class Triplet:
    """One edit: `source` -> `target` under `instruction`; `shapes` maps shape -> (colour, box) in the source."""

    source: Image.Image
    target: Image.Image
    instruction: str
    shape: str  # the shape the instruction names
    colour: str  # the colour it asks for
    shapes: dict[str, tuple[str, tuple[int, int, int, int]]]
    extra_images: tuple[Image.Image, ...] = ()  # Edit-Plus: pictures 2.. (a colour swatch)
    references: tuple[Image.Image, ...] = ()  # pictures only Qwen3-VL sees (the reference task's swatch)

    @property
    def images(self) -> list[Image.Image]:
        return [self.source, *self.extra_images]

    def instruction_without_colour(self) -> str:
        """The instruction with the colour word removed: what an encoder that must not know it reads."""
        return f"Make the {self.shape}"

    def phrased(self, template: str, colour: str | None = None) -> str:
        """The instruction in another wording (`TRAINING_TEMPLATES`, `HELDOUT_TEMPLATES`), optionally another colour."""
        return template.format(shape=self.shape, colour=colour or self.colour)

    def with_reference(self, colour: str, seed: int = 0) -> Image.Image:
        """A swatch of `colour` like this sample's reference (same size, a slight seeded tint)."""
        return swatch(colour, self.source.width, random.Random(seed))


def _draw(size: int, shapes: dict[str, tuple[str, tuple]], background) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for kind, (colour, box) in shapes.items():
        (draw.rectangle if kind == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def make_triplet(rng: random.Random, size: int = 64, images_per_sample: int = 1) -> Triplet:
    """One random triplet; the square stays in the left half and the circle in the right half."""
    background = tuple(rng.randint(200, 250) for _ in range(3))
    half = size // 2
    boxes = {}
    for kind, x_min in (("square", 0), ("circle", half)):
        extent = rng.randint(size // 4, size * 3 // 8)
        x = rng.randint(x_min + 2, x_min + half - extent - 2)
        y = rng.randint(2, size - extent - 2)
        boxes[kind] = (x, y, x + extent, y + extent)
    colours = rng.sample(list(COLOURS), 2)
    shapes = {kind: (colour, boxes[kind]) for kind, colour in zip(SHAPES, colours)}
    shape = rng.choice(SHAPES)
    new_colour = rng.choice([c for c in COLOURS if c != shapes[shape][0]])
    edited = dict(shapes)
    edited[shape] = (new_colour, shapes[shape][1])
    extra: tuple[Image.Image, ...] = ()
    instruction = f"Make the {shape} {new_colour}"
    if images_per_sample == 2:
        extra = (Image.new("RGB", (size, size), COLOURS[new_colour]),)
        instruction = f"Make the {shape} the colour of picture 2"
    elif images_per_sample != 1:
        raise ValueError(f"images_per_sample must be 1 or 2; got {images_per_sample}")
    return Triplet(_draw(size, shapes, background), _draw(size, edited, background), instruction, shape, new_colour,
                   shapes, extra)


def make_triplets(count: int, size: int = 64, seed: int = 0, images_per_sample: int = 1) -> list[Triplet]:
    rng = random.Random(seed)
    return [make_triplet(rng, size, images_per_sample) for _ in range(count)]


def swatch(colour: str, size: int, rng: random.Random) -> Image.Image:
    """A flat picture of a palette colour, tinted by up to 12 levels per channel (nearest colour unchanged)."""
    return Image.new("RGB", (size, size), tuple(int(min(255, max(0, c + rng.randint(-12, 12)))) for c in COLOURS[colour]))


def make_reference_triplets(count: int, size: int = 64, seed: int = 0) -> list[Triplet]:
    """The reference task: the new colour is only in a swatch picture (`Triplet.references`) and the instruction is
    "Make the <shape> the colour of the reference" for every colour; pictures and targets as `make_triplets`."""
    rng = random.Random(seed)
    triplets = []
    for _ in range(count):
        triplet = make_triplet(rng, size)
        triplets.append(Triplet(triplet.source, triplet.target, REFERENCE_INSTRUCTION.format(shape=triplet.shape),
                                triplet.shape, triplet.colour, triplet.shapes, references=(swatch(triplet.colour, size, rng),)))
    return triplets


def shape_mask(kind: str, box: tuple[int, int, int, int], size: int, margin: int = 2) -> np.ndarray:
    """Boolean [size, size] mask of a shape's interior (shrunk by `margin` px, away from blurred edges)."""
    x0, y0, x1, y1 = box
    image = Image.new("L", (size, size), 0)
    inner = (x0 + margin, y0 + margin, x1 - margin, y1 - margin)
    (ImageDraw.Draw(image).rectangle if kind == "square" else ImageDraw.Draw(image).ellipse)(inner, fill=1)
    return np.asarray(image, dtype=bool)


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda name: float(np.linalg.norm(np.asarray(rgb, dtype=np.float64) - COLOURS[name])))


def edit_success(triplet: Triplet, edited: Image.Image) -> bool:
    """Whether `edited` shows the named shape in the asked colour and the other shape unchanged
    (mean colour inside each shape, nearest of the palette)."""
    pixels = np.asarray(edited.convert("RGB").resize(triplet.source.size), dtype=np.float64)
    for kind, (colour, box) in triplet.shapes.items():
        wanted = triplet.colour if kind == triplet.shape else colour
        mean = pixels[shape_mask(kind, box, pixels.shape[0])].mean(axis=0)
        if nearest_colour(mean) != wanted:
            return False
    return True


def write_if_changed(path: Path, data: bytes) -> bool:
    """Writes `data` to `path` unless the file already holds exactly these bytes (its modification time, which
    identifies an input to the batch system, stays as it was). Returns whether it wrote."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.write_bytes(data)
    return True


def encode_png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_triplets(folder: str | Path, count: int, size: int = 64, seed: int = 0, images_per_sample: int = 1,
                   references: bool = False) -> Path:
    """Writes `count` triplets and `manifest.jsonl` (id, image or images, instruction, target) into `folder`; files
    already holding the same bytes are left alone, so writing the same set again changes no input of a job. With
    `references`, the reference task's samples (`make_reference_triplets`): each row has `reference_images`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    triplets = (make_reference_triplets(count, size, seed) if references
                else make_triplets(count, size, seed, images_per_sample))
    for index, triplet in enumerate(triplets):
        names = [f"{index:05d}_source.png"] + [f"{index:05d}_picture{i + 2}.png" for i in range(len(triplet.extra_images))]
        for name, image in zip(names, triplet.images):
            write_if_changed(folder / name, encode_png(image))
        target = f"{index:05d}_target.png"
        write_if_changed(folder / target, encode_png(triplet.target))
        row = {"id": f"triplet-{index:05d}", "target": target, "instruction": triplet.instruction}
        row.update({"image": names[0]} if len(names) == 1 else {"images": names})
        if triplet.references:
            reference_names = [f"{index:05d}_reference{i + 1}.png" for i in range(len(triplet.references))]
            for name, image in zip(reference_names, triplet.references):
                write_if_changed(folder / name, encode_png(image))
            row["reference_images"] = reference_names
        rows.append(row)
    manifest = folder / "manifest.jsonl"
    write_if_changed(manifest, ("\n".join(json.dumps(r) for r in rows) + "\n").encode())
    return manifest
