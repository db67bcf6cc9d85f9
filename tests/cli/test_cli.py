"""The command line, in process (typer's runner): extract writes a readable cache and prints the comparison; bad
input exits cleanly with one line. One test runs the console script in its own process."""

import subprocess
import sys

from helpers import make_image
from helpers import run_cli as _run

from bridgecore.model.cache_format import load_cache


def test_the_console_script_runs_in_its_own_process():
    """The one process boundary here: `python -m vision_bridge.cli` (what the `vision-bridge` script runs)."""
    result = subprocess.run([sys.executable, "-m", "vision_bridge.cli", "bulk-edit", "--input", "/nonexistent-input",
                             "--output", "/tmp/unused"], capture_output=True, text=True)
    assert result.returncode == 2 and "error: input '/nonexistent-input' does not exist" in result.stderr


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
    grid = tmp_path / "not-yet" / "g.png"  # its folder is made, as --out's is
    first = _run("edit", str(image), *common, "--out", str(tmp_path / "a.png"), "--compare", str(grid))
    second = _run("edit", str(image), *common, "--out", str(tmp_path / "b.png"), "--baseline")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert grid.exists()


def test_train_then_edit_with_the_trained_bridge(tmp_path, tiny_zoo):
    from bridgecore.zoo.synthetic_triplets import write_triplets

    manifest = write_triplets(tmp_path / "data", 6)
    models = ["--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"]),
              "--condition-area", str(64 * 64)]
    trained = _run("train", "--data", str(manifest), "--out", str(tmp_path / "bridge"), "--steps", "4",
                   "--batch-size", "2", "--eval-every", "2", "--lr", "1e-2", *models)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "held-out flow-matching loss" in trained.stdout and (tmp_path / "bridge" / "step_000004").is_dir()
    assert trained.stdout.strip().splitlines()[-1].startswith("Qwen3 information gain")
    refused = _run("train", "--data", str(manifest), "--out", str(tmp_path / "x"), "--ablate-qwen3", "random", *models)
    assert refused.returncode == 2 and "--ablate-qwen3 must be one of none, shuffle, zeros" in refused.stderr
    common = ["--prompt", "Make the square blue", "--steps", "2", *models]
    source = str(tmp_path / "data" / "00000_source.png")
    enhanced = _run("edit", source, *common, "--bridge", str(tmp_path / "bridge"), "--out", str(tmp_path / "e.png"))
    baseline = _run("edit", source, *common, "--baseline", "--out", str(tmp_path / "b.png"))
    assert enhanced.returncode == 0 and baseline.returncode == 0, enhanced.stderr[-2000:]
    assert (tmp_path / "e.png").read_bytes() != (tmp_path / "b.png").read_bytes()


def test_bulk_edit_dry_run_plans_and_writes_nothing_else(tmp_path, tiny_zoo):
    from helpers import make_inputs

    manifest = make_inputs(tmp_path / "in", n=3)
    out = tmp_path / "out"
    result = _run("bulk-edit", "--input", manifest, "--output", str(out), "--dry-run", "--shard-size", "4",
                  "--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"]))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "9 samples in 3 shards; 0 finished under these settings, 3 to run (9 samples: about " in result.stdout
    assert "GPU-hours on the real models" in result.stdout
    assert "caches     committed      0  to run      3" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["plan"]
    trial = _run("bulk-edit", "--input", manifest, "--output", str(out), "--dry-run", "--shard-size", "4",
                 "--limit", "2", "--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"]))
    # the first 2 samples only (in the shards the full plan already gave them: which ones depends on their ids)
    assert trial.returncode == 0 and trial.stdout.startswith("2 samples in ") and "to run (2 samples:" in trial.stdout
    none = _run("bulk-edit", "--input", manifest, "--output", str(out), "--limit", "0",
                "--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"]))
    assert none.returncode == 2 and "--limit must be at least 1; got 0" in none.stderr
    bad = _run("bulk-edit", "--input", manifest, "--output", str(out), "--dry-run", "--steps", "0",
               "--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"]))
    assert bad.returncode == 2 and "steps must be at least 2; got 0" in bad.stderr and "Traceback" not in bad.stderr


