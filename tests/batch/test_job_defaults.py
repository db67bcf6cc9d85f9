"""One home for a job's defaults: the same job started from the CLI and from the deployment's flow parameters gets
the same settings and fingerprints (a Lightning LoRA's 4 steps, Qwen-Image-2.1's 40, the tiny zoo's Edit-Plus
routing), because both call `JobSettings.for_job` and compute nothing themselves."""

import inspect
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bridgecore.batch.fingerprints import fingerprints
from bridgecore.batch.settings import JOB_DEFAULTS, JobSettings, settings_for_job

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "prefect.yaml"


class Planned(Exception):
    """Raised by the stand-in for the planning task: the flow got as far as its settings."""


def deployment_parameters(entrypoint: str) -> dict:
    deployments = yaml.safe_load(DEPLOYMENTS.read_text())["deployments"]
    found = [d for d in deployments if d["entrypoint"] == entrypoint]
    assert found, f"no deployment of {entrypoint} in {DEPLOYMENTS}"
    return dict(found[0].get("parameters") or {})


def settings_through_the_deployment(monkeypatch, **user_parameters) -> JobSettings:
    """`prefect deployment run bulk-edit/default --param ...`: the deployment's parameters, then the user's, through
    the flow's own code up to the planning task (which would need a server and the inputs)."""
    import vision_bridge.flows.bulk_edit as module

    seen = {}

    def planning(input, output, settings, *args):
        seen["settings"] = settings
        raise Planned

    monkeypatch.setattr(module, "shard_inputs", planning)
    parameters = {**deployment_parameters("flows/bulk_edit.py:bulk_edit"), **user_parameters}
    parameters.pop("workers_deployment", None)  # where it runs, not what it computes
    with pytest.raises(Planned):
        module.bulk_edit.fn(**parameters)
    return JobSettings.from_dict(seen["settings"])


def settings_through_the_cli(tmp_path, args) -> tuple[int, dict]:
    from vision_bridge.cli import app

    result = CliRunner().invoke(app, ["bulk-edit", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                      "--prompt", "make it blue", "--dry-run", *args])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("steps "))
    steps, prints = line.split("; fingerprints ")
    return int(steps.split()[1]), json.loads(prints)


@pytest.fixture()
def inputs(tmp_path):
    from helpers import make_image

    (tmp_path / "in").mkdir()
    make_image().save(tmp_path / "in" / "a.png")
    return tmp_path


@pytest.fixture(scope="module")
def lightning_lora(tiny_zoo, tmp_path_factory):
    from bridgecore.zoo.tiny_zoo import build_tiny_lora

    path = tmp_path_factory.mktemp("lora") / "Tiny-Lightning-4steps-V1.0.safetensors"
    return str(build_tiny_lora(path, tiny_zoo["qwen-image-edit"], seed=1))


@pytest.mark.parametrize("case", ["edit", "lightning lora", "qwen-image-2.1"])
def test_the_cli_and_the_deployment_give_the_same_job(case, inputs, tiny_zoo, lightning_lora, monkeypatch):
    qwen3 = str(tiny_zoo["qwen3-vl"])
    edit_model = str(tiny_zoo["qwen-image-2.1" if case == "qwen-image-2.1" else "qwen-image-edit"])
    extra_cli, extra_params = [], {}
    if case == "lightning lora":
        extra_cli, extra_params = ["--lora", lightning_lora], {"lora": [lightning_lora]}
    if case == "qwen-image-2.1":
        extra_cli, extra_params = ["--editor", "qwen-image-2.1"], {"editor": "qwen-image-2.1"}
    steps, cli_prints = settings_through_the_cli(inputs, ["--qwen3", qwen3, "--edit-model", edit_model, *extra_cli])
    flow = settings_through_the_deployment(monkeypatch, input=str(inputs / "in"), output=str(inputs / "out"),
                                           prompt="make it blue", qwen3=qwen3, edit_model=edit_model, **extra_params)
    assert steps == flow.steps == {"edit": 50, "lightning lora": 4, "qwen-image-2.1": 40}[case]
    assert fingerprints("bulk-edit", flow) == cli_prints
    if case == "edit":  # the tiny zoo's Edit-Plus takes a tiny job's multi-image samples, decided from the files
        assert flow.plus_model == str(tiny_zoo["qwen-image-edit-plus"])
        job = {"qwen3": qwen3, "edit_model": edit_model}
        from bridgecore.zoo.tiny_zoo import tiny_plus_model_beside

        assert settings_for_job(job).plus_model is None  # the library guesses nothing: the application's policy does
        assert settings_for_job(job, plus_model_beside=tiny_plus_model_beside).plus_model == flow.plus_model
        assert settings_for_job({**job, "plus_model": "none"}, plus_model_beside=tiny_plus_model_beside).plus_model is None
        # training data and its caches: a bridge is trained for one pipeline, so no routing
        assert settings_for_job(job, route_multi_image=False).plus_model is None


