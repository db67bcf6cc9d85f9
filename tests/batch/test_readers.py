"""Outputs read by stock tools, no project code: pyarrow.dataset, pandas, duckdb, datasets and webdataset,
locally and on S3 (SeaweedFS), after a run that has failed samples (README, "Reading the outputs")."""

import pytest
from helpers import make_inputs, run_all

from bridgecore.batch.settings import JobSettings


@pytest.fixture(params=["local", "s3"])
def finished_run(request, tmp_path, tiny_zoo):
    """A bulk-edit output with 3 done and 6 failed samples; returns (root URL, fsspec options, summary)."""
    root = str(tmp_path / "out") if request.param == "local" else request.getfixturevalue("s3_root") + "/out"
    settings = JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=64 * 64,
                           steps=2)
    summary = run_all(make_inputs(tmp_path / "in", n=3), root, settings, shard_size=2)
    assert summary["counts"] == {"done": 3, "failed": 6, "pending": 0}
    return root, summary


def _folder(root, stage):
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    (fingerprint,) = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{path}/{stage}")]
    return f"{root}/{stage}/{fingerprint}"


def test_tables_with_pyarrow_pandas_duckdb_and_datasets(finished_run, monkeypatch):
    import datasets
    import duckdb
    import fsspec
    import pandas as pd
    import pyarrow.dataset as ds

    root, summary = finished_run
    fs, _ = fsspec.core.url_to_fs(root)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # s3:// data files are not the hub
    for stage in ("caches", "fused", "edits", "metrics"):
        tables = f"{_folder(root, stage)}/table"
        table = ds.dataset(tables.split("://", 1)[-1] if "://" in tables else tables, filesystem=fs,
                           format="parquet").to_table()
        assert table.num_rows == 9 and sorted(set(table.column("status").to_pylist())) == ["done", "failed"]
        frame = pd.read_parquet(tables, storage_options={} if "://" in tables else None)
        assert len(frame) == 9 and frame["error"].notna().sum() == 6
        files = sorted(fs.glob(tables.split("://", 1)[-1] + "/*.parquet") if "://" in tables else
                       fs.glob(tables + "/*.parquet"))
        urls = [("s3://" + f) if "://" in tables else f for f in files]
        loaded = datasets.load_dataset("parquet", data_files=urls, split="train")
        assert loaded.num_rows == 9
    summary_url = f"{root}/summary.parquet"
    with fsspec.open(summary_url, "rb") as handle:
        summary_bytes = handle.read()
    connection = duckdb.connect()
    connection.register_filesystem(fs) if "://" in root else None
    count = connection.sql(f"select status, count(*) from read_parquet('{summary_url}') group by status "
                           "order by status").fetchall()
    assert count == [("done", 3), ("failed", 6)] and summary_bytes[:4] == b"PAR1"


def test_caches_with_webdataset_and_edits_with_imagefolder(finished_run, tmp_path):
    import datasets
    import fsspec
    import webdataset as wds
    from safetensors.torch import load as load_tensors

    root, _ = finished_run
    fs, _ = fsspec.core.url_to_fs(root)
    wds.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open()
    for stage, entry in (("caches", "safetensors"), ("fused", "safetensors")):
        urls = sorted(fs.glob(_folder(root, stage).split("://", 1)[-1] + "/data/*.tar"))
        urls = [("s3://" + u) if "://" in root else u for u in urls]
        samples = list(wds.WebDataset(urls, shardshuffle=False))
        assert len(samples) == 3 and all(entry in s for s in samples)
        if stage == "fused":
            tensors = load_tensors(samples[0][entry])
            assert tensors["prompt_embeds_mask"].shape[0] == tensors["prompt_embeds"].shape[0]
    local = tmp_path / "edits"
    fs.get(_folder(root, "edits").split("://", 1)[-1] + "/data/", str(local), recursive=True)
    edits = datasets.load_dataset("imagefolder", data_dir=str(local), split="train")
    assert edits.num_rows == 3 and {"image", "id", "instruction"} <= set(edits.column_names)
    assert sorted(edits["instruction"]) == [f"make shape {i} blue" for i in range(3)]
    assert all(min(image.size) > 0 for image in edits["image"])
