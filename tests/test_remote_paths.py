"""Every path a command takes may be an s3:// URL: train --out, edit/bulk-edit --bridge, evaluate --benchmark
(real SeaweedFS on loopback)."""


import pytest
from helpers import make_image, run_cli


def _run(*args):
    return run_cli(*args)


@pytest.mark.slow
def test_train_to_s3_then_edit_and_bulk_edit_with_the_bridge_from_s3(tmp_path, tiny_zoo, s3_root):
    import s3fs

    from bridgecore.zoo.synthetic_triplets import write_triplets

    manifest = write_triplets(tmp_path / "data", 6)
    models = ["--qwen3", str(tiny_zoo["qwen3-vl"]), "--edit-model", str(tiny_zoo["qwen-image-edit"]),
              "--condition-area", str(64 * 64)]
    bridge = f"{s3_root}/ckpt"
    trained = _run("train", "--data", str(manifest), "--out", bridge, "--steps", "2", "--batch-size", "2",
                   "--eval-every", "2", *models)
    assert trained.returncode == 0, trained.stderr[-3000:]
    fs = s3fs.S3FileSystem()
    names = {path.rsplit("/", 1)[-1] for path in fs.find(bridge, refresh=True)}
    assert {"config.json", "model.safetensors", "metrics.json", "trainer_state.json"} <= names
    assert not (tmp_path / "s3:").exists()
    image = tmp_path / "in.png"
    make_image().save(image)
    edited = _run("edit", str(image), "--prompt", "Make the square blue", "--steps", "2", "--bridge", bridge,
                  "--out", str(tmp_path / "e.png"), *models)
    assert edited.returncode == 0 and (tmp_path / "e.png").exists(), edited.stderr[-3000:]
    out = tmp_path / "bulk"
    bulk = _run("bulk-edit", "--input", str(manifest), "--output", str(out), "--steps", "2", "--bridge", bridge,
                *models)
    assert bulk.returncode == 0 and "done 6, failed 0" in bulk.stdout, bulk.stderr[-3000:]


def test_evaluate_a_benchmark_on_s3(tmp_path, s3_root):
    import s3fs

    from bridgecore.evaluation.benchmark_data import make_benchmark

    make_benchmark(tmp_path / "bench", per_capability=1, seed=2)
    s3fs.S3FileSystem().put(str(tmp_path / "bench") + "/", f"{s3_root}/bench/", recursive=True)
    result = _run("evaluate", "--benchmark", f"{s3_root}/bench", "--editor", "oracle", "--json",
                  str(tmp_path / "scores.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "scores.json").exists() and "ocr" in result.stdout
