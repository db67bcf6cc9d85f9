"""What tests share besides fixtures (those live in conftest.py): small inputs, one pipeline run, a random bridge,
the CLI in a process. Tests import these from here (`from helpers import make_image`), never from conftest."""

from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw

SMALL_AREA = 128 * 128  # condition area for tests: the real 1024*1024 makes tiny models slow


def _loaded_models():
    from bridgecore.batch.model_pool import LoadedModels

    return LoadedModels()


# The models the in-process tests' runs share (as a worker shares them across its shards): each tiny model loads
# once per session, and `LOADED.counts` before and after a run says what that run computed.
LOADED = _loaded_models()


def run_cli(*args, env=None):
    """A command run in this process (typer's runner: its exit code, stdout and stderr), as a user would type it.
    No process boundary is under test here; an exception the command did not turn into an exit fails the test."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from vision_bridge.cli import app

    result = CliRunner().invoke(app, [str(arg) for arg in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def make_image(width: int = 200, height: int = 120, seed: int = 0) -> Image.Image:
    """A deterministic picture with shapes, so that different seeds give different features."""
    image = Image.new("RGB", (width, height), (240 - 20 * seed % 200, 235, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 6, width // 2, height // 2 + seed % 7), fill=(200, 30 + 10 * seed, 30))
    draw.ellipse((width // 2, height // 3, width - 5, height - 5), fill=(30, 60, 200 - 15 * seed))
    return image


def make_inputs(folder, n=5):
    """A manifest of `n` good samples (with targets) and six hostile ones (empty, not an image, truncated, missing,
    outside the input root, an unreachable bucket)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        make_image(200, 120, i).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "instruction": f"make shape {i} blue", "target": f"img{i}.png"})
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "img0.png").read_bytes()[:200])
    rows += [{"image": "empty.png", "instruction": "x"}, {"image": "text.png", "instruction": "x"},
             {"image": "truncated.png", "instruction": "x"}, {"image": "missing.png", "instruction": "x"},
             {"image": "../outside.png", "instruction": "x"}, {"image": "s3://no-such-bucket-xyz/a.png", "instruction": "x"}]
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(folder / "manifest.jsonl")


def run_all(manifest, output, settings, shard_size=4, loaded=LOADED, **plan_options):
    """Plan, run every pending shard through the bulk-edit pipeline here, summarize: what a local run does."""
    from bridgecore.batch.executor import run_pipeline
    from bridgecore.batch.job_plan import plan_job
    from bridgecore.batch.summary import summarize

    plan = plan_job(manifest, output, settings, "bulk-edit", shard_size=shard_size, **plan_options)
    run_pipeline(output, "bulk-edit", plan.pending, settings, progress=False, loaded=loaded)
    return summarize(output, plan.job, "bulk-edit", settings)


def save_open_bridge(settings, path) -> str:
    """A random bridge of both paths, its residual gate open (its output differs from the baseline), saved at `path`."""
    import torch

    from bridgecore.batch.model_pool import ModelPool
    from bridgecore.model.bridge import BridgeConfig, VisionCacheBridge

    cache = ModelPool(settings, LOADED).extractor.extract([[make_image()]], ["x"])[0]
    torch.manual_seed(0)
    bridge = VisionCacheBridge(BridgeConfig.from_caches(cache.qwen3, cache.qwen25, rank=16, mode="both", num_tokens=2))
    with torch.no_grad():
        for parameter in bridge.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        bridge.gate.fill_(0.5)
    bridge.save_pretrained(path)
    return str(path)


# Run before a server's binary replaces it: a parent-death signal (kept across exec), and an exit if the test session
# is already gone. A server a test session starts dies with it, also when the session is killed.
_TIED = ("import ctypes, os, signal, sys\n"
         "parent = int(sys.argv[1])\n"
         "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
         "if os.getppid() != parent: sys.exit(1)\n"
         "os.execvp(sys.argv[2], sys.argv[2:])\n")


def dies_with_this_process(args: list[str]) -> list[str]:
    """`args` as a command whose process ends when this one does (Linux). Only from the main thread: the kernel sends
    the parent-death signal when the *thread* that started the child ends (a server restarted from a helper thread
    would be killed as that thread returns), so from another thread the command is returned untied."""
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        return [str(a) for a in args]
    return [sys.executable, "-c", _TIED, str(os.getpid()), *[str(a) for a in args]]
