"""The library's floors: one-way imports between its sub-packages, no circles, and stage code fingerprints that
follow what a stage really runs (derived from imports, so they cannot drift from the code)."""

import ast
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


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The library modules a file imports, anywhere in it (lazy imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the library imports bridgecore.* absolutely)"
            names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


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


def test_stage_code_fingerprints_follow_what_the_stage_runs(tmp_path):
    """`fused` calls the bridge through the model pool: an edit to bridge.py changes its code version (and the
    edits'), not the caches'; an edit to the batch machinery changes none (it moves bytes, not values)."""
    from bridgecore.batch.pipeline import STAGES

    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "bridgecore", ignore=shutil.ignore_patterns("__pycache__"))
    before = {name: stage.code_version(copy) for name, stage in STAGES.items()}
    assert before == {name: stage.code_version() for name, stage in STAGES.items()}
    with open(copy / "bridgecore" / "model" / "bridge.py", "a") as file:
        file.write("\n# a change\n")
    with open(copy / "bridgecore" / "batch" / "shard_store.py", "a") as file:
        file.write("\n# a change\n")
    after = {name: stage.code_version(copy) for name, stage in STAGES.items()}
    changed = sorted(name for name in STAGES if after[name] != before[name])
    assert changed == ["edits", "fused", "latents"], changed
    with open(copy / "bridgecore" / "evaluation" / "metrics.py", "a") as file:
        file.write("\n# a change\n")
    assert [n for n in STAGES if STAGES[n].code_version(copy) != after[n]] == ["metrics"]