def test_common_mistakes_are_one_line_errors(tmp_path, tiny_zoo):
    from helpers import make_inputs

    manifest = make_inputs(tmp_path / "in", n=1)
    (tmp_path / "a-file").write_text("x")
    models = ["--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"])]
    cases = {("--input", str(tmp_path / "in" / "typo.jsonl"), "--output", str(tmp_path / "o")): "typo.jsonl' does not exist",
             ("--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")): "does not exist (expected a manifest",
             ("--input", manifest, "--output", str(tmp_path / "a-file")): "is a file, not a folder",
             ("--input", manifest, "--output", "/proc/vision-bridge-out"): "cannot write to output",
             ("--input", manifest, "--output", str(tmp_path / "o"), "--batch-size", "0"): "batch_size must be at least 1",
             ("--input", manifest, "--output", str(tmp_path / "o"), "--plus-model", str(tmp_path / "nope")):
                 "no such model directory",
             ("--input", manifest, "--output", str(tmp_path / "o"), "--editor", "qwen-image-2.1"):
                 "is a qwen-image-edit pipeline"}
    for args, message in cases.items():
        result = _run("bulk-edit", *args, *models)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-1500:])
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert not (tmp_path / "o").exists()


def _gzip_server(body: bytes):
    """An HTTP server on loopback that sends `body` gzip-compressed with `Content-Encoding: gzip`."""
    import gzip
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    compressed = gzip.compress(body)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(compressed)))
            self.end_headers()
            self.wfile.write(compressed)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_hostile_manifests_and_addresses_are_one_line_errors(tmp_path, tiny_zoo):
    """FIFOs, devices, oversized and gzip-bombed manifests, transparent HTTP decompression, missing columns, a
    refused connection, an object-store URL with '..', a folder that is no model: each refused in one line, before
    any server starts, with nothing written."""
    import gzip
    import json
    import os
    import time

    from helpers import make_inputs

    manifest = make_inputs(tmp_path / "in", n=1)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    (tmp_path / "packed.jsonl").write_bytes(gzip.compress(b'{"image": "a.png", "instruction": "x"}\n'))
    (tmp_path / "bomb.jsonl.gz").write_bytes(gzip.compress(b"{}\n" * 1_000_000))
    (tmp_path / "columns.jsonl").write_text(json.dumps({"picture": "a.png", "instruction": "x"}) + "\n")
    (tmp_path / "not-a-model").mkdir()
    server = _gzip_server(b'{"image": "a.png", "instruction": "x"}\n' * 1000)
    models = ["--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"])]
    out = str(tmp_path / "o")
    cases = [
        (["--input", str(fifo), "--output", out], {}, "is a FIFO, not a regular file"),
        (["--input", str(tmp_path / "zero.jsonl"), "--output", out], {}, "is a device, not a regular file"),
        (["--input", manifest, "--output", out], {"VISION_BRIDGE_MAX_MANIFEST_BYTES": "10"},
         "larger than the limit of 10 bytes (raise VISION_BRIDGE_MAX_MANIFEST_BYTES)"),
        (["--input", str(tmp_path / "packed.jsonl"), "--output", out], {}, "is gzip-compressed"),
        (["--input", str(tmp_path / "bomb.jsonl.gz"), "--output", out], {"VISION_BRIDGE_MAX_MANIFEST_BYTES": "100000"},
         "inflates to more than the limit of 100000 bytes"),
        (["--input", f"http://127.0.0.1:{server.server_address[1]}/m.jsonl", "--output", out], {},
         "served with Content-Encoding: gzip"),
        (["--input", str(tmp_path / "columns.jsonl"), "--output", out], {},
         "lacks the column 'image' (or 'images', a list); columns found: 'instruction', 'picture'"),
        (["--input", "http://127.0.0.1:9/m.jsonl", "--output", out], {}, "cannot reach http://127.0.0.1:9/m.jsonl"),
        (["--input", manifest, "--output", "s3://bucket/a/../b"], {}, "without '.' or '..' segments"),
        (["--input", manifest, "--output", out, "--qwen3", str(tmp_path / "not-a-model")], {}, "has no config.json"),
    ]
    try:
        for args, env, message in cases:
            started = time.monotonic()
            result = _run("bulk-edit", *models, *args, env=env)
            assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-1500:])
            assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3, result.stderr
            assert time.monotonic() - started < 60, args
    finally:
        server.shutdown()
    assert not (tmp_path / "o").exists()
    (tmp_path / "a-file").write_text("x")
    trained = _run("train", "--data", manifest, "--out", str(tmp_path / "a-file"), *models)
    assert trained.returncode == 2 and "is a file, not a folder" in trained.stderr and "Traceback" not in trained.stderr


