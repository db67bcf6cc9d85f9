"""Inputs and shards: manifests of every format, folders, ids of any shape, deterministic and incremental plans."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_image

from bridgecore.batch.records import storage_key
from bridgecore.batch.sharding import ManifestError, cut_shards, read_assignment, read_inputs, write_plan
from bridgecore.batch.stages.common import sample_seed
from bridgecore.storage import Storage


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
    assert [s.id for s in parsed[0]] == [s.id for s in parsed[1]] == [s.id for s in parsed[2]]
    first = parsed[0][0]
    assert first.images == (str(inputs / "img0.png"),) and first.target == str(inputs / "img1.png")
    assert first.extra == {"capability": "ocr"} and first.error is None


def test_escaping_entries_become_failed_samples(inputs, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", inputs / "link.png")  # inside lexically, outside for real
    (inputs / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"image": "../../etc/passwd", "instruction": "x"}, {"image": "sub/nested.png", "instruction": "y"},
        {"image": "link.png", "instruction": "z"}]))
    bad, good, linked = read_inputs(str(inputs / "m.jsonl"))
    assert "outside the input root" in bad.error and good.error is None and "outside the input root" in linked.error


def test_manifest_named_relative_to_the_working_directory(inputs, monkeypatch):
    (inputs / "m.jsonl").write_text(json.dumps({"image": "sub/nested.png", "instruction": "y"}))
    monkeypatch.chdir(inputs)
    (sample,) = read_inputs("m.jsonl")
    assert sample.error is None and sample.images == (str(inputs / "sub" / "nested.png"),)


def test_bad_rows_fail_alone_with_their_line(inputs):
    (inputs / "m.jsonl").write_text('{"image": "img0.png", "instruction": "ok"}\n{"image": "img1.png", "instr\n'
                                    '{"instruction": "no image"}\n')
    good, broken, imageless = read_inputs(str(inputs / "m.jsonl"))
    assert good.error is None
    assert "m.jsonl line 2: invalid JSON" in broken.error and "m.jsonl line 3" in imageless.error
    # a CSV row with an unquoted comma in its instruction is not cut at the comma: it fails, with its line; a quoted
    # comma (or newline) is one field, and the line numbers count physical lines
    (inputs / "m.csv").write_text('id,image,instruction\na,img0.png,"red, then\nblue"\nb,img1.png,make it red, then blue\n')
    quoted, cut = read_inputs(str(inputs / "m.csv"))
    assert quoted.error is None and quoted.instruction == "red, then\nblue"
    assert "m.csv line 4: 1 more field(s) than the header's 3 (an unquoted comma?" in cut.error
    (inputs / "m.jsonl").write_text(json.dumps({"images": [], "instruction": "x"}))
    (empty,) = read_inputs(str(inputs / "m.jsonl"))
    assert "'images' is an empty list" in empty.error
    (inputs / "m.json").write_text(json.dumps([{"image": "img0.png", "instruction": "x"}]))
    with pytest.raises(ManifestError, match="a manifest is .csv, .jsonl or .parquet"):
        read_inputs(str(inputs / "m.json"), prompt="x")


def test_csv_with_a_byte_order_mark_keeps_its_first_column(inputs):
    (inputs / "m.csv").write_text("\ufeffid,image,instruction\nfirst,img0.png,x\n", encoding="utf-8")
    (sample,) = read_inputs(str(inputs / "m.csv"))
    assert sample.id == "first" and sample.error is None


def test_multi_image_and_ids(inputs):
    (inputs / "m.jsonl").write_text(json.dumps({"id": "a", "images": ["img0.png", "img1.png"], "instruction": "x"}))
    (sample,) = read_inputs(str(inputs / "m.jsonl"))
    assert sample.id == "a" and len(sample.images) == 2


def test_folder_needs_a_prompt_and_finds_images_recursively(inputs):
    with pytest.raises(ManifestError, match="--prompt"):
        read_inputs(str(inputs))
    samples = read_inputs(str(inputs), prompt="make it blue")
    assert len(samples) == 6 and all(s.instruction == "make it blue" for s in samples)
    with pytest.raises(ManifestError, match="does not exist"):
        read_inputs(str(inputs / "typo.jsonl"))


def test_changed_input_is_a_new_sample(inputs):
    before = {s.id for s in read_inputs(str(inputs), prompt="p")}
    make_image(seed=42, width=210).save(inputs / "img0.png")
    after = {s.id for s in read_inputs(str(inputs), prompt="p")}
    assert len(before ^ after) == 2


def test_duplicate_ids_are_refused(inputs):
    (inputs / "m.jsonl").write_text("\n".join(json.dumps({"id": "same", "image": f"img{i}.png", "instruction": "x"})
                                              for i in range(2)))
    with pytest.raises(ManifestError, match="duplicate sample ids"):
        read_inputs(str(inputs / "m.jsonl"))


def test_storage_keys_are_safe_and_distinct():
    ids = ["photo.001", "photo.002", "/etc/passwd", "../x", "a\0b", "x" * 300, "plain-id_1", "photo_001"]
    keys = [storage_key(i) for i in ids]
    assert len(set(keys)) == len(ids) and keys[-2] == "plain-id_1" and keys[-1] == "photo_001"
    assert all("." not in k and "/" not in k and "\0" not in k and len(k) <= 64 for k in keys)


def test_shards_are_deterministic_and_the_plan_keeps_assignments(inputs, tmp_path):
    samples = read_inputs(str(inputs), prompt="p")
    shards = cut_shards(samples, 2)
    assert shards == cut_shards(list(reversed(samples)), 2)
    storage = Storage(str(tmp_path / "out"))
    write_plan(storage, shards)
    assignment = read_assignment(storage)
    assert {shard for _, shard in assignment.values()} == set(shards) and len(assignment) == len(samples)


def test_single_and_multi_image_samples_never_share_a_shard():
    """A shard's route decides its fingerprints (an Edit-Plus `plus_model` changes only the multi-image ones)."""
    from bridgecore.batch.records import Sample, shard_route

    samples = [Sample(f"s{i}", ("a.png",) if i % 3 else ("a.png", "b.png"), "x", f"h{i}") for i in range(10)]
    shards = cut_shards(samples, 4)
    assert sorted(len(members) for members in shards.values()) == [2, 4, 4]
    assert sorted(shard_route(members) for members in shards.values()) == ["multi", "single", "single"]
    assert all(len({s.multi_image for s in members}) == 1 for members in shards.values())


