"""`cache status` / `cache prune`: what an output stores, which runs use it, what a changed setting would recompute
and why, and pruning only what no run uses (local and S3) — with the run after the prune checked too."""

import json
from dataclasses import replace

import pytest
from helpers import LOADED, make_inputs, run_all, run_cli

from bridgecore.batch.cache_inventory import inventory, prunable, prune, rerun_plan
from bridgecore.batch.fingerprints import fingerprints
from bridgecore.batch.settings import JobSettings
from bridgecore.storage import Storage


@pytest.fixture()
def settings(tiny_zoo):
    return JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=64 * 64, steps=2)


def _two_runs(root, manifest, settings):
    """The same job at 2 and then 3 steps: one caches folder, two edits folders, two runs."""
    first = run_all(manifest, root, settings)
    second = run_all(manifest, root, replace(settings, steps=3))
    return first, second


def _delete_run(storage, run):
    for name in storage.list("runs", run):
        storage.remove("runs", run, name)


def _check_prune(root, manifest, settings):
    storage = Storage(root)
    first, second = _two_runs(root, manifest, settings)
    stored = inventory(storage)
    by_stage = {}
    for item in stored:
        by_stage.setdefault(item.stage, []).append(item)
    assert len(by_stage["caches"]) == 1 and len(by_stage["edits"]) == 2
    assert by_stage["caches"][0].runs == sorted([first["run"], second["run"]])
    assert by_stage["caches"][0].samples == 2 and all(item.bytes > 0 for item in stored)
    assert not prunable(stored, min_age_s=0)  # every folder is used by a run

    _delete_run(storage, first["run"])  # the 2-step run is forgotten: its edits and metrics are used by no run
    stored = inventory(storage)
    doomed = prunable(stored, min_age_s=0)
    old = fingerprints("bulk-edit", settings)
    assert {(item.stage, item.fingerprint) for item in doomed} == {("edits", old["edits"]), ("metrics", old["metrics"])}
    assert not prunable(stored, min_age_s=3600)  # committed a moment ago: a job still running keeps its folders
    assert prune(storage, doomed) == sum(item.bytes for item in doomed) > 0
    left = {(item.stage, item.fingerprint) for item in inventory(storage)}
    assert ("edits", old["edits"]) not in left and ("caches", old["caches"]) in left and len(left) == len(stored) - 2

    # the run the prune kept recomputes nothing; the pruned settings recompute their edits only, from the caches
    before = LOADED.counts
    assert run_all(manifest, root, replace(settings, steps=3))["counts"]["done"] == 2
    assert LOADED.counts == before
    assert run_all(manifest, root, settings)["counts"]["done"] == 2
    after = LOADED.counts
    assert after["vlm_forwards"] == before["vlm_forwards"] and after["dit_calls"] > before["dit_calls"]


def test_prune_removes_only_what_no_run_uses_and_the_next_run_agrees(tmp_path, settings):
    _check_prune(str(tmp_path / "out"), make_inputs(tmp_path / "in", n=2), settings)


def test_prune_on_object_storage(tmp_path, settings, s3_root):
    _check_prune(s3_root, make_inputs(tmp_path / "in", n=2), settings)


def test_status_says_which_stages_a_changed_setting_recomputes_and_why(tmp_path, settings):
    root = str(tmp_path / "out")
    storage = Storage(root)
    manifest = make_inputs(tmp_path / "in", n=2)
    _two_runs(root, manifest, settings)
    latest = replace(settings, steps=3)
    plan = {entry["stage"]: entry for entry in rerun_plan(storage, "bulk-edit", latest)}
    assert all(entry["stored_shards"] for entry in plan.values())  # the latest run's job: everything is stored
    plan = {entry["stage"]: entry for entry in rerun_plan(storage, "bulk-edit", replace(latest, steps=4))}
    assert plan["caches"]["stored_shards"] and plan["fused"]["stored_shards"]
    assert plan["edits"]["why"] == ["setting steps: 3 -> 4"]
    assert plan["metrics"]["why"] == ["an upstream stage's output changed (edits)"]
    area = {entry["stage"]: entry for entry in rerun_plan(storage, "bulk-edit", replace(latest, condition_area=48 * 48))}
    assert "setting condition_area: 4096 -> 2304" in area["caches"]["why"]
    assert not any(entry["stored_shards"] for entry in area.values())

    # the command: tables, the plan for --set changes, a dry-run prune that deletes nothing, then --yes
    result = run_cli("cache", "status", root, "--set", "steps=4")
    assert result.returncode == 0, result.stderr
    assert "recompute" in result.stdout and "setting steps: 3 -> 4" in result.stdout
    assert "kept" in result.stdout and "every one used by a run" in result.stdout
    data = json.loads(run_cli("cache", "status", root, "--json").stdout)
    assert sum(item["bytes"] for item in data["stored"]) > 0 and data["unused_bytes"] == 0
    result = run_cli("cache", "status", root, "--set", "stepz=4")
    assert result.returncode == 2 and "unknown job settings ['stepz']" in result.stderr
    _delete_run(storage, data["stored"][0]["runs"][0])
    result = run_cli("cache", "prune", root, "--min-age-hours", "0")
    assert result.returncode == 0 and "would delete" in result.stdout and "dry run" in result.stdout
    assert len(inventory(storage)) == len(data["stored"])  # nothing deleted without --yes
    result = run_cli("cache", "prune", root, "--min-age-hours", "0", "--yes")
    assert result.returncode == 0 and "freed" in result.stdout
    assert len(inventory(storage)) < len(data["stored"]) and not prunable(inventory(storage), min_age_s=0)
    assert run_cli("cache", "status", str(tmp_path / "nowhere")).returncode == 2
