"""The command line: extract writes a readable cache and prints the comparison; bad input exits cleanly."""

import subprocess
import sys

from conftest import make_image

from bridgecore.cache_format import load_cache


def _run(*args):
    return subprocess.run([sys.executable, "-m", "bridgecore.cli", *args], capture_output=True, text=True)


def test_extract_command(tmp_path, tiny_zoo):
    image = tmp_path / "in.png"
    make_image().save(image)
    out = tmp_path / "c.safetensors"
    result = _run("extract", str(image), "--prompt", "make it blue", "--out", str(out),
                  "--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"]),
                  "--condition-area", str(96 * 96))
    assert result.returncode == 0, result.stderr
    assert "Dimension ratio: 2.000" in result.stdout and "Vision token count match" in result.stdout
    cache = load_cache(str(out))
    assert cache.prompt == "make it blue" and cache.image_sizes == [(200, 120)]


def test_extract_bad_image_is_one_line_error(tmp_path, tiny_zoo):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    result = _run("extract", str(bad), "--prompt", "x", "--out", str(tmp_path / "c.safetensors"),
                  "--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"]))
    assert result.returncode == 2
    assert "bad.png: file is empty" in result.stderr and "Traceback" not in result.stderr


def test_edit_command_baseline_and_untrained_default_are_identical(tmp_path, tiny_zoo):
    image = tmp_path / "in.png"
    make_image().save(image)
    common = ["--prompt", "make it blue", "--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model",
              str(tiny_zoo["qwen-image-edit"]), "--steps", "2", "--condition-area", str(64 * 64)]
    first = _run("edit", str(image), *common, "--out", str(tmp_path / "a.png"), "--compare", str(tmp_path / "g.png"))
    second = _run("edit", str(image), *common, "--out", str(tmp_path / "b.png"), "--baseline")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "g.png").exists()
