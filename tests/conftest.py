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


GROUPS_FILE = "VISION_BRIDGE_TEST_GROUPS"  # where the workers write {test id: group} for the controller's scheduler


def pytest_configure(config):
    if not WORKER and getattr(config.option, "dist", "no") == "loadgroup":  # the controller, before it starts workers
        import tempfile

        os.environ[GROUPS_FILE] = os.path.join(tempfile.mkdtemp(prefix="vb-test-groups-"), "groups.json")


def pytest_unconfigure(config):
    if not WORKER and os.environ.get(GROUPS_FILE):
        import shutil

        shutil.rmtree(os.path.dirname(os.environ.pop(GROUPS_FILE)), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Under xdist (`--dist loadgroup`, see scripts/run_tests.sh) each worker says which tests must share a worker:
    - every test on the S3 server: SeaweedFS listens on fixed ports, so one server per session;
    - a module's tests where it has a module-scoped fixture: built once (a model fitted, a benchmark scored), not once
      per worker that happens to get one of its tests;
    and the slow tests go first (the work queue keeps this order), so that the short ones fill the workers' gaps at
    the end instead of one long test running alone. (xdist's own `xdist_group` marks no longer reach its scheduler on
    pytest 9: pytest-dev/pytest-xdist#1386; `GroupScheduling` below reads this file instead.)"""
    if not WORKER or not os.environ.get(GROUPS_FILE):  # one process: collection order, each module's tests together
        return
    import json

    groups = {}
    for item in items:
        if "s3_server" in item.fixturenames:
            groups[item.nodeid] = "s3"
        elif any(defs[-1].scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values()):
            groups[item.nodeid] = item.module.__name__
    # slow tests, then the groups (whole modules: large units), then the rest; stable: collection order otherwise
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, item.nodeid not in groups))
    path = os.environ[GROUPS_FILE]
    with open(f"{path}.{WORKER}", "w") as handle:  # every worker collects the same tests: the last rename wins
        json.dump(groups, handle)
    os.replace(f"{path}.{WORKER}", path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with the groups the workers wrote: a group is one unit of work, the rest one test each,
    in the workers' collection order (slow first)."""
    if getattr(config.option, "dist", "no") != "loadgroup":
        return None
    import json

    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        groups: dict | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # first asked once every worker has collected (and written the file)
                with open(os.environ[GROUPS_FILE]) as handle:
                    self.groups = json.load(handle)
            return self.groups.get(nodeid, nodeid)

    config.option.loadscopereorder = False  # keep the slow-first order
    return GroupScheduling(config, log)


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
