"""Prefect at scale as a cluster runs it: PostgreSQL, a Prefect server on it, a control pool and two GPU-pool
process workers, and a scale-out job of one-sample shards (48 here; `bash bench/bench_scale_postgres.sh` runs
the same test with 500): no sample lost, every shard exactly once, each child run loading each model at most
once. Prints the wall time and the Prefect overhead per shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_image

pytestmark = pytest.mark.slow  # PostgreSQL, a Prefect server and a hundred shards

REPO = Path(__file__).resolve().parents[2]
SHARDS = int(os.environ.get("VISION_BRIDGE_SCALE_SHARDS", "48"))  # the benchmark sets 500


@pytest.fixture()
def cluster(tmp_path):
    from postgres_server import PostgresServer
    from prefect_server import PrefectServer

    database = PostgresServer(tmp_path / "pg")
    database.start()
    server = PrefectServer(tmp_path / "prefect", database_url=database.url)
    try:
        server.start()
        for pool in ("gpu", "control"):
            server.cli("work-pool", "create", pool, "--type", "process")
        server.cli("deploy", "--all", "--no-prompt")
        server.start_worker("gpu", "gpu-0")
        server.start_worker("gpu", "gpu-1")
        yield server
    finally:
        server.stop()
        database.stop()


def test_one_sample_shards_on_postgres(tmp_path, tiny_zoo, cluster):
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(4):
        make_image(96, 64, index).save(folder / f"img{index}.png")
    rows = [{"id": f"s{i:04d}", "image": f"img{i % 4}.png", "instruction": f"edit {i}"} for i in range(SHARDS)]
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    code = (
        "import json; from vision_bridge.flows.build_caches import build_caches; "
        f"print(json.dumps(build_caches(input={str(folder / 'm.jsonl')!r}, output={str(out)!r}, "
        f"qwen3={str(tiny_zoo['qwen3-vl'])!r}, edit_model={str(tiny_zoo['qwen-image-edit'])!r}, shard_size=1, "
        "condition_area=32 * 32, batch_size=1, workers_deployment='process-shards/gpu', deadline_s=1500)['counts']))"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=cluster.env, cwd=REPO, capture_output=True, text=True,
                            timeout=1800)
    wall = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"done": SHARDS, "failed": 0, "pending": 0}

    (caches,) = list((out / "caches").iterdir())
    committed = list((caches / "_done").glob("*.json"))
    assert len(committed) == SHARDS
    ids = [row for path in (caches / "table").glob("*.parquet")
           for row in __import__("pyarrow.parquet", fromlist=["x"]).read_table(path).column("id").to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every sample exactly once
    children = [json.loads(p.read_text()) for p in out.glob("runs/*/children/*.json")]
    assert {c["worker"] for c in children} == {"gpu-0", "gpu-1"}
    assert sum(len(c["shards"]) for c in children) == SHARDS
    for child in children:
        assert child["qwen3_loads"] <= 1 and child["qwen25_loads"] <= 1, child
    compute = sum(json.loads(p.read_text())["seconds"] for p in committed)
    in_children = sum(c["seconds"] for c in children)
    print(f"\n{SHARDS} one-sample shards on PostgreSQL, 2 workers, {len(children)} child runs: wall {wall:.0f} s; "
          f"child runs {in_children:.0f} s for {compute:.0f} s of stage compute -> Prefect overhead "
          f"{(in_children - compute) / SHARDS * 1000:.0f} ms per shard")
