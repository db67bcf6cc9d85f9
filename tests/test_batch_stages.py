"""The batch stages without Prefect: exactly one state per sample, idempotent reruns, seeds per sample."""

import json

import pytest
from conftest import make_image

from bridgecore.batch_job import JobSettings, forward_counts, plan_job, run_stages
from bridgecore.shard_store import CorruptShardError, ShardStore
from bridgecore.stage_extract import extract_shard
from bridgecore.stage_fuse import fuse_shard
from bridgecore.storage import Storage

AREA = 64 * 64


def make_inputs(folder, n=5):
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


def run_all(output, shards, settings):
    return run_stages(output, shards, settings)


@pytest.fixture()
def settings(tiny_zoo):
    return JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=AREA, steps=2)


def test_every_sample_ends_done_or_failed(tmp_path, settings):
    manifest = make_inputs(tmp_path / "in")
    plan = plan_job(manifest, str(tmp_path / "out"), shard_size=4)
    summary = run_all(str(tmp_path / "out"), plan.shards, settings)
    assert summary["counts"] == {"done": 5, "failed": 6, "pending": 0}
    reasons = " | ".join(f["error"] for f in summary["failures"])
    for expected in ("file is empty", "not an image", "truncated", "file not found", "outside the input root",
                     "no-such-bucket-xyz"):
        assert expected in reasons
    rows = [r for shard in plan.shards for r in ShardStore(Storage(str(tmp_path / "out")), "metrics").manifest(shard)
            if r["status"] == "done"]
    assert len(rows) == 5 and all("psnr_vs_target" in json.loads(r["info"]) for r in rows)


def test_rerun_of_a_finished_job_does_no_forward_and_rewrites_nothing(tmp_path, settings):
    manifest = make_inputs(tmp_path / "in")
    out = str(tmp_path / "out")
    plan = plan_job(manifest, out, shard_size=4)
    run_all(out, plan.shards, settings)
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").rglob("*")
             if p.is_file() and not p.name.startswith("summary")}
    before = forward_counts()
    again = plan_job(manifest, out, shard_size=4)
    assert again.new_shards == [] and again.shards == plan.shards
    run_all(out, again.shards, settings)
    assert forward_counts() == before
    assert files == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_edits_do_not_depend_on_sharding(tmp_path, settings):
    """Same noise per sample whatever the shard; only batched-matmul rounding may differ (<= 2/255)."""
    import numpy as np
    from PIL import Image

    manifest = make_inputs(tmp_path / "in", n=4)
    outputs = {}
    for size in (1, 3):
        out = tmp_path / f"out{size}"
        run_all(str(out), plan_job(manifest, str(out), shard_size=size).shards, settings)
        outputs[size] = {p.name: np.asarray(Image.open(p), dtype=int) for p in out.rglob("*.png")}
    assert len(outputs[1]) == 4 and outputs[1].keys() == outputs[3].keys()
    for name, image in outputs[1].items():
        assert np.abs(image - outputs[3][name]).max() <= 2, name


def test_corrupt_cache_is_reported(tmp_path, settings):
    manifest = make_inputs(tmp_path / "in", n=2)
    out = str(tmp_path / "out")
    plan = plan_job(manifest, out, shard_size=20)
    storage = Storage(out)
    extract_shard(storage, plan.shards[0], settings.editor().extractor)
    tar = tmp_path / "out" / "caches" / f"{plan.shards[0]}.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError):
        fuse_shard(storage, plan.shards[0])


def test_stages_on_object_storage(tmp_path, settings, s3_root):
    manifest = make_inputs(tmp_path / "in", n=2)
    plan = plan_job(manifest, s3_root, shard_size=4)
    summary = run_all(s3_root, plan.shards, settings)
    assert summary["counts"]["done"] == 2
    storage = Storage(s3_root)
    assert sum(len(storage.list("edits", shard, suffix=".png")) for shard in plan.shards) == 2
    assert storage.read_json("summary.json")["counts"] == summary["counts"]


def test_true_cfg_uses_negative_embeddings(tmp_path, settings):
    from dataclasses import replace

    from bridgecore.stage_extract import NEGATIVE

    manifest = make_inputs(tmp_path / "in", n=1)
    outputs = {}
    for cfg in (1.0, 4.0):
        out = tmp_path / f"cfg{cfg}"
        plan = plan_job(manifest, str(out), shard_size=20)
        run_all(str(out), plan.shards, replace(settings, cfg=cfg, negative_prompt="blurry"))
        outputs[cfg] = {p.name: p.read_bytes() for p in out.rglob("*.png")}
        negatives = ShardStore(Storage(str(out)), "caches").payloads(plan.shards[0], NEGATIVE)
        assert bool(negatives) == (cfg > 1)
    assert outputs[1.0].keys() == outputs[4.0].keys() and outputs[1.0] != outputs[4.0]


def test_retry_failed_replans_only_failed_samples(tmp_path, settings):
    folder = tmp_path / "in"
    make_inputs(folder, n=1)
    (folder / "m.jsonl").write_text(json.dumps({"id": "good", "image": "img0.png", "instruction": "x"}) + "\n"
                                    + json.dumps({"id": "flaky", "image": "s3://no-such-bucket-xyz/a.png", "instruction": "x"}))
    out = str(tmp_path / "out")
    plan = plan_job(str(folder / "m.jsonl"), out, shard_size=1)
    summary = run_all(out, plan.shards, settings)
    assert summary["counts"] == {"done": 1, "failed": 1, "pending": 0}
    assert plan_job(str(folder / "m.jsonl"), out, shard_size=1).new_shards == []
    retry = plan_job(str(folder / "m.jsonl"), out, shard_size=1, retry_failed=True)
    (shard,) = retry.new_shards
    assert [s["key"] for s in Storage(out).read_json("plan", shard + ".json")["samples"]] == ["flaky"]


def test_multi_image_samples_through_the_stages(tmp_path, tiny_zoo):
    folder = tmp_path / "in"
    folder.mkdir()
    rows = []
    for i in range(2):
        make_image(200, 120, i).save(folder / f"a{i}.png")
        make_image(120, 200, i + 3).save(folder / f"b{i}.png")
        rows.append({"id": f"set{i}", "images": [f"a{i}.png", f"b{i}.png"], "instruction": "put the circle of picture 2 "
                     "into picture 1"})
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    settings = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit-plus"]), condition_area=AREA, steps=2)
    out = str(tmp_path / "out")
    summary = run_all(out, plan_job(str(folder / "m.jsonl"), out, shard_size=2).shards, settings)
    assert summary["counts"] == {"done": 2, "failed": 0, "pending": 0}
    assert len(list((tmp_path / "out" / "edits").rglob("*.png"))) == 2