def test_sample_seed_is_per_sample():
    assert sample_seed(0, "a") == sample_seed(0, "a") != sample_seed(0, "b") != sample_seed(1, "a")


def test_content_hash_sees_bytes_replaced_in_place(tmp_path):
    """Same size, same modification time, other bytes: the same sample by default (documented), a new one with
    `content_hash`; and with it an unchanged file keeps its identity from one planning run to the next."""
    import json
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    image = folder / "a.png"
    image.write_bytes(b"A" * 64)
    (folder / "m.jsonl").write_text(json.dumps({"image": "a.png", "instruction": "x"}) + "\n")
    manifest = str(folder / "m.jsonl")
    before = {flag: read_inputs(manifest, content_hash=flag)[0].input_hash for flag in (False, True)}
    assert before[False] != before[True]  # two kinds of identity
    assert read_inputs(manifest, content_hash=True)[0].input_hash == before[True]  # stable across runs
    stamp = image.stat()
    image.write_bytes(b"B" * 64)
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert read_inputs(manifest)[0].input_hash == before[False]
    assert read_inputs(manifest, content_hash=True)[0].input_hash != before[True]


def test_a_limited_read_lists_only_the_folders_of_its_samples(tmp_path, monkeypatch):
    """A trial (`limit`) stops after its N samples: the folders of later rows are never listed (on object storage
    a listing is a request per folder), and it returns exactly the full read's first N."""
    from bridgecore.storage import FileStamps

    rows = []
    for folder in range(6):
        (tmp_path / f"f{folder}").mkdir()
        for i in range(3):
            make_image(seed=folder * 3 + i).save(tmp_path / f"f{folder}" / f"{i}.png")
            rows.append({"image": f"f{folder}/{i}.png", "instruction": f"edit {folder}.{i}"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    listed = []
    real_list = FileStamps._list
    monkeypatch.setattr(FileStamps, "_list", lambda self, folder: listed.append(folder) or real_list(self, folder))
    trial = read_inputs(str(manifest), limit=4)
    assert {os.path.basename(folder) for folder in listed} == {"f0", "f1"}
    listed.clear()
    full = read_inputs(str(manifest))
    assert len(listed) == 6 and trial == full[:4]
