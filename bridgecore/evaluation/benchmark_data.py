"""The capability benchmark: deterministic (source, instruction, target, metadata) samples.

    vision-bridge make-benchmark OUT [--per-capability N] [--seed S]

Writes `OUT/manifest.jsonl` in the batch pipeline's manifest format (id, image or images, instruction,
target) plus `capability` and what each metric needs (texts and boxes, object boxes and colours, edit
masks), with the images beside it: the same folder runs through `bulk-edit`, trains the bridge and is
scored by `vision-bridge evaluate`.
"""

from __future__ import annotations

import json
import random
import subprocess
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


# Language: (Tesseract code, Noto family, three words). Every word is read back exactly by Tesseract at
# 40-48 px, light and dark cards, +-1 degree (tests/evaluation/test_evaluation.py); words it misread were replaced. Scripts: Latin, Cyrillic, Greek, Arabic, Hebrew,
# Devanagari, Bengali, Tamil, Thai, Hangul, Japanese, Chinese (simplified and traditional), Georgian.
LANGUAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "English": ("eng", "Noto Sans", ("Hello", "Garden", "Window")),
    "German": ("deu", "Noto Sans", ("Hallo", "Garten", "Fenster")),
    "French": ("fra", "Noto Sans", ("Bonjour", "Jardin", "Soleil")),
    "Spanish": ("spa", "Noto Sans", ("Hola", "Jardín", "Ventana")),
    "Italian": ("ita", "Noto Sans", ("Ciao", "Giardino", "Finestra")),
    "Portuguese": ("por", "Noto Sans", ("Olá", "Jardim", "Janela")),
    "Dutch": ("nld", "Noto Sans", ("Hallo", "Tuin", "Venster")),
    "Polish": ("pol", "Noto Sans", ("Cześć", "Ogród", "Okno")),
    "Czech": ("ces", "Noto Sans", ("Ahoj", "Zahrada", "Dveře")),
    "Turkish": ("tur", "Noto Sans", ("Merhaba", "Bahçe", "Pencere")),
    "Vietnamese": ("vie", "Noto Sans", ("Xin chào", "Khu vườn", "Cửa sổ")),
    "Indonesian": ("ind", "Noto Sans", ("Halo", "Taman", "Jendela")),
    "Swedish": ("swe", "Noto Sans", ("Hej", "Trädgård", "Fönster")),
    "Hungarian": ("hun", "Noto Sans", ("Szia", "Kert", "Ablak")),
    "Romanian": ("ron", "Noto Sans", ("Salut", "Grădină", "Fereastră")),
    "Russian": ("rus", "Noto Sans", ("Привет", "Сад", "Окно")),
    "Ukrainian": ("ukr", "Noto Sans", ("Привіт", "Сад", "Вікно")),
    "Bulgarian": ("bul", "Noto Sans", ("Здравей", "Градина", "Прозорец")),
    "Greek": ("ell", "Noto Sans", ("Γειά", "Κήπος", "Παράθυρο")),
    "Arabic": ("ara", "Noto Sans Arabic", ("مرحبا", "مدرسة", "شباك")),  # Tesseract misses حديقة, كتاب, بيت
    "Persian": ("fas", "Noto Sans Arabic", ("مدرسه", "خانه", "ایران")),
    "Hebrew": ("heb", "Noto Sans Hebrew", ("שלום", "גינה", "חלון")),
    "Hindi": ("hin", "Noto Sans Devanagari", ("नमस्ते", "बगीचा", "खिड़की")),
    "Marathi": ("mar", "Noto Sans Devanagari", ("नमस्कार", "बाग", "खिडकी")),
    "Bengali": ("ben", "Noto Sans Bengali", ("বাংলা", "বাগান", "জানালা")),
    "Tamil": ("tam", "Noto Sans Tamil", ("வணக்கம்", "தோட்டம்", "ஜன்னல்")),
    "Thai": ("tha", "Noto Sans Thai", ("ขอบคุณ", "สวน", "หน้าต่าง")),
    "Korean": ("kor", "Noto Sans CJK KR", ("안녕하세요", "정원", "창문")),
    "Japanese": ("jpn", "Noto Sans CJK JP", ("こんにちは", "庭園", "ありがとう")),
    "Chinese (Simplified)": ("chi_sim", "Noto Sans CJK SC", ("你好", "谢谢", "窗户")),
    "Chinese (Traditional)": ("chi_tra", "Noto Sans CJK TC", ("你好", "花園", "窗戶")),
    "Georgian": ("kat", "Noto Sans Georgian", ("გამარჯობა", "ბაღი", "ფანჯარა")),
}
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 70), "blue": (40, 70, 210), "yellow": (235, 200, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left of", "right of", "above", "below")


class FontNotFoundError(RuntimeError):
    """A Noto font is missing: install Debian's fonts-noto-core and fonts-noto-cjk."""


@lru_cache(maxsize=None)
def font_path(family: str) -> tuple[str, int]:
    """(file, face index) of a Noto family through fontconfig; refuses a silent fallback to another family."""
    try:
        out = subprocess.run(["fc-match", "-f", "%{file}|%{index}|%{family}", family], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise FontNotFoundError(f"fontconfig (fc-match) is not available: {error}") from error
    file, index, families = out.split("|", 2)
    if family.lower() not in families.lower():
        raise FontNotFoundError(f"font {family!r} not installed (fontconfig offers {families!r}); "
                                "apt-get install fonts-noto-core fonts-noto-cjk")
    return file, int(index or 0)


def load_font(family: str, size: int) -> ImageFont.FreeTypeFont:
    file, index = font_path(family)
    return ImageFont.truetype(file, size, index=index, layout_engine=ImageFont.Layout.RAQM)


# -- OCR -----------------------------------------------------------------------------------------------


def render_card(text: str, family: str, size: int, colour, background, card=(384, 128), angle: float = 0.0):
    """A text card; returns (image, text box [x0, y0, x1, y1])."""
    font = load_font(family, size)
    image = Image.new("RGB", card, background)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x, y = (card[0] - (right - left)) // 2 - left, (card[1] - (bottom - top)) // 2 - top
    draw.text((x, y), text, font=font, fill=colour)
    box = [x + left - 6, y + top - 6, x + right + 6, y + bottom + 6]
    if angle:
        image = image.rotate(angle, resample=Image.BICUBIC, fillcolor=background)
    return image, [max(0, box[0]), max(0, box[1]), min(card[0], box[2]), min(card[1], box[3])]


def _sign_scene(rng: random.Random, size=(512, 320)) -> tuple[Image.Image, tuple[int, int]]:
    """A simple street-like scene (sky, wall, ground, a post) and where the sign goes."""
    scene = Image.new("RGB", size, tuple(rng.randint(150, 200) for _ in range(2)) + (rng.randint(210, 250),))
    draw = ImageDraw.Draw(scene)
    draw.rectangle([0, size[1] * 2 // 3, size[0], size[1]], fill=(rng.randint(90, 130),) * 3)
    draw.rectangle([0, size[1] // 3, size[0], size[1] * 2 // 3], fill=(rng.randint(150, 190), rng.randint(110, 150), 90))
    offset = (rng.randint(8, size[0] - 392), rng.randint(8, 40))
    draw.rectangle([offset[0] + 186, offset[1] + 128, offset[0] + 198, size[1]], fill=(70, 70, 75))
    return scene, offset


def _place(scene: Image.Image, card: Image.Image, offset: tuple[int, int]) -> Image.Image:
    composed = scene.copy()
    composed.paste(card, offset)
    return composed


def _ocr_sample(rng: random.Random, index: int, out: Path, language: str) -> dict:
    code, family, words = LANGUAGES[language]
    source_text, target_text = rng.sample(words, 2)
    size = rng.choice([40, 44, 48])
    dark = rng.random() < 0.3
    background = (rng.randint(20, 60),) * 3 if dark else tuple(rng.randint(225, 255) for _ in range(3))
    colour = tuple(rng.randint(215, 255) for _ in range(3)) if dark else tuple(rng.randint(0, 70) for _ in range(3))
    angle = rng.uniform(-1.0, 1.0)  # slight: at 2 degrees Tesseract misreads a few words (see README)
    source, box = render_card(source_text, family, size, colour, background, angle=angle)
    target, target_box = render_card(target_text, family, size, colour, background, angle=angle)
    if rng.random() < 0.5:  # a sign in a scene rather than a bare card
        scene, offset = _sign_scene(rng)
        source, target = _place(scene, source, offset), _place(scene, target, offset)
        box = [box[0] + offset[0], box[1] + offset[1], box[2] + offset[0], box[3] + offset[1]]
        target_box = [target_box[0] + offset[0], target_box[1] + offset[1], target_box[2] + offset[0],
                      target_box[3] + offset[1]]
    key = f"ocr-{index:04d}"
    source.save(out / f"{key}_source.png")
    target.save(out / f"{key}_target.png")
    union = [min(box[0], target_box[0]), min(box[1], target_box[1]), max(box[2], target_box[2]),
             max(box[3], target_box[3])]
    return {"id": key, "capability": "ocr", "image": f"{key}_source.png", "target": f"{key}_target.png",
            "instruction": f"Change the text '{source_text}' to '{target_text}'", "language": language,
            "tesseract_lang": code, "source_text": source_text, "target_text": target_text, "text_box": union}


# -- spatial -------------------------------------------------------------------------------------------


def draw_object(draw: ImageDraw.ImageDraw, shape: str, colour, box) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _scene(objects: list[dict], size: int, background) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj["shape"], COLOURS[obj["colour"]], obj["box"])
    return image


def _spatial_sample(rng: random.Random, index: int, out: Path, size: int = 256) -> dict:
    cell = size // 4
    steps = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
    while True:  # redraw until some direction is not already true and lands on a free cell
        count = rng.randint(2, 4)
        colours = rng.sample(list(COLOURS), count)
        cells = rng.sample([(c, r) for c in range(1, 3) for r in range(1, 3)], count)
        moved, reference = 0, 1
        (mc, mr), (rc, rr) = cells[moved], cells[reference]
        already = {"left of": mc < rc, "right of": mc > rc, "above": mr < rr, "below": mr > rr}
        free = {d: (rc + dx, rr + dy) not in cells for d, (dx, dy) in steps.items()}
        choices = [d for d in DIRECTIONS if not already[d] and free[d]]  # leaving it in place must fail
        choices += ["swap"] if rng.random() < 0.25 else []
        if choices:
            break
    objects = [{"shape": rng.choice(SHAPES), "colour": colour,
                "box": [c * cell + 8, r * cell + 8, (c + 1) * cell - 8, (r + 1) * cell - 8]}
               for colour, (c, r) in zip(colours, cells)]
    direction = rng.choice(choices)
    target_objects = [dict(o) for o in objects]
    if direction == "swap":
        target_objects[moved] = {**objects[moved], "box": objects[reference]["box"]}
        target_objects[reference] = {**objects[reference], "box": objects[moved]["box"]}
    else:
        dx, dy = steps[direction]
        new_box = [(rc + dx) * cell + 8, (rr + dy) * cell + 8, (rc + dx + 1) * cell - 8, (rr + dy + 1) * cell - 8]
        target_objects[moved] = {**objects[moved], "box": new_box}
    others = [o for i, o in enumerate(target_objects) if i != moved]
    target_objects = others + [target_objects[moved]]  # the moved one drawn last (on top)
    background = tuple(rng.randint(225, 250) for _ in range(3))
    key = f"spatial-{index:04d}"
    _scene(objects, size, background).save(out / f"{key}_source.png")
    _scene(target_objects, size, background).save(out / f"{key}_target.png")
    m, r = objects[moved], objects[reference]
    instruction = (f"Swap the {m['colour']} {m['shape']} and the {r['colour']} {r['shape']}" if direction == "swap"
                   else f"Move the {m['colour']} {m['shape']} {direction} the {r['colour']} {r['shape']}")
    return {"id": key, "capability": "spatial", "image": f"{key}_source.png", "target": f"{key}_target.png",
            "instruction": instruction,
            "objects": objects, "target_objects": target_objects, "moved": m["colour"], "reference": r["colour"],
            "direction": direction}


# -- detail preservation -------------------------------------------------------------------------------


def _texture(rng: random.Random, size: int) -> tuple[Image.Image, list[list[int]]]:
    image = Image.new("RGB", (size, size), (235, 235, 228))
    draw = ImageDraw.Draw(image)
    kind = rng.choice(["stripes", "checker", "lines"])
    period = rng.choice([4, 6, 8])
    for i in range(0, size, period):
        if kind == "stripes":
            draw.line([(i, 0), (i, size)], fill=(90, 90, 110), width=1)
        elif kind == "lines":
            draw.line([(0, i), (size, i + size // 3)], fill=(120, 80, 60), width=1)
        else:
            for j in range(0, size, period):
                if (i // period + j // period) % 2 == 0:
                    draw.rectangle([i, j, i + period - 1, j + period - 1], fill=(180, 180, 170))
    dots = []
    for _ in range(8):
        x, y = rng.randint(6, size - 10), rng.randint(6, size - 10)
        draw.ellipse([x, y, x + 4, y + 4], fill=(20, 120, 20))
        dots.append([x, y, x + 4, y + 4])
    return image, dots


def _detail_sample(rng: random.Random, index: int, out: Path, size: int = 256) -> dict:
    background, dots = _texture(rng, size)
    old, new = rng.sample([c for c in COLOURS if c != "green"], 2)
    x0, y0 = rng.randint(40, size // 2), rng.randint(40, size // 2)
    box = [x0, y0, x0 + size // 4, y0 + size // 4]
    dots = [d for d in dots if d[2] < box[0] - 2 or d[0] > box[2] + 2 or d[3] < box[1] - 2 or d[1] > box[3] + 2]
    source, target = background.copy(), background.copy()
    ImageDraw.Draw(source).rectangle(box, fill=COLOURS[old])
    ImageDraw.Draw(target).rectangle(box, fill=COLOURS[new])
    key = f"detail-{index:04d}"
    source.save(out / f"{key}_source.png")
    target.save(out / f"{key}_target.png")
    margin = 4
    return {"id": key, "capability": "detail", "image": f"{key}_source.png", "target": f"{key}_target.png",
            "instruction": f"Make the {old} square {new}", "edit_box": [box[0] - margin, box[1] - margin,
                                                                       box[2] + margin, box[3] + margin],
            "small_objects": dots}


# -- multi-image ---------------------------------------------------------------------------------------


def _multi_sample(rng: random.Random, index: int, out: Path, size: int = 256) -> dict:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    count = rng.choice([2, 3])
    backgrounds = [tuple(rng.randint(150, 250) for _ in range(3)) for _ in range(count)]
    box = [size // 3, size // 3, 2 * size // 3, 2 * size // 3]
    key = f"multi-{index:04d}"
    names = []
    for i, background in enumerate(backgrounds):
        image = Image.new("RGB", (size, size), background)
        if i == 1:  # picture 2 holds the object
            draw_object(ImageDraw.Draw(image), shape, COLOURS[colour], box)
        names.append(f"{key}_picture{i + 1}.png")
        image.save(out / names[-1])
    target = Image.new("RGB", (size, size), backgrounds[0])
    draw_object(ImageDraw.Draw(target), shape, COLOURS[colour], box)
    target.save(out / f"{key}_target.png")
    return {"id": key, "capability": "multi_image", "images": names, "target": f"{key}_target.png",
            "instruction": f"Put the {colour} {shape} from picture 2 in the middle of picture 1",
            "object_colour": colour, "object_box": box}


def make_benchmark(out: str | Path, per_capability: int = 8, seed: int = 0,
                   languages: list[str] | None = None) -> Path:
    """Writes the benchmark; OCR cycles through `languages` (default: all of `LANGUAGES`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    languages = languages or list(LANGUAGES)
    rows = [_ocr_sample(rng, i, out, languages[i % len(languages)]) for i in range(per_capability)]
    rows += [_spatial_sample(rng, i, out) for i in range(per_capability)]
    rows += [_detail_sample(rng, i, out) for i in range(per_capability)]
    rows += [_multi_sample(rng, i, out) for i in range(per_capability)]
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    return manifest
