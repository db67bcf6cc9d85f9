"""Bridge training on N processes (torch.distributed, gloo on CPU): two ranks follow the loss curve and reach the
weights of one process with the same global batch, a run resumes under another world size on the same curve, and
a rank that dies ends the job with one error and no half-written output."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from bridgecore.batch.settings import JobSettings
from bridgecore.batch.training_data import RankFailedError, run_training
from bridgecore.training.trainer import TrainConfig
from bridgecore.zoo.synthetic_triplets import write_triplets

AREA = 64 * 64
CONFIG = TrainConfig(steps=6, batch_size=2, data_streams=2, eval_every=3, checkpoint_every=3, warmup_steps=2,
                     heldout_fraction=0.25, learning_rate=1e-3, gradient_checkpointing=False)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def settings(tiny_zoo):
    return JobSettings(str(tiny_zoo["qwen3-vl"]), str(tiny_zoo["qwen-image-edit"]), condition_area=AREA, device="cpu")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, settings):
    """12 triplets in shards of 4, trained by one process reading both data streams."""
    folder = tmp_path_factory.mktemp("distributed")
    manifest = write_triplets(folder / "triplets", 12, seed=2)
    metrics = run_training(str(manifest), folder / "one", settings, CONFIG, progress=False, shard_size=4)
    return folder, manifest, metrics


def weights(folder):
    return load_file(folder / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_ranks_follow_one_process(one_process, settings, caplog):
    folder, manifest, one = one_process
    caplog.set_level("INFO", logger="bridgecore")
    two = run_training(str(folder / "one" / "data"), folder / "two", settings, replace(CONFIG, data_workers=1),
                       progress=False, nproc_per_node=2)  # a reader process per rank: the same order
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["global_batch"] == one["global_batch"] == 4
    torch.testing.assert_close(torch.tensor(two["history"]["loss"]), torch.tensor(one["history"]["loss"]),
                               rtol=1e-5, atol=1e-7)
    assert two["heldout_loss_trained"] == pytest.approx(one["heldout_loss_trained"], rel=1e-5)
    assert_same_weights(weights(folder / "two"), weights(folder / "one"))
    saved = json.loads((folder / "two" / "metrics.json").read_text())
    assert saved["world_size"] == 2 and saved["data_streams"] == 2
    # rank 0's progress lines reach the launching process's loggers (a Prefect task's handlers: the UI)
    progress = [r.getMessage() for r in caplog.records if r.name == "bridgecore.training.trainer"]
    assert any(line.startswith("step 6/6: loss") and "samples/s, data wait" in line for line in progress), progress


def test_a_run_resumes_under_another_world_size(one_process, settings):
    """Stopped at step 3 on two ranks, finished by one process: the curve and the weights of the straight run."""
    folder, _, one = one_process
    data = str(folder / "one" / "data")
    run_training(data, folder / "mixed", settings, replace(CONFIG, steps=3), progress=False, nproc_per_node=2)
    state = json.loads((folder / "mixed" / "step_000003" / "trainer_state.json").read_text())
    assert state["data"] == {"samples_seen": 12, "data_streams": 2, "world_size": 2}
    resumed = run_training(data, folder / "mixed", settings, CONFIG, progress=False)
    torch.testing.assert_close(torch.tensor(resumed["history"]["loss"]), torch.tensor(one["history"]["loss"]),
                               rtol=1e-5, atol=1e-7)
    assert_same_weights(weights(folder / "mixed"), weights(folder / "one"))
    with pytest.raises(ValueError, match="trained with 2 data streams.*--data-streams 2"):
        run_training(data, folder / "mixed", settings, replace(CONFIG, steps=8, data_streams=1), progress=False)


def test_a_rank_that_dies_ends_the_job_with_one_error(one_process, settings, tmp_path):
    """A damaged cache shard kills the rank that reads it: one error naming the rank and the reason, the other
    rank stopped, no final bridge written and no temporary checkpoint left."""
    import shutil

    folder, _, _ = one_process
    data = tmp_path / "data"
    shutil.copytree(folder / "one" / "data", data)
    last = sorted((data / "latents").glob("*/data/*.tar"))[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(RankFailedError, match=r"training rank \d of 2 failed: .*(checksum|corrupt|truncated)") as caught:
        run_training(str(data), tmp_path / "broken", settings, CONFIG, progress=False, nproc_per_node=2)
    print(caught.value)
    assert "\n" not in str(caught.value) and last.stem in str(caught.value)
    left = {p.name for p in (tmp_path / "broken").iterdir()}
    assert "model.safetensors" not in left and not any(name.endswith(".tmp") for name in left)