def test_the_flows_and_the_cli_take_their_defaults_from_one_place():
    """No default is written twice: every flow parameter and CLI option that is a job setting defaults to
    `JOB_DEFAULTS` (or to None, leaving the decision to `JobSettings.for_job`), and every one that is a training
    setting to `TRAINING_DEFAULTS`; the train flow takes every option the train command has."""
    import typer.main

    from bridgecore.batch.sharding import CACHE_SHARD_SIZE, EDIT_SHARD_SIZE
    from bridgecore.training.trainer import TRAINING_DEFAULTS
    from vision_bridge.flows.build_caches import build_caches
    from vision_bridge.flows.bulk_edit import bulk_edit
    from vision_bridge.flows.train_bridge import train_bridge
    from vision_bridge.cli import app

    # the CLI's names for two training settings; the nightly build-caches batches 8 (no fingerprint reads batch_size)
    cli_names = {"lr": "learning_rate"}
    own = {"build_caches": {"batch_size": 8}}
    training = {**TRAINING_DEFAULTS}
    for flow in (bulk_edit, build_caches, train_bridge):
        for name, parameter in inspect.signature(flow.fn).parameters.items():
            if name in own.get(flow.fn.__name__, {}):
                assert parameter.default == own[flow.fn.__name__][name]
            elif flow is train_bridge and name in training:
                assert parameter.default == training[name], (name, parameter.default)
            elif name in JOB_DEFAULTS:
                assert parameter.default in (JOB_DEFAULTS[name], None), (flow.fn.__name__, name, parameter.default)
    assert inspect.signature(bulk_edit.fn).parameters["shard_size"].default == EDIT_SHARD_SIZE
    assert inspect.signature(build_caches.fn).parameters["shard_size"].default == CACHE_SHARD_SIZE
    commands = typer.main.get_command(app).commands
    for command_name, settings in (("bulk-edit", JOB_DEFAULTS), ("edit", JOB_DEFAULTS), ("train", None)):
        for option in commands[command_name].params:
            if option.param_type_name != "option":  # typer vendors its own click: isinstance(click.Option) is False
                continue
            name = cli_names.get(option.name, option.name)
            if command_name == "train" and name in training:
                assert option.default == training[name], (command_name, name, option.default)
            elif name in JOB_DEFAULTS and (settings is not None or name in ("condition_area", "device", "load_in_8bit")):
                expected = JOB_DEFAULTS[name]
                assert option.default in (expected, None, list(expected) if isinstance(expected, tuple) else expected), (
                    command_name, name, option.default)
    flow_parameters = set(inspect.signature(train_bridge.fn).parameters)
    missing = {cli_names.get(o.name, o.name) for o in commands["train"].params if o.param_type_name == "option"} - flow_parameters
    assert not missing, f"the train command has options the train-bridge flow lacks: {sorted(missing)}"


def test_a_model_folder_spelled_differently_is_the_same_job(tiny_zoo, extractor, monkeypatch):
    """`zoo/m`, `zoo/m/`, `zoo/../zoo/m` and the absolute path recomputed a whole job each (fingerprints from the
    spelling), and a bridge trained under one spelling refused caches extracted under another."""
    import os

    from helpers import make_image

    from bridgecore.model.bridge import BridgeConfig, VisionCacheBridge

    qwen3, edit = tiny_zoo["qwen3-vl"], tiny_zoo["qwen-image-edit"]
    monkeypatch.chdir(qwen3.parent.parent)
    zoo = qwen3.parent.name
    spellings = [str(qwen3), f"{zoo}/{qwen3.name}", f"{zoo}/{qwen3.name}/", f"./{zoo}/../{zoo}/{qwen3.name}"]
    prints = {json.dumps(fingerprints("bulk-edit", JobSettings.for_job(q, f"{zoo}/{edit.name}/"))) for q in spellings}
    assert len(prints) == 1
    assert JobSettings.for_job(spellings[2], str(edit)).qwen3_model == os.path.abspath(str(qwen3))
    assert JobSettings.for_job("Qwen/Qwen3-VL-8B-Instruct", str(edit)).qwen3_model == "Qwen/Qwen3-VL-8B-Instruct"
    # a bridge that names the models by another spelling, with the same revisions, takes these caches
    cache = extractor.extract(make_image(), "make it blue")
    q3, q25 = cache.qwen3, cache.qwen25
    config = BridgeConfig.from_caches(q3, q25, qwen3_model_id=spellings[3], qwen25_model_id=f"{zoo}/{edit.name}/",
                                      qwen3_revision=q3.revision, qwen25_revision=q25.revision)
    VisionCacheBridge(config).check_caches(q3, q25)
    other = BridgeConfig.from_caches(q3, q25, qwen3_model_id=spellings[3], qwen3_revision="another")
    with pytest.raises(ValueError, match="Qwen3 revision"):
        VisionCacheBridge(other).check_caches(q3, q25)
    unrevised = BridgeConfig.from_caches(q3, q25, qwen3_model_id="someone/else", qwen3_revision="")  # the name decides
    with pytest.raises(ValueError, match="Qwen3 model"):
        VisionCacheBridge(unrevised).check_caches(q3, q25)
