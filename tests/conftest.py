"""Shared fixtures: the tiny zoo is built once per test session, offline, and loaded like real models."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL_AREA = 128 * 128  # condition area for tests: the real 1024*1024 makes tiny models slow


def _loaded_models():
    from bridgecore.batch.model_pool import LoadedModels

    return LoadedModels()


# The models the in-process tests' runs share (as a worker shares them across its shards): each tiny model loads
# once per session, and `LOADED.counts` before and after a run says what that run computed.
LOADED = _loaded_models()


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def trained_zoo(tiny_zoo):
    """The zoo plus `qwen-image-edit-trained`, trained once per session with the short test recipe (~1 min)."""
    from bridgecore.zoo.tiny_edit_model import TEST_RECIPE
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    return build_tiny_zoo(tiny_zoo["qwen3-vl"].parent, trained=True, trained_recipe=TEST_RECIPE)


@pytest.fixture(scope="session")
def extractor(tiny_zoo):
    from bridgecore.model.extraction import VisionCacheExtractor

    return VisionCacheExtractor(tiny_zoo["qwen3-vl"], tiny_zoo["qwen-image-edit"], condition_area=SMALL_AREA)


@pytest.fixture(scope="session")
def plus_extractor(tiny_zoo):
    from bridgecore.model.extraction import VisionCacheExtractor

    return VisionCacheExtractor(tiny_zoo["qwen3-vl"], tiny_zoo["qwen-image-edit-plus"], condition_area=SMALL_AREA,
                                plus_condition_area=96 * 96)


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
    from bridgecore.batch.pipeline import plan_job, run_pipeline, summarize

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


@pytest.fixture(scope="session")
def shared_prefect(tmp_path_factory):
    """The API URL of one real Prefect server for the session's CLI runs whose own temporary server is not what
    they test (each would otherwise start one: 10-20 s a run on this machine)."""
    from prefect_server import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("shared-prefect"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS on loopback; sets the standard AWS_* variables that s3fs/botocore read."""
    from s3_server import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweed") / "data")
    server.start()
    previous = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances made before the variables were set would ignore them
    yield server
    server.stop()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def s3_root(s3_server, request):
    """A fresh bucket per test."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + os.urandom(3).hex()
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"