def test_bad_numbers_and_paths_are_refused_before_any_work(tmp_path, tiny_zoo):
    """Found by a hostile run: each of these used to run to the end (black edits marked done, a NaN bridge, a
    traceback after the edit, a dry run that planned what the run refuses, a folder feeding its edits back in)."""
    from helpers import make_inputs

    models = ["--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"])]
    manifest = make_inputs(tmp_path / "in", n=1)
    out = str(tmp_path / "out")
    refusals = {
        ("bulk-edit", "--input", manifest, "--output", out, "--dry-run", "--cfg", "inf", *models):
            "cfg must be a finite number >= 1",
        ("train", "--data", "/nonexistent.jsonl", "--out", out, "--lr", "nan", *models):
            "learning_rate must be a finite number > 0",
        ("train", "--data", "/nonexistent.jsonl", "--out", out, "--rank", "0", *models): "rank and num_heads must be",
        ("train", "--data", "/nonexistent.jsonl", "--out", out, "--seed", "-1", *models):
            "seed must be a non-negative integer",
        ("plan", "--condition-area", "0"): "--condition-area must be at least 32*32",
        ("plan", "--images", "10", "--price", "nan"): "price must be a finite number >= 0",
        ("plan", "--images", "10", "--measured", manifest): "not JSON",
        ("bulk-edit", "--input", manifest, "--output", out, "--dry-run", "--rewrite-system-prompt", "be brief", *models):
            "add --rewrite-with qwen3",
        ("edit", str(tmp_path / "in" / "img0.png"), "--prompt", "x", "--out", str(tmp_path), *models):
            "is a folder: give a file name",
        ("edit", str(tmp_path / "in" / "img0.png"), "--prompt", "x", "--out", str(tmp_path / "noext"), *models):
            "needs an image extension",
        ("bulk-edit", "--input", str(tmp_path / "in"), "--prompt", "x", "--output", str(tmp_path / "in" / "o"),
         "--dry-run", *models): "is inside the input folder",
    }
    (tmp_path / "pictures.csv").write_text("id,picture\na,img0.png\n")  # no image column: a dry run refuses it too
    refusals[("bulk-edit", "--input", str(tmp_path / "pictures.csv"), "--output", out, "--dry-run", *models)] = (
        "lacks the column 'image'")
    # a local run of what this machine cannot run at all: one line, not a failure committed for every sample
    run = ("bulk-edit", "--input", manifest, "--output", out, *models)
    refusals[(*run, "--lora", str(tmp_path / "missing.safetensors"))] = "missing.safetensors: no such file"
    import torch

    if not torch.cuda.is_available():
        refusals[(*run, "--fp8", "dynamic")] = "--fp8 dynamic runs the DiT's matmuls on FP8 tensor cores: it needs a CUDA card of compute capability 8.9"
    for args, message in refusals.items():
        result = _run(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-1000:])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written for any


def test_an_error_raised_while_handling_ctrl_c_still_ends_as_an_interruption(tmp_path, monkeypatch, capsys):
    """Prefect's task engine, interrupted before its task run exists, raises ValueError("Task run is not set") from
    inside its KeyboardInterrupt handler: that was `error: Task run is not set`, exit 2, instead of exit 130."""
    import pytest

    from vision_bridge.app import caused_by_interrupt
    from vision_bridge.cli import exit_on

    def prefect_like():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("Task run is not set")

    with pytest.raises(ValueError) as raised:
        prefect_like()
    assert caused_by_interrupt(raised.value) and not caused_by_interrupt(ValueError("bad value"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ended:
        exit_on(raised.value)
    assert ended.value.code == 130 and "interrupted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ended:
        exit_on(ValueError("bad value"))
    assert ended.value.code == 1 and "error: ValueError: bad value" in capsys.readouterr().err
