"""Inputs and shards: manifests of every format, folders, deterministic and incremental planning."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_image

from bridgecore.batch_job import plan_job
from bridgecore.sharding import plan_shards, read_inputs, sample_seed


@pytest.fixture()
def inputs(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        make_image(seed=i).save(folder / f"img{i}.png")
    make_image(seed=9).save(folder / "sub" / "nested.png")
    return folder


def test_jsonl_csv_parquet_manifests_agree(inputs):
    rows = [{"image": f"img{i}.png", "instruction": f"edit {i}", "target": f"img{(i + 1) % 5}.png", "capability": "ocr"}
            for i in range(5)]
    (inputs / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (inputs / "m.csv").write_text("image,instruction,target,capability\n" + "\n".join(
        f"{r['image']},{r['instruction']},{r['target']},{r['capability']}" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), inputs / "m.parquet")
    parsed = [read_inputs(str(inputs / name)) for name in ("m.jsonl", "m.csv", "m.parquet")]
    assert [s.key for s in parsed[0]] == [s.key for s in parsed[1]] == [s.key for s in parsed[2]]
    first = parsed[0][0]
    assert first.images == [str(inputs / "img0.png")] and first.target == str(inputs / "img1.png")
    assert first.extra == {"capability": "ocr"} and first.error is None


def test_escaping_entry_becomes_a_failed_sample(inputs):
    (inputs / "m.jsonl").write_text(json.dumps({"image": "../../etc/passwd", "instruction": "x"}) + "\n"
                                    + json.dumps({"image": "sub/nested.png", "instruction": "y"}))
    bad, good = read_inputs(str(inputs / "m.jsonl"))
    assert "outside the input root" in bad.error and good.error is None


def test_multi_image_and_ids(inputs):
    (inputs / "m.jsonl").write_text(json.dumps({"id": "a", "images": ["img0.png", "img1.png"], "instruction": "x"}))
    (sample,) = read_inputs(str(inputs / "m.jsonl"))
    assert sample.key == "a" and len(sample.images) == 2


def test_folder_needs_a_prompt_and_finds_images_recursively(inputs):
    with pytest.raises(ValueError, match="--prompt"):
        read_inputs(str(inputs))
    samples = read_inputs(str(inputs), prompt="make it blue")
    assert len(samples) == 6 and all(s.instruction == "make it blue" for s in samples)


def test_content_change_is_a_new_sample(inputs):
    before = {s.key for s in read_inputs(str(inputs), prompt="p")}
    make_image(seed=42).save(inputs / "img0.png")
    after = {s.key for s in read_inputs(str(inputs), prompt="p")}
    assert len(before ^ after) == 2


def test_shards_are_deterministic_and_resume_with_the_same_ids(inputs):
    samples = read_inputs(str(inputs), prompt="p")
    shards = plan_shards(samples, 2)
    assert shards == plan_shards(list(reversed(samples)), 2)
    first = next(iter(shards))
    done = {(s.key, s.content_sha256) for s in shards[first]}
    remaining = plan_shards(samples, 2, done=done)
    assert set(remaining) == set(shards) - {first}


def test_incremental_job_planning(inputs, tmp_path):
    out = str(tmp_path / "out")
    plan = plan_job(str(inputs), out, "p", shard_size=4, final_stage="caches")
    assert len(plan.new_shards) == 2 and (tmp_path / "out" / "plan" / f"{plan.new_shards[0]}.json").exists()
    again = plan_job(str(inputs), out, "p", shard_size=4, final_stage="caches")
    assert again.new_shards == plan.new_shards  # nothing committed yet: same shards


def test_sample_seed_is_per_sample():
    assert sample_seed(0, "a") == sample_seed(0, "a") != sample_seed(0, "b") != sample_seed(1, "a")
