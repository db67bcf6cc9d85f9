"""The Prefect layer for real: local runs through the CLI, a kill in the middle, and scale-out on a real
server with two process workers sharing one job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_inputs

from bridgecore.batch.pipelines import STAGES
from bridgecore.storage import Storage

pytestmark = pytest.mark.slow  # real CLI processes and Prefect servers

REPO = Path(__file__).resolve().parents[2]


def bulk_edit_cli(zoo, manifest, output, home, *extra, wait=True, api_url=None):
    args = [sys.executable, "-m", "vision_bridge.cli", "bulk-edit", "--input", manifest, "--output", output,
            "--qwen3", str(zoo["qwen3-vl"]), "--edit-model", str(zoo["qwen-image-edit"]), "--steps", "2",
            "--condition-area", str(64 * 64), "--shard-size", "2", *extra]
    env = {**os.environ, "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    if api_url:  # the session's shared server: these tests are about the runs, not their temporary server
        env["PREFECT_API_URL"] = api_url
    if not wait:
        return subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def data_files(root: Path) -> dict[str, bytes]:
    """Every committed data object (markers and run records carry timestamps, worker names, absolute URLs:
    left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and
            p.parent.name != "_done" and "runs" not in p.relative_to(root).parts and not p.name.startswith("summary")}


def stage_store(root, stage: str):
    """The one fingerprint folder of `stage` under a single-settings output."""
    folders = [p.name for p in (Path(root) / stage).iterdir()] if (Path(root) / stage).exists() else ["none-yet"]
    (fingerprint,) = folders
    return STAGES[stage].store(Storage(str(root)), fingerprint)


def test_local_run_then_rerun_loads_no_model(tmp_path, tiny_zoo, shared_prefect):
    manifest = make_inputs(tmp_path / "in", n=3)
    out = tmp_path / "out"
    first = bulk_edit_cli(tiny_zoo, manifest, str(out), tmp_path / "prefect", api_url=shared_prefect)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "done 3, failed 6, pending 0" in first.stdout
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
              and not p.name.startswith("summary") and "runs" not in p.relative_to(out).parts}  # run reports are rewritten
    second = bulk_edit_cli(tiny_zoo, manifest, str(out), tmp_path / "prefect", api_url=shared_prefect)
    assert second.returncode == 0 and "done 3, failed 6, pending 0" in second.stdout
    assert "loading Qwen" not in second.stderr and "loading edit pipeline" not in second.stderr
    assert before == {p: p.stat().st_mtime_ns for p in before}

    # A corrupt cache shard found downstream is reported and recomputed, never used.
    edits = {p.name: p.read_bytes() for p in out.rglob("*.png")}
    tar = max((out / "caches").rglob("*.tar"), key=lambda p: p.stat().st_size)  # one with done samples
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 0xFF
    tar.write_bytes(bytes(data))
    for stage in ("fused", "edits", "metrics"):
        next((out / stage).glob(f"*/_done/{tar.stem}.json")).unlink()
    third = bulk_edit_cli(tiny_zoo, manifest, str(out), tmp_path / "prefect", api_url=shared_prefect)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "corrupt or missing" in third.stdout + third.stderr and "done 3, failed 6, pending 0" in third.stdout
    assert {p.name: p.read_bytes() for p in out.rglob("*.png")} == edits


def test_sigkill_mid_job_then_rerun_matches_uninterrupted(tmp_path, tiny_zoo, shared_prefect):
    manifest = make_inputs(tmp_path / "in", n=6)
    reference = tmp_path / "reference"
    assert bulk_edit_cli(tiny_zoo, manifest, str(reference), tmp_path / "p1", api_url=shared_prefect).returncode == 0

    killed = tmp_path / "killed"
    process = bulk_edit_cli(tiny_zoo, manifest, str(killed), tmp_path / "p2", wait=False, api_url=shared_prefect)
    deadline = time.monotonic() + 300
    while not list((killed / "caches").glob("*/_done/*.json")) if killed.exists() else True:
        assert time.monotonic() < deadline and process.poll() is None, "job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    plans = [name[:-5] for name in Storage(str(killed)).list("plan/shards", suffix=".json")]
    assert not all(stage_store(killed, "metrics").is_done(s) for s in plans), "killed too late to test resuming"

    rerun = bulk_edit_cli(tiny_zoo, manifest, str(killed), tmp_path / "p2", api_url=shared_prefect)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert data_files(killed) == data_files(reference)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["counts"] == {"done": 6, "failed": 6, "pending": 0}


