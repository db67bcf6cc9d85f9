"""The library's floors: one-way imports between its sub-packages, no circles, and stage code fingerprints that
follow what a stage really runs (derived from imports, so they cannot drift from the code)."""

import ast
import inspect
import shutil
from pathlib import Path

import pytest

import bridgecore

PACKAGE = Path(bridgecore.__file__).resolve().parent
GROUND = {"storage", "stats", "options", "remote", "console"}
# floor -> the floors it may import (besides itself and the ground)
ALLOWED = {"model": set(), "training": {"model"}, "evaluation": {"model"}, "planning": {"model"},
           "batch": {"model", "training", "evaluation", "planning"},
           "zoo": {"model", "training", "evaluation", "planning", "batch"}}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def all_imports(path: Path) -> set[str]:
    """Every dotted name a file imports, anywhere in it: `import`, `from ... import`, lazy ones inside functions, and
    `importlib.import_module("...")` / `__import__("...")` with a literal name (the way around an import rule)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the project imports its modules absolutely)"
            names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            names.add(node.args[0].value)
    return names


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The library modules a file imports (see `all_imports`)."""
    return {name for name in all_imports(path) if name in known}


def floor_of(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return "ground" if part in GROUND else part


def test_every_module_stands_on_a_known_floor():
    strays = [m for m in modules() if m != "bridgecore" and floor_of(m) not in ALLOWED and floor_of(m) != "ground"]
    assert not strays, f"modules outside the floors {sorted(ALLOWED)} and the ground {sorted(GROUND)}: {strays}"


def test_imports_run_one_way_down_the_floors():
    known = modules()
    wrong = []
    for module, path in known.items():
        floor = floor_of(module)
        for target in imports_of(path, known):
            other = floor_of(target)
            if other == "ground" or other == floor or target == "bridgecore":
                continue
            if floor == "ground" or other not in ALLOWED.get(floor, set()):
                wrong.append(f"{module} ({floor}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles_in_the_library():
    known = modules()
    graph = {module: imports_of(path, known) - {module} for module, path in known.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module)


def test_the_zoo_is_imported_by_nothing_in_the_library():
    known = modules()
    users = [m for m, path in known.items() if floor_of(m) != "zoo"
             and any(floor_of(t) == "zoo" for t in imports_of(path, known))]
    assert not users, users


def _append(path, text: str) -> None:
    with open(path, "a") as file:
        file.write(text)


def test_stage_code_fingerprints_follow_what_the_stage_runs(tmp_path):
    """Code versions follow behaviour, not bytes: a comment or a docstring anywhere recomputes nothing; a change to
    the bridge's code recomputes `fused` and `edits`, not the caches or `latents` (which runs only the VAE); a
    change to how the pool builds an editor recomputes every stage that runs a model; the batch machinery and the
    latency benchmark's printer recompute nothing."""
    from bridgecore.batch.pipelines import STAGES

    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "bridgecore", ignore=shutil.ignore_patterns("__pycache__"))
    before = {name: stage.code_version(copy) for name, stage in STAGES.items()}
    assert before == {name: stage.code_version() for name, stage in STAGES.items()}

    def changed() -> list[str]:
        return sorted(name for name, stage in STAGES.items() if stage.code_version(copy) != before[name])

    root = copy / "bridgecore"
    for path in ("model/bridge.py", "batch/shard_store.py", "batch/stages/outputs.py", "model/edit_benchmark.py",
                 "batch/model_pool.py", "model/edit_pipeline.py"):
        _append(root / path, "\n# a comment\n")
    text = (root / "model" / "bridge.py").read_text()
    (root / "model" / "bridge.py").write_text(text.replace('"""VisionCacheBridge:', '"""The VisionCacheBridge:', 1))
    assert changed() == [], "a comment or a docstring recomputed stages"
    _append(root / "batch" / "shard_store.py", "\nRETRIES = 3\n")
    _append(root / "model" / "edit_benchmark.py", "\nTABLE_WIDTH = 120\n")
    assert changed() == [], "the batch machinery or the benchmark printer recomputed stages"
    _append(root / "model" / "bridge.py", "\nBRIDGE_CHANGE = 1\n")
    assert changed() == ["edits", "fused"]
    before.update({name: stage.code_version(copy) for name, stage in STAGES.items()})
    _append(root / "batch" / "model_pool.py", "\nPOOL_CHANGE = 1\n")
    runs_models = sorted(name for name, stage in STAGES.items() if stage.models or name in ("fused", "rewrites"))
    assert changed() == runs_models and "latents" in runs_models and "caches" in runs_models
    before.update({name: stage.code_version(copy) for name, stage in STAGES.items()})
    _append(root / "evaluation" / "metrics.py", "\nMETRICS_CHANGE = 1\n")
    assert changed() == ["metrics"]


def test_every_stage_that_runs_a_model_declares_what_it_calls():
    """A stage that runs models through the pool (`ctx.models`) names what it calls in an import from the model
    floor (a `TYPE_CHECKING` import is enough): that import is what its code fingerprint follows."""
    from bridgecore.batch.code_version import imported_names, uses_model_pool
    from bridgecore.batch.pipelines import STAGES

    from bridgecore.batch.code_version import code_files

    silent = []
    for name, stage in STAGES.items():
        path = Path(inspect.getfile(type(stage)))
        files = [f for f in code_files(path) if "stages" in f.parts]  # the stage and the stage helpers it uses
        running = [f for f in files if uses_model_pool(f)]
        if running and not any(n.startswith("bridgecore.model.") for f in running for n in imported_names(f)):
            silent.append(name)
        if stage.models:
            assert running, f"{name} declares models {stage.models} but never runs them through the pool"
    assert not silent, f"stages that run models without naming what they call: {silent}"


def layer_of(module: str) -> str:
    """The project layer a dotted name belongs to: the orchestration installs as `vision_bridge.flows` and
    `vision_bridge.tasks` (folders `flows/` and `tasks/`), the rest of `vision_bridge` is the app."""
    parts = module.split(".")
    if parts[0] == "vision_bridge" and len(parts) > 1 and parts[1] in ("flows", "tasks"):
        return parts[1]
    return parts[0]


def test_the_layers_of_the_project_run_one_way():
    """app (vision_bridge) -> flows -> tasks -> library (bridgecore): the library imports no orchestration (Prefect,
    flows, tasks) and no app; tasks import no flows and no app; flows import no app. `importlib` counts."""
    root = PACKAGE.parent
    rules = {"bridgecore": ("prefect", "flows", "tasks", "vision_bridge"), "tasks": ("flows", "vision_bridge"),
             "flows": ("vision_bridge",)}
    wrong = []
    for package, forbidden in rules.items():
        for path in (root / package).rglob("*.py"):
            for name in all_imports(path):
                if layer_of(name) in forbidden:
                    wrong.append(f"{path.relative_to(root)} imports {name}")
    assert not wrong, "\n".join(wrong)
    # the app's own namespace is not a way around the rule, and the old top-level names are gone
    assert layer_of("vision_bridge.commands.train") == "vision_bridge" and layer_of("vision_bridge.flows.naming") == "flows"
    stray = [f"{path.relative_to(root)} imports {name}" for package in ("flows", "tasks", "vision_bridge", "tests")
             for path in (root / package).rglob("*.py") for name in all_imports(path) if name.split(".")[0] in ("flows", "tasks")]
    assert not stray, "top-level flows/tasks imports (install under vision_bridge.*):\n" + "\n".join(stray)


def test_a_planted_importlib_violation_is_caught(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import importlib\n\ndef f():\n    return importlib.import_module('prefect.flows')\n")
    assert "prefect.flows" in all_imports(planted)
