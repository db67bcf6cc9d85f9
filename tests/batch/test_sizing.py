"""Shards per child run: model loading stays a small part of a child's compute while every worker gets work."""

import pytest

from bridgecore.batch.settings import JobSettings
from bridgecore.batch.sizing import ChildRunCost, child_run_cost, shards_per_run


def test_real_scale_cost_of_a_child_run():
    cost = child_run_cost(JobSettings("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen-Image-Edit"), "bulk-edit")
    assert 50 < cost.load_seconds < 60  # ~73 GB of bf16 weights at 1.3 GB/s
    assert 24 < cost.sample_seconds < 26  # 50 DiT steps of ~198 TFLOP at 400 TFLOP/s + extraction
    caches_only = child_run_cost(JobSettings("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen-Image-Edit"), "build-caches")
    assert caches_only.sample_seconds < 1 and caches_only.load_seconds < cost.load_seconds
    # the rewrite arm: prefill + re-encode at the VLM rate, 255 memory-bound decoding steps shared by a batch of 4
    rewrite = child_run_cost(JobSettings("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen-Image-Edit", rewrite_with="qwen3"),
                             "bulk-edit")
    decode = 255 * 16.4e9 / 3360e9 / 4
    assert rewrite.sample_seconds - cost.sample_seconds == pytest.approx(decode + 55.2e12 / 120e12, rel=0.02)
    identity = child_run_cost(JobSettings("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen-Image-Edit",
                                          rewrite_with="identity"), "bulk-edit")
    assert cost.sample_seconds < identity.sample_seconds < rewrite.sample_seconds


@pytest.mark.parametrize("shards, workers", [(10_000, 8), (500, 2), (3, 4)])
def test_loading_share_and_busy_workers(shards, workers):
    cost = ChildRunCost(load_seconds=56.0, sample_seconds=25.0)
    chosen = shards_per_run(shards, 16, workers, cost)
    busy = -(-shards // chosen) >= min(workers, shards)  # at least one batch per worker
    loading = cost.load_seconds / (cost.load_seconds + chosen * 16 * cost.sample_seconds)
    assert busy
    if shards >= 8 * workers:  # enough work: loading is at most 5%
        assert loading <= 0.05
