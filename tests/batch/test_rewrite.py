"""The rewrite arm: Qwen3-VL rewrites the instruction, Qwen-Image-Edit's own encoder reads the rewrite.

On the tiny zoo the rewrites are gibberish (random VLMs): these tests check the plumbing (generation runs,
the text is stored and summarised, a second run reuses it, a changed system prompt reruns only what reads the
rewrites), and that a rewrite forced to be the instruction gives exactly the Edit arm's edits.
"""

import json
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
from helpers import LOADED, make_image, save_open_bridge

from bridgecore.batch.executor import run_pipeline
from bridgecore.batch.fingerprints import fingerprints
from bridgecore.batch.job_plan import plan_job
from bridgecore.batch.pipelines import STAGES
from bridgecore.batch.summary import summarize
from bridgecore.batch.settings import JobSettings
from bridgecore.model.rewrite import clean_rewrite, rewrite_messages
from bridgecore.storage import Storage

AREA = 64 * 64


@pytest.fixture()
def settings(tiny_zoo):
    return JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=AREA, steps=2,
                       rewrite_with="qwen3", rewrite_max_tokens=12)


def make_manifest(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        make_image(160, 112, i).save(folder / f"img{i}.png")
        rows.append({"id": f"s{i}", "image": f"img{i}.png", "instruction": f"Make the square {['red', 'blue', 'green'][i % 3]}"})
    rows.append({"id": "broken", "image": "missing.png", "instruction": "x"})
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(folder / "manifest.jsonl")


def run_job(manifest, output, settings):
    plan = plan_job(manifest, output, settings, "bulk-edit", shard_size=2)
    before = LOADED.counts
    run_pipeline(output, "bulk-edit", plan.pending, settings, progress=False, loaded=LOADED)
    after = LOADED.counts
    return summarize(output, plan.job, "bulk-edit", settings), {k: after[k] - before[k] for k in after}


def stage_rows(output, settings, stage):
    store = STAGES[stage].store(Storage(output), fingerprints("bulk-edit", settings)[stage])
    return {row["id"]: row for shard in sorted(store.done_shards()) for row in store.table(shard)}


def markers(output, settings, stage):
    from pathlib import Path

    folder = Path(output) / stage / fingerprints("bulk-edit", settings)[stage] / "_done"
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def edits_of(out, settings):
    folder = out / "edits" / fingerprints("bulk-edit", settings)["edits"]
    return {p.name: p.read_bytes() for p in folder.rglob("*.png")}


def test_clean_rewrite_keeps_only_the_instruction():
    assert clean_rewrite("<think>the square is left</think>\nMake the left square red.") == "Make the left square red."
    assert clean_rewrite('{"Rewritten": "Replace \\"Hello\\" with \\"Bye\\""}') == 'Replace "Hello" with "Bye"'
    assert clean_rewrite("Rewritten instruction: 'Make it blue'") == "Make it blue"
    assert clean_rewrite("  \n") == "" and clean_rewrite("<think>unfinished") == ""
    messages = rewrite_messages("Make it blue", 2, "SYSTEM")
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "SYSTEM"}]}
    assert [c["type"] for c in messages[1]["content"]] == ["image", "image", "text"]


def test_rewrite_settings_are_checked(tiny_zoo, settings):
    with pytest.raises(ValueError, match="rewrite_with must be one of none, qwen3, identity"):
        replace(settings, rewrite_with="gpt")
    with pytest.raises(ValueError, match="rewrite_max_tokens"):
        replace(settings, rewrite_max_tokens=4)
    assert replace(settings, rewrite_with="none", max_prompt_tokens=128).rewrite_max_tokens == 12  # only checked in use
    with pytest.raises(ValueError, match="rewrite_system_prompt is empty"):
        replace(settings, rewrite_system_prompt="  ")
    native = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-2.1"]), rewrite_with="qwen3",
                         condition_area=1024 * 1024)
    with pytest.raises(ValueError, match="runs without rewrite_with"):
        native.check_editor()


