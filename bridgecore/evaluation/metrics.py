"""Per-sample capability metrics: judge-free, deterministic, from pixels and Tesseract only.

Each `score_*` takes the edited image (resized to the target's size), the sample's images and its
benchmark metadata, and returns a flat dict of numbers. `edit_success` is in every capability's dict.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
from PIL import Image, ImageOps

from bridgecore.evaluation.benchmark_data import COLOURS

COLOUR_TOLERANCE = 60.0  # RGB distance that still counts as a benchmark colour
_INVISIBLE = re.compile(r"[\s\u200b\u200c\u200d\u2060\ufeff]")


def normalise_text(text: str) -> str:
    """NFC, without whitespace and zero-width characters (Tesseract spaces CJK and Thai freely)."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFC", text))


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    diff = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = float(diff[mask].mean()) if mask is not None else float(diff.mean())
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(255.0**2 / mse))


def box_mask(shape: tuple[int, int], box) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return mask


def colour_mask(image: np.ndarray, colour: str) -> np.ndarray:
    """Pixels of a benchmark colour, opened (3x3) so that scattered noise pixels do not count as an object."""
    from scipy.ndimage import binary_opening

    mask = np.linalg.norm(image.astype(np.float64) - np.array(COLOURS[colour]), axis=-1) < COLOUR_TOLERANCE
    return binary_opening(mask, structure=np.ones((3, 3), dtype=bool))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# -- OCR -----------------------------------------------------------------------------------------------


def read_text(image: Image.Image, box, lang: str, pad: int = 6) -> str:
    """Tesseract on one text line (`--psm 7`) inside `box`, with a margin of the border colour."""
    import pytesseract

    x0, y0, x1, y1 = box
    crop = image.crop((max(0, x0 - pad), max(0, y0 - pad), min(image.width, x1 + pad), min(image.height, y1 + pad)))
    grey = ImageOps.grayscale(crop)
    border = np.concatenate([np.asarray(grey)[0], np.asarray(grey)[-1]])
    if border.mean() < 128:  # light text on a dark card: Tesseract reads dark on light best
        grey = ImageOps.invert(grey)
    grey = ImageOps.expand(grey, border=12, fill=255)
    return pytesseract.image_to_string(grey, lang=lang, config="--psm 7").strip()


def score_ocr(edited: Image.Image, source: Image.Image, meta: dict) -> dict:
    read = normalise_text(read_text(edited, meta["text_box"], meta["tesseract_lang"]))
    target, original = normalise_text(meta["target_text"]), normalise_text(meta["source_text"])
    distance = levenshtein(read, target)
    outside = ~box_mask((edited.height, edited.width), meta["text_box"])
    return {"edit_success": float(read == target), "exact_match": float(read == target),
            "cer": distance / max(1, len(target)), "ned": distance / max(1, len(read), len(target)),
            "source_residue": float(bool(original) and original in read and original != target),
            "preservation_psnr": psnr(np.asarray(edited), np.asarray(source), outside)}


# -- spatial -------------------------------------------------------------------------------------------


def _centroid(mask: np.ndarray) -> np.ndarray | None:
    if mask.sum() < 20:
        return None
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def direction_holds(moved: np.ndarray, reference: np.ndarray, direction: str) -> bool:
    dx, dy = moved - reference
    return {"left of": dx < 0 and abs(dx) > abs(dy), "right of": dx > 0 and abs(dx) > abs(dy),
            "above": dy < 0 and abs(dy) > abs(dx), "below": dy > 0 and abs(dy) > abs(dx)}[direction]


def score_spatial(edited: Image.Image, target: Image.Image, meta: dict) -> dict:
    pixels, goal = np.asarray(edited), np.asarray(target)
    diagonal = float(np.hypot(*pixels.shape[:2]))
    moved = _centroid(colour_mask(pixels, meta["moved"]))
    reference = _centroid(colour_mask(pixels, meta["reference"]))
    wanted = _centroid(colour_mask(goal, meta["moved"]))
    if meta["direction"] == "swap":  # both objects must sit where the other one was
        wanted_reference = _centroid(colour_mask(goal, meta["reference"]))
        tolerance = diagonal / 16
        correct = (moved is not None and reference is not None and np.linalg.norm(moved - wanted) < tolerance
                   and np.linalg.norm(reference - wanted_reference) < tolerance)
    else:
        correct = moved is not None and reference is not None and direction_holds(moved, reference, meta["direction"])
    error = 1.0 if moved is None else float(np.linalg.norm(moved - wanted) / diagonal)
    still = {meta["moved"]} | ({meta["reference"]} if meta["direction"] == "swap" else set())
    unmoved = [o["colour"] for o in meta["objects"] if o["colour"] not in still]
    ious = [iou(colour_mask(pixels, c), colour_mask(goal, c)) for c in unmoved]
    return {"edit_success": float(correct), "direction_correct": float(correct), "position_error": error,
            "unmoved_iou": float(np.mean(ious)) if ious else 1.0}


# -- detail --------------------------------------------------------------------------------------------


def score_detail(edited: Image.Image, source: Image.Image, meta: dict) -> dict:
    from skimage.metrics import structural_similarity

    pixels, original = np.asarray(edited), np.asarray(source)
    inside = box_mask(pixels.shape[:2], meta["edit_box"])
    _, ssim_map = structural_similarity(original, pixels, channel_axis=-1, full=True, data_range=255)
    new_colour = meta["instruction"].rsplit(" ", 1)[-1]
    inner = box_mask(pixels.shape[:2], [v + s for v, s in zip(meta["edit_box"], (8, 8, -8, -8))])
    mean_inside = pixels[inner].reshape(-1, 3).mean(axis=0)
    survived = [np.linalg.norm(pixels[box_mask(pixels.shape[:2], d)].reshape(-1, 3).mean(axis=0)
                               - np.array((20, 120, 20))) < COLOUR_TOLERANCE for d in meta["small_objects"]]
    return {"edit_success": float(np.linalg.norm(mean_inside - np.array(COLOURS[new_colour])) < COLOUR_TOLERANCE),
            "ssim_outside": float(ssim_map[~inside].mean()), "psnr_outside": psnr(pixels, original, ~inside),
            "small_object_survival": float(np.mean(survived)) if survived else 1.0}


# -- multi-image ---------------------------------------------------------------------------------------


def score_multi_image(edited: Image.Image, target: Image.Image, meta: dict) -> dict:
    pixels, goal = np.asarray(edited), np.asarray(target)
    overlap = iou(colour_mask(pixels, meta["object_colour"]), colour_mask(goal, meta["object_colour"]))
    outside = ~box_mask(pixels.shape[:2], meta["object_box"])
    consistent = overlap >= 0.5
    return {"edit_success": float(consistent), "consistency": float(consistent), "object_iou": overlap,
            "background_psnr": psnr(pixels, goal, outside)}


def score_sample(meta: dict, edited: Image.Image, sources: list[Image.Image], target: Image.Image) -> dict:
    """Dispatches on `meta["capability"]`; the edit is resized to the target's size first."""
    edited = edited.convert("RGB").resize(target.size, Image.BICUBIC) if edited.size != target.size else edited.convert("RGB")
    capability = meta["capability"]
    if capability == "ocr":
        return score_ocr(edited, sources[0], meta)
    if capability == "spatial":
        return score_spatial(edited, target, meta)
    if capability == "detail":
        return score_detail(edited, sources[0], meta)
    if capability == "multi_image":
        return score_multi_image(edited, target, meta)
    raise ValueError(f"unknown capability {capability!r}; expected one of ocr, spatial, detail, multi_image")
