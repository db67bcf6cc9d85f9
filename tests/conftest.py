"""Shared fixtures: the tiny zoo is built once per test session, offline, and loaded like real models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n 2`) each worker is one process on one core: one torch thread each, as two threads per
# worker on 2 cores spend their time waiting on each other (tiny matmuls). Set before anything imports torch.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import LOADED, SMALL_AREA  # noqa: F401 - the fixtures below use them


def pytest_collection_modifyitems(config, items):
    """Under xdist (`--dist loadgroup`) every test on the S3 server runs in one worker: SeaweedFS listens on fixed
    ports, so one server per session, not one per worker."""
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("s3"))


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """Built once per session; under xdist once for all workers (in their shared temporary folder, under the zoo's
    own lock: a later worker finds the models built)."""
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    root = tmp_path_factory.getbasetemp().parent / "zoo" if WORKER else tmp_path_factory.mktemp("zoo")
    return build_tiny_zoo(root)


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