@pytest.fixture()
def prefect_server(tmp_path):
    from prefect_server import PrefectServer

    server = PrefectServer(tmp_path / "prefect")
    server.start()
    yield server
    server.stop()


def test_two_workers_share_one_job(tmp_path, tiny_zoo, prefect_server):
    server = prefect_server
    server.cli("work-pool", "create", "gpu", "--type", "process")
    server.cli("work-pool", "create", "control", "--type", "process")
    server.cli("deploy", "--all", "--no-prompt")  # found at the repository root
    # the code's location is left for each worker to say at run time, not baked in from the deploying machine
    assert "{{ $VISION_BRIDGE_CODE_DIR }}" in server.cli("deployment", "inspect", "process-shards/gpu")
    server.start_worker("gpu", "worker-a")
    server.start_worker("gpu", "worker-b")
    manifest = make_inputs(tmp_path / "in", n=2)  # + 6 bad samples = 8, two shards of 4: one per worker
    with open(manifest, "a") as handle:  # + one two-image sample the single-image Edit refuses: a shard of its own
        handle.write("\n" + json.dumps({"images": ["img0.png", "img1.png"], "instruction": "combine"}))
    out = tmp_path / "out"
    code = (
        "import json, sys; from vision_bridge.flows.bulk_edit import bulk_edit; "
        f"print(json.dumps(bulk_edit(input={manifest!r}, output={str(out)!r}, qwen3={str(tiny_zoo['qwen3-vl'])!r}, "
        f"edit_model={str(tiny_zoo['qwen-image-edit'])!r}, shard_size=4, steps=2, condition_area=4096, "
        "workers_deployment='process-shards/gpu', shards_per_run=1, deadline_s=500, plus_model='none')['counts']))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=server.env, cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"done": 2, "failed": 7, "pending": 0}
    shards = [name[:-5] for name in Storage(str(out)).list("plan/shards", suffix=".json")]
    workers = {stage_store(out, "edits").marker(s)["worker"] for s in shards}
    assert workers == {"worker-a", "worker-b"}
    ids = [row["id"] for s in shards for row in stage_store(out, "metrics").table(s)]
    assert len(ids) == len(set(ids)) == 9  # every sample exactly once
    children = [json.loads(p.read_text()) for p in out.glob("runs/*/children/*.json")]
    assert len(children) == 3 and {c["worker"] for c in children} == {"worker-a", "worker-b"}
    for child in children:  # models resident across the child's shards: one load each at most
        assert child["qwen3_loads"] <= 1 and child["qwen25_loads"] <= 1 and child["pipeline_loads"] <= 1
    # the children ran from a deployment: their messages name the flow parameter, not the CLI flag
    refused = [row["error"] for s in shards for row in stage_store(out, "caches").table(s) if "images" in (row["error"] or "")]
    assert len(refused) == 1 and "(the plus_model parameter, e.g." in refused[0] and "--plus-model" not in refused[0]
    # bookkeeping in Prefect: a readable parent name, the job's tags on every run, artifact keys per output and arm
    code = ("import json; from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    runs = [[r.name, sorted(r.tags)] for r in c.read_flow_runs()]\n"
            "    keys = sorted({a.key for a in c.read_artifacts() if a.key})\n"
            "print(json.dumps({'runs': runs, 'keys': keys}))")
    found = json.loads(subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    tags = sorted(["pipeline:bulk-edit", f"output:{out}", "arm:Edit"])
    assert ["bulk-edit out Edit", tags] in found["runs"]
    assert sum(name.startswith("bulk-edit-") and run_tags == tags for name, run_tags in found["runs"]) == 3
    for kind in ("progress", "sample-counts", "run-outputs", "failures"):
        assert any(key.startswith(f"{kind}-out-") for key in found["keys"]), (kind, found["keys"])


def _process_tree(root: int) -> list[int]:
    """A process and all its descendants (a worker and the flow-run processes it started, whatever their
    sessions): one machine's processes."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def test_a_lost_machine_heals_itself_within_three_minutes(tmp_path, tiny_zoo, prefect_server):
    """A worker and its flow-run process killed at the same instant (a lost node) in a pool of ONE slot: Prefect's
    heartbeats stop, the project's zombie automation marks the run Crashed (freeing the slot), the parent resubmits
    and the other worker finishes the job — within 3 minutes of the loss (heartbeat 60 s as deployed, automation
    limit 75 s here; the parent's own stall check is set far out so that it cannot be what heals it). Nothing is
    lost, nothing committed before the loss is recomputed, no run is left Running."""
    server = prefect_server
    server.cli("work-pool", "create", "gpu", "--type", "process")
    server.cli("work-pool", "set-concurrency-limit", "gpu", "1")
    server.cli("work-pool", "create", "control", "--type", "process")
    server.cli("deploy", "--all", "--no-prompt")  # its build step creates the zombie automation (300 s)
    subprocess.run([sys.executable, "-m", "vision_bridge.flows.zombie_runs", "--within", "75"], env=server.env, cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    lost = server.start_worker("gpu", "worker-a")
    manifest = make_inputs(tmp_path / "in", n=4)
    out = tmp_path / "out"
    code = (
        "import json; from vision_bridge.flows.bulk_edit import bulk_edit; "
        f"print(json.dumps(bulk_edit(input={manifest!r}, output={str(out)!r}, qwen3={str(tiny_zoo['qwen3-vl'])!r}, "
        f"edit_model={str(tiny_zoo['qwen-image-edit'])!r}, shard_size=1, steps=8, condition_area=4096, "
        "workers_deployment='process-shards/gpu', shards_per_run=100, deadline_s=900, stall_s=3600, "
        "plus_model='none')['counts']))"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], env=server.env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("caches/*/_done/*.json")):  # the child runs on worker-a and has committed work
            assert time.monotonic() < deadline and parent.poll() is None, "the child never committed"
            time.sleep(0.1)
        machine = _process_tree(lost.pid)
        assert len(machine) >= 2  # the worker and the flow-run process it started
        for pid in machine:
            os.kill(pid, signal.SIGKILL)
        lost_at = time.time()
        committed_before = {p.name: json.loads(p.read_text()) for p in out.glob("*/*/_done/*.json")}
        server.start_worker("gpu", "worker-b")  # the pool's other machine
        output = parent.communicate(timeout=600)[0]
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    assert parent.returncode == 0, output[-3000:]
    assert json.loads(output.strip().splitlines()[-1]) == {"done": 4, "failed": 6, "pending": 0}
    code = ("import json; from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    print(json.dumps([[r.name, r.deployment_id is not None, r.state.type.value, r.state.timestamp.timestamp(),"
            " r.start_time.timestamp() if r.start_time else None] for r in c.read_flow_runs()]))")
    runs = json.loads(subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1])
    runs = [run for run in runs if run[0].startswith("bulk-edit")]  # this job's (the nightly has scheduled runs)
    children = [run for run in runs if run[1]]
    crashed = [run for run in children if run[2] == "CRASHED"]
    completed = [run for run in children if run[2] == "COMPLETED"]
    assert len(crashed) == 1 and len(completed) == 1, runs
    assert crashed[0][3] - lost_at < 180, f"marked Crashed {crashed[0][3] - lost_at:.0f} s after the loss"
    assert completed[0][4] - lost_at < 180, "the resubmitted child did not get the pool's only slot in time"
    assert not [run for run in runs if run[2] in ("RUNNING", "PENDING", "CANCELLING", "SCHEDULED")], runs
    for name, marker in committed_before.items():  # committed before the loss: kept, not recomputed
        (again,) = [json.loads(p.read_text()) for p in out.glob(f"{marker['stage']}/{marker['fingerprint']}/_done/{name}")]
        assert again["worker"] == "worker-a" and again["committed"] == marker["committed"]
    ids = [row["id"] for s in Storage(str(out)).list("plan/shards", suffix=".json")
           for row in stage_store(out, "metrics").table(s[:-5])]
    assert len(ids) == len(set(ids)) == 10  # every sample exactly once
    print(f"lost at 0 s; Crashed at {crashed[0][3] - lost_at:.0f} s; resubmitted child started at "
          f"{completed[0][4] - lost_at:.0f} s; job done")
