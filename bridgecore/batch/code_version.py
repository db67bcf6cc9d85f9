"""A stage's code fingerprint, derived from what its file imports: nothing to list by hand, nothing to forget.

Starting from the stage's own file, every `bridgecore` import (at module level, inside functions, under
`TYPE_CHECKING`) is followed through the floors that compute values: `bridgecore.model`, `bridgecore.evaluation`,
`bridgecore.stats` and the stage files themselves. The batch machinery (storage, planning, shard stores,
settings) only moves bytes and is not followed: fixing a retry loop must not recompute a million edits. A
stage that calls a model through the model pool names the class in a `TYPE_CHECKING` import, and that import
is followed like any other (e.g. `fused` names `EnhancedQwenImageEdit`, whose `bridge_for` it calls).

Known gaps: how the pool builds an editor (`settings.ModelPool`, `EnhancedQwenImageEdit.__init__`) is not
followed from the caches stages; modules are followed whole, so an edit to one payload format reruns every
stage that reads any.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the bridgecore package
VALUE_FLOORS = ("bridgecore.model", "bridgecore.evaluation", "bridgecore.stats", "bridgecore.batch.stages")


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
        for name in imported_names(todo.pop()):
            if not name.startswith(VALUE_FLOORS):
                continue
            found = module_file(name, root)
            if found is not None and found.resolve() not in seen:
                seen.add(found.resolve())
                todo.append(found.resolve())
    return sorted(seen)


def code_version(start: Path, root: Path = ROOT) -> str:
    """sha256 of the files `code_files` finds, each named relative to `root` (the installed tree's are computed once
    per process: its code does not change under a running job)."""
    if root == ROOT:
        return _installed_code_version(start)
    return _code_version(start, root)


@functools.lru_cache(maxsize=64)
def _installed_code_version(start: Path) -> str:
    return _code_version(start, ROOT)


def _code_version(start: Path, root: Path) -> str:
    digest = hashlib.sha256()
    for path in code_files(start, root):
        digest.update(path.relative_to(root.resolve()).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