def test_rewrites_are_generated_stored_reused_and_rerun_only_downstream(tmp_path, settings):
    manifest, out = make_manifest(tmp_path / "in"), tmp_path / "out"
    summary, counts = run_job(manifest, str(out), settings)
    assert summary["counts"] == {"done": 3, "failed": 1, "pending": 0}
    assert counts["qwen3_rewrites"] == 2  # one generate per shard of two (the broken sample fails before it)
    rows = stage_rows(str(out), settings, "rewrites")
    infos = {i: json.loads(rows[i]["info"]) for i in ("s0", "s1", "s2")}
    assert all(info["rewrite"] and 1 <= info["generated_tokens"] <= 12 for info in infos.values())
    assert rows["broken"]["status"] == "failed"
    table = {r["id"]: r for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert {i: table[i]["rewrite"] for i in infos} == {i: info["rewrite"] for i, info in infos.items()}
    assert table["broken"]["rewrite"] is None and summary["rewrites"]["samples"] == 3
    first_edits = edits_of(out, settings)

    # the same settings again: nothing runs
    _, again = run_job(manifest, str(out), settings)
    assert (again["vlm_forwards"], again["qwen3_rewrites"], again["dit_calls"]) == (0, 0, 0)

    # a new system prompt: rewrites, fused, edits and metrics rerun; the caches are the same objects
    caches = markers(str(out), settings, "caches")
    changed = replace(settings, rewrite_system_prompt="Rewrite the instruction in French.")
    old, new = fingerprints("bulk-edit", settings), fingerprints("bulk-edit", changed)
    assert [name for name in new if new[name] != old[name]] == ["rewrites", "fused", "edits", "metrics"]
    summary, counts = run_job(manifest, str(out), changed)
    assert summary["counts"]["done"] == 3 and counts["qwen3_rewrites"] == 2
    assert counts["vlm_forwards"] == 2  # Qwen2.5-VL encoding the rewrites, one per shard; no caches forward
    assert markers(str(out), changed, "caches") == caches
    assert edits_of(out, changed).keys() == first_edits.keys()

    # the decoding cap is part of what a rewrite depends on; the Edit arm shares the caches
    assert fingerprints("bulk-edit", replace(settings, rewrite_max_tokens=13))["rewrites"] != old["rewrites"]
    plain = fingerprints("bulk-edit", replace(settings, rewrite_with="none"))
    assert "rewrites" not in plain and plain["caches"] == old["caches"] and plain["fused"] != old["fused"]


def test_a_rewrite_forced_to_the_instruction_gives_the_edit_arms_edits(tmp_path, settings):
    manifest, out = make_manifest(tmp_path / "in"), tmp_path / "out"
    edit_arm = replace(settings, rewrite_with="none")
    control = replace(settings, rewrite_with="identity")
    run_job(manifest, str(out), edit_arm)
    summary, counts = run_job(manifest, str(out), control)
    assert counts["qwen3_rewrites"] == 0 and counts["vlm_forwards"] == 2  # only Qwen2.5-VL re-encodes
    table = {r["id"]: r for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert table["s1"]["rewrite"] == "Make the square blue"
    assert fingerprints("bulk-edit", control)["edits"] != fingerprints("bulk-edit", edit_arm)["edits"]
    assert len(edits_of(out, control)) == 3 and edits_of(out, control) == edits_of(out, edit_arm)
    # ... while a real rewrite (gibberish here) does reach the DiT: the plumbing is not a pass-through
    run_job(manifest, str(out), settings)
    rewritten, own = edits_of(out, settings), edits_of(out, edit_arm)
    assert rewritten.keys() == own.keys() and all(rewritten[name] != own[name] for name in own)


def test_the_rewrite_arm_combines_with_a_bridge(tmp_path, settings):
    """The fifth arm: the bridge reads Qwen3-VL's features of the user's instruction and corrects the
    rewritten instruction's embeddings."""
    manifest, out = make_manifest(tmp_path / "in", n=2), tmp_path / "out"
    run_job(manifest, str(out), settings)
    bridged = replace(settings, bridge=save_open_bridge(settings, tmp_path / "bridge"))
    summary, counts = run_job(manifest, str(out), bridged)
    assert summary["counts"]["done"] == 2 and counts["qwen3_rewrites"] == 0 and counts["vlm_forwards"] == 0
    assert edits_of(out, bridged).keys() == edits_of(out, settings).keys()
    assert edits_of(out, bridged) != edits_of(out, settings)


def test_the_rewrite_options_of_bulk_edit(tmp_path, tiny_zoo):
    """In process (no process boundary is under test): a dry run lists the rewrites stage; mistakes are one line."""
    from typer.testing import CliRunner

    from vision_bridge.cli import app

    manifest = make_manifest(tmp_path / "in", n=2)
    common = ["bulk-edit", "--input", manifest, "--output", str(tmp_path / "out"), "--dry-run",
              "--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"])]
    runner = CliRunner()
    planned = runner.invoke(app, [*common, "--rewrite-with", "qwen3", "--rewrite-system-prompt", "Be brief."])
    assert planned.exit_code == 0, planned.output
    assert "rewrites   committed      0  to run      1" in planned.stdout
    plain = runner.invoke(app, common)
    assert plain.exit_code == 0 and "rewrites" not in plain.stdout
    for args, message in ((["--rewrite-with", "gpt"], "rewrite_with must be one of none, qwen3, identity; got 'gpt'"),
                          (["--rewrite-with", "qwen3", "--rewrite-system-prompt", f"@{tmp_path / 'nope.txt'}"],
                           "nope.txt"),
                          (["--rewrite-with", "qwen3", "--rewrite-max-tokens", "2"], "rewrite_max_tokens must be")):
        result = runner.invoke(app, [*common, *args])
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1
