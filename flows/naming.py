"""What a run is called, how it is tagged and how it speaks.

- Parent runs get readable names ("bulk-edit out Edit+bridge"), and tags for their output, arm and pipeline,
  which their children carry too: filter the UI by `output:s3://bucket/out` or `arm:Edit+bridge`.
- Artifact keys are per output and arm (two jobs, or two arms of one output, never overwrite each other's).
- In a run submitted through a deployment, messages name flow parameters (`plus_model`), not command-line
  options (`--plus-model`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from typing import Any, Callable

from prefect.runtime import deployment, flow_run

from bridgecore.batch.pipelines import is_scored
from bridgecore.evaluation.capabilities import arm_label
from bridgecore.options import named_as_parameters


def _place(output: str) -> str:
    return str(output or "").rstrip("/").rsplit("/", 1)[-1] or str(output)


def run_name(pipeline: str) -> Callable[[], str]:
    """A `flow_run_name` callable: '<pipeline> <output folder> <arm>', from the run's parameters."""
    def name() -> str:
        parameters = flow_run.parameters
        output = parameters.get("output") or parameters.get("out") or ""
        arm = f" {arm_label(parameters, look_up=False)}" if is_scored(pipeline) else ""
        return f"{pipeline} {_place(output)}{arm}"
    return name


def job_tags(pipeline: str, output: str, settings: dict | None = None) -> list[str]:
    tags = [f"pipeline:{pipeline}", f"output:{output}"]
    if settings is not None and is_scored(pipeline):
        tags.append(f"arm:{arm_label(settings, look_up=False)}")
    return tags


def tag_this_run(tags: list[str]) -> None:
    """Adds `tags` to the current flow run (shown and filterable in the UI)."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.id
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id).tags or []
        client.update_flow_run(run_id, tags=sorted(set(current) | set(tags)))


def artifact_key(kind: str, output: str, arm: str = "") -> str:
    """`kind` + readable output folder and arm + a hash of both: lowercase letters, digits and dashes (Prefect's
    rule), distinct per output and arm."""
    readable = re.sub(r"[^a-z0-9]+", "-", f"{_place(output)}-{arm}".lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha256(f"{output}\n{arm}".encode()).hexdigest()[:8]
    return f"{kind}-{readable}-{digest}" if readable else f"{kind}-{digest}"


def speaks_in_parameters(function: Callable[..., Any]) -> Callable[..., Any]:
    """Under `@flow`: messages name flow parameters when the run came from a deployment."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with named_as_parameters() if deployment.id else contextlib.nullcontext():
            return function(*args, **kwargs)
    return wrapper
