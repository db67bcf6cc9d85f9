"""Reading input images safely: one clear error per bad file, and RGB the way the pipelines expect.

Qwen-Image-Edit's processors and VAE take 8-bit RGB. Everything else is converted here, visibly:
EXIF orientation is applied, transparency is composited on white (dropping alpha would expose
whatever colour hides under transparent pixels, usually black), CMYK goes through Pillow's
conversion and 16-bit greyscale is scaled to 8 bits instead of being clipped.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# 64 MP: far above the 1 MP the pipelines use, far below what exhausts a worker's memory.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
# Bytes read from one image file before decoding: a device file or a mistaken multi-GB object fails alone.
DEFAULT_MAX_BYTES = int(os.environ.get("VISION_BRIDGE_MAX_IMAGE_BYTES", 256 * 1024 * 1024))
# An input host that stays unreachable fails its sample after this long, not after the storage's budget.
INPUT_RETRY_SECONDS = 20.0


class ImageLoadError(ValueError):
    """An input could not be read as an image. The message names the source."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        array = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes image bytes into an RGB `PIL.Image`, or raises `ImageLoadError` naming `source`."""
    if not data:
        raise ImageLoadError(f"{source}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    f"{source}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                    "(possible decompression bomb; raise max_pixels if the image is genuine)"
                )
            image.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(f"{source}: refused as a decompression bomb ({error})") from error
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(f"{source}: not an image Pillow can identify") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{source}: corrupt or truncated image ({error})") from error
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        logger.debug("%s: converting mode %s to RGB", source, image.mode)
    return _to_rgb(image)


def load_image(source: str | Path | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """Loads a local path, fsspec URL or PIL image as RGB. Errors name the source."""
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source))
    from bridgecore.remote import describe
    from bridgecore.storage import InputTooLargeError, NotARegularFileError, read_uri

    uri = str(source)
    try:
        data = read_uri(uri, max_bytes, budget_s=INPUT_RETRY_SECONDS)
    except FileNotFoundError as error:
        if "://" in uri and error.__cause__ is not None:  # a remote failure fsspec reported as not found
            raise ImageLoadError(describe(uri, error)) from error
        raise ImageLoadError(f"{uri}: file not found") from error
    except (InputTooLargeError, NotARegularFileError) as error:
        raise ImageLoadError(str(error)) from error
    except Exception as error:  # noqa: BLE001 - fsspec backends raise their own types (botocore, aiohttp, ...)
        raise ImageLoadError(describe(uri, error)) from error
    if data[:2] == b"\x1f\x8b":
        raise ImageLoadError(f"{uri}: gzip-compressed data, not an image (a server sending Content-Encoding: gzip?)")
    return decode_image(data, uri, max_pixels)
