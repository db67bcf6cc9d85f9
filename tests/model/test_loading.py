"""Model loading: local dirs and hub ids through one path, fast clear failures, 8-bit on CPU, no Prefect."""

import subprocess
import sys
import time

import pytest
import torch
from helpers import SMALL_AREA, make_image

from bridgecore.model.loading import LoadOptions, ModelNotAvailableError, resolve_model


def test_unavailable_hub_model_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as error:
        resolve_model("Qwen/Qwen3-VL-8B-Instruct-does-not-exist")
    message = str(error.value)
    assert "Qwen/Qwen3-VL-8B-Instruct-does-not-exist" in message
    assert "local directory" in message and "HF_HUB_OFFLINE" in message and "hf download" in message
    assert error.value.__cause__ is None  # no stack trace from inside the hub client
    assert time.monotonic() - start < 30


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no such model directory"):
        resolve_model(str(tmp_path / "nope" / "model"))


def test_local_revision_tracks_content(tmp_path, tiny_zoo):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_zoo["qwen3-vl"], copy)
    original = resolve_model(copy).revision
    assert original == resolve_model(tiny_zoo["qwen3-vl"]).revision and original.startswith("local-")
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("128", "129", 1))
    assert resolve_model(copy).revision != original


def test_conflicting_quantisation_is_refused():
    with pytest.raises(ValueError, match="exclusive"):
        LoadOptions(load_in_8bit=True, load_in_4bit=True)


def test_8bit_runs_on_cpu_and_stays_close(tiny_zoo, extractor):
    from bridgecore.model.extraction import VisionCacheExtractor

    quantised = VisionCacheExtractor(tiny_zoo["qwen3-vl"], tiny_zoo["qwen-image-edit"], condition_area=SMALL_AREA,
                                     load_in_8bit=True)
    image, prompt = make_image(), "make it blue"
    q8 = quantised.extract(image, prompt)
    full = extractor.extract(image, prompt)
    linear = quantised.qwen25_encoder.text_encoder.model.language_model.layers[0].mlp.gate_proj
    assert linear.weight.dtype == torch.int8
    for a, b in ((q8.qwen25.prompt_embeds, full.qwen25.prompt_embeds), (q8.qwen3.levels["late"], full.qwen3.levels["late"])):
        cosine = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
        assert cosine.min() > 0.99
        assert not torch.equal(a.float(), b.float())  # really quantised


def test_import_bridgecore_does_not_import_prefect():
    code = ("import sys, bridgecore, vision_bridge.cli, bridgecore.model.extraction, bridgecore.planning.planner, bridgecore.zoo.tiny_zoo; "
            "print('prefect' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_bridgecore_never_imports_the_orchestration_layer():
    """Not even lazily inside a function: the library must not call into Prefect, the flows or the tasks."""
    import ast
    from pathlib import Path

    import bridgecore

    offenders = []
    for path in Path(bridgecore.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.name}:{node.lineno} {name}" for name in names
                          if name.split(".")[0] in ("prefect", "flows", "tasks")]
    assert not offenders, offenders
