"""Code on workers: the Docker image is installed by the same scripts CI runs (no registry needed to check that),
and the deployments are found at the repository root with a pull step each worker resolves for itself."""

import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_installs_with_ci_s_scripts_and_says_where_its_code_is():
    steps = dockerfile_instructions()
    runs = " && ".join(arg for op, arg in steps if op == "RUN")
    assert "bash scripts/setup.sh" in runs  # the same installer CI runs (pinned torch, the project)
    assert "pip install" not in runs  # ... and no second list of packages that could drift from it
    env = " ".join(arg for op, arg in steps if op == "ENV")
    workdir = next(arg for op, arg in steps if op == "WORKDIR")
    assert f"VISION_BRIDGE_CODE_DIR={workdir}" in env and "VISION_BRIDGE_RUNTIME_ONLY=1" in env
    assert f"PATH={workdir}/.venv/bin:" in env
    # the copies: the installers before the sources (a code change does not reinstall torch), the venv never copied
    copies = [arg for op, arg in steps if op == "COPY"]
    assert copies[-1] == ". ." and any(arg.startswith("scripts/") for arg in copies[:-1])
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    # a platform team's image: not root, a health check, heartbeats on (the zombie automation needs them)
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0") and any(op == "HEALTHCHECK" for op, _ in steps)
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=" in env


def test_the_runtime_install_leaves_out_only_test_tools():
    def packages(runtime: bool) -> set[str]:
        env = {"PATH": "/usr/bin:/bin", **({"VISION_BRIDGE_RUNTIME_ONLY": "1"} if runtime else {})}
        out = subprocess.run(["bash", str(REPO / "scripts/setup_system.sh"), "--print"], env=env, capture_output=True,
                             text=True, check=True).stdout
        return set(out.split())

    full, runtime = packages(False), packages(True)
    assert full - runtime == {"chromium", "postgresql"}
    assert {"tesseract-ocr", "tesseract-ocr-jpn", "fonts-noto-cjk"} <= runtime  # the evaluation stage needs them
    setup = (REPO / "scripts/setup.sh").read_text()
    assert re.search(r'EXTRAS="\[dev\]"', setup) and 'VISION_BRIDGE_RUNTIME_ONLY' in setup


def test_deployments_are_found_at_the_root_and_pull_the_worker_s_own_code():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    check, move = config["pull"]
    assert move == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $VISION_BRIDGE_CODE_DIR }}"}}
    # a worker without the variable is named in one line, before the step that would fail with a bare path error
    script = check["prefect.deployments.steps.run_shell_script"]["script"]
    missing = subprocess.run(["bash", "-c", script.split("'")[1]], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "VISION_BRIDGE_CODE_DIR is not set on this worker" in missing.stderr
    assert subprocess.run(["bash", "-c", script.split("'")[1]], env={"PATH": "/usr/bin:/bin",
                                                                    "VISION_BRIDGE_CODE_DIR": "/srv/x"}).returncode == 0
    assert [step for step in config["build"] if "-m vision_bridge.flows.zombie_runs" in str(step)]  # the deploy step's automation
    names = {f"{d['entrypoint'].split(':')[1].replace('_', '-')}/{d['name']}" for d in config["deployments"]}
    assert {"process-shards/gpu", "bulk-edit/default", "build-caches/nightly", "train-bridge/default",
            "train-bridge/multi-gpu"} <= names
    for deployment in config["deployments"]:  # every entrypoint exists
        path, function = deployment["entrypoint"].split(":")
        assert f"def {function}(" in (REPO / path).read_text()
    assert not (REPO / "deployments" / "prefect.yaml").exists()


def test_the_nightly_stays_active_across_deploys_and_refuses_to_run_unconfigured():
    """Schedules are recreated from prefect.yaml on every deploy: the nightly is active there (a redeploy no longer
    pauses it), and a nightly deployed without its variables fails at once, naming them."""
    import pytest

    from vision_bridge.tasks.shard_inputs import shard_inputs

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    nightly = next(d for d in config["deployments"] if d["name"] == "nightly")
    assert [s["active"] for s in nightly["schedules"]] == [True]
    with pytest.raises(ValueError, match="set VISION_BRIDGE_NIGHTLY_INPUT and VISION_BRIDGE_NIGHTLY_OUTPUT where you "
                                         "run `prefect deploy`"):
        shard_inputs.fn(nightly["parameters"]["input"], nightly["parameters"]["output"], {}, "build-caches", None, 64)


def test_import_time_warnings_about_paths_never_taken_are_silenced():
    """Importing the optional backends (bitsandbytes for 8-bit VLMs, torchao for FP8) with diffusers prints warnings
    about code vision-bridge never runs (a 4-bit CPU kernel fetched from the Hub, torchao-serialized checkpoints);
    after `import bridgecore` none of them reaches the user, and nothing else is dropped."""
    import os
    import sys

    noise = ("Failed to load CPU gemm_4bit_forward", "Skipping publisher trust check",
             "Unable to import `torchao` Tensor objects", "is an Enum subclass and is now natively supported")
    code = ("import bridgecore, logging, bitsandbytes, diffusers.quantizers; "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('kept')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not [message for message in noise if message in run.stderr], run.stderr[-2000:]
    assert "kept" in run.stderr  # the filter drops those messages, not the loggers


def test_the_orchestration_installs_under_the_project_s_name():
    """Every package folder is listed for the wheel, and `flows/` and `tasks/` install as `vision_bridge.flows` and
    `vision_bridge.tasks`: no top-level `flows` or `tasks` module in an environment shared with other projects."""
    import importlib.util
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setup["package-dir"]
    assert mapping == {"vision_bridge.flows": "flows", "vision_bridge.tasks": "tasks"}
    folders = {str(p.parent.relative_to(REPO)) for top in ("bridgecore", "vision_bridge", "flows", "tasks")
               for p in (REPO / top).rglob("__init__.py")}
    names = {{v: k for k, v in mapping.items()}.get(f, f.replace("/", ".")) for f in folders}
    assert set(setup["packages"]) == names  # a new sub-package missing from the list would not ship
    assert not any(p.split(".")[0] in ("flows", "tasks") for p in setup["packages"])
    # the installed environment resolves the namespaced names to the repository's folders (editable install)
    spec = importlib.util.find_spec("vision_bridge.flows")
    assert spec is not None and Path(spec.origin).resolve() == REPO / "flows" / "__init__.py"
