"""Bad and unusual inputs: every mode converts the way the pipeline expects; every bad file names itself."""

import io

import numpy as np
import pytest
from PIL import Image

from bridgecore.model.images import ImageLoadError, load_image


def _save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent: colour must not leak
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = load_image(_save(tmp_path, image, "a.png"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (255, 0, 0)


def test_la_and_palette_with_transparency(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(_save(tmp_path, la, "la.png")).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    rgb = load_image(_save(tmp_path, palette, "p.png", transparency=1))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_greyscale_cmyk_and_16_bit(tmp_path):
    assert load_image(_save(tmp_path, Image.new("L", (4, 4), 77), "l.png")).getpixel((0, 0)) == (77, 77, 77)
    cmyk = load_image(_save(tmp_path, Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "c.jpg"))
    red, green, blue = cmyk.getpixel((0, 0))
    assert red > 200 and green < 60 and blue < 60
    sixteen = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    value = load_image(_save(tmp_path, sixteen, "i16.png")).getpixel((0, 0))
    assert value == (128, 128, 128)  # scaled, not clipped to 255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("empty.png", b"", "empty"),
        ("text.png", b"this is not an image at all", "not an image"),
    ],
)
def test_bad_bytes_raise_one_clear_error(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match=reason) as error:
        load_image(path)
    assert name in str(error.value)


def test_truncated_and_missing_files(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="missing.png: file not found"):
        load_image(tmp_path / "missing.png")


def test_decompression_bomb_is_refused(tmp_path):
    path = _save(tmp_path, Image.new("L", (3000, 3000)), "bomb.png")
    with pytest.raises(ImageLoadError, match="bomb.png.*decompression bomb"):
        load_image(path, max_pixels=1_000_000)
