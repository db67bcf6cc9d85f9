"""A stage's code fingerprint, derived from what its file imports: nothing to list by hand, nothing to forget.

Starting from the stage's own file, every `bridgecore` import (at module level, inside functions, under
`TYPE_CHECKING`) is followed through the floors that compute values: `bridgecore.model`, `bridgecore.evaluation`,
`bridgecore.stats`, the stage files themselves, and `batch/model_pool.py` (how the pool builds an editor: which
options reach `EnhancedQwenImageEdit`), which every stage that runs a model through the pool reaches. The rest of
the batch machinery (storage, planning, shard stores, settings) only moves bytes and is not followed: fixing a
retry loop must not recompute a million edits. A stage that calls a model through the pool names what it calls in
a `TYPE_CHECKING` import (e.g. `fused` names `EnhancedQwenImageEdit`, whose `bridge_for` it calls; `latents` only
the pipeline loader, whose VAE it runs); `tests/test_layers.py` checks that every such stage declares one.

What is hashed is behaviour, not bytes: each file's syntax tree without its docstrings (comments never reach it),
so a comment or a docstring recomputes nothing. Modules that no stage's values depend on although an import
reaches them (`NOT_VALUE_CODE`: the latency benchmark's table printer) are not followed.

Known gaps: modules are followed whole, so an edit to one payload format reruns every stage that reads any; the pool
file is a leaf (its lazy imports of the model classes are not followed: what a stage calls is its own declared
import), so a change inside `EnhancedQwenImageEdit.__init__` reaches only the stages that declare that class.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the bridgecore package
VALUE_FLOORS = ("bridgecore.model", "bridgecore.evaluation", "bridgecore.stats", "bridgecore.batch.stages",
                "bridgecore.batch.model_pool")
# reached by a lazy import, computing nothing a stage stores: a latency benchmark that prints a table
NOT_VALUE_CODE = ("bridgecore.model.edit_benchmark",)
MODEL_POOL = "bridgecore.batch.model_pool"


def imported_names(path: Path) -> set[str]:
    """Dotted names a file imports: `import a.b` gives a.b; `from a.b import c` gives a.b and a.b.c (c may be a
    module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def uses_model_pool(path: Path) -> bool:
    """Whether a file runs models through a stage context's pool (`ctx.models`)."""
    return any(isinstance(node, ast.Attribute) and node.attr == "models" and isinstance(node.value, ast.Name)
               and node.value.id == "ctx" for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))


def behaviour(path: Path) -> bytes:
    """A file's syntax tree without docstrings, as text: what it does, not how it is commented."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return _canonical(tree).encode()


def _canonical(node) -> str:
    """A syntax tree as text without empty fields: the same on every Python version (ast.dump adds fields such as
    3.12's `type_params=[]` and 3.13 drops empty ones, so the workers' and the planner's Pythons would disagree)."""
    if isinstance(node, ast.AST):
        fields = [f"{name}={_canonical(value)}" for name, value in ast.iter_fields(node) if value not in (None, [])]
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_canonical(value) for value in node) + "]"
    return repr(node)


def module_file(name: str, root: Path = ROOT) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def code_files(start: Path, root: Path = ROOT) -> list[Path]:
    """`start` and every value-floor module it reaches through imports, sorted."""
    seen, todo = {start.resolve()}, [start.resolve()]
    while todo:
        current = todo.pop()
        followed = [name for name in imported_names(current)
                    if name.startswith(VALUE_FLOORS) and not name.startswith((*NOT_VALUE_CODE, MODEL_POOL))]
        if uses_model_pool(current):  # a stage (or a stage helper) running models: how the pool builds them; a
            pool = module_file(MODEL_POOL, root)  # leaf: what the stage calls is its own declared import
            if pool is not None:
                seen.add(pool.resolve())
        for name in followed:
            found = module_file(name, root)
            if found is not None and found.resolve() not in seen:
                seen.add(found.resolve())
                todo.append(found.resolve())
    return sorted(seen)


def code_version(start: Path, root: Path = ROOT) -> str:
    """sha256 of the behaviour of the files `code_files` finds, each named relative to `root` (the installed tree's
    are computed once per process: its code does not change under a running job)."""
    if root == ROOT:
        return _installed_code_version(start)
    return _code_version(start, root)


@functools.lru_cache(maxsize=64)
def _installed_code_version(start: Path) -> str:
    return _code_version(start, ROOT)


def _code_version(start: Path, root: Path) -> str:
    digest = hashlib.sha256()
    for path in code_files(start, root):
        digest.update(path.relative_to(root.resolve()).as_posix().encode() + b"\0" + behaviour(path) + b"\0")
    return digest.hexdigest()[:16]
