"""The command line's shared parts: the Typer app, the loud tiny-zoo fallback, one-line errors, the preflight."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from bridgecore.model.loading import DEFAULT_QWEN3_MODEL, ModelNotAvailableError

app = typer.Typer(
    help="Qwen3-VL -> Qwen-Image-Edit vision bridge: extract caches, edit, run bulk jobs on Prefect, train the "
    "bridge, evaluate capabilities, plan real-scale runs, build the offline tiny zoo.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: "[default: 50]" or "[target]" must not be read as markup
)

DEFAULT_HOME = Path(".vision-bridge")
TINY_ZOO_DIR = DEFAULT_HOME / "tiny-zoo"


DEBUG = False


def fail(message: str) -> None:
    if DEBUG and sys.exc_info()[1] is not None:
        raise
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (and Prefect's logs) on errors.")):
    global DEBUG
    DEBUG = debug


def caused_by_interrupt(error: BaseException) -> bool:
    """Whether a Ctrl-C is behind this error: Prefect's task engine, interrupted before its task run exists, raises
    `ValueError("Task run is not set")` while handling the KeyboardInterrupt, which then only survives as context."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def user_errors() -> tuple[type[BaseException], ...]:
    """Mistakes a user can fix (bad value, missing file, unreachable storage, unknown model): one line each."""
    from bridgecore.storage import StorageUnreachableError

    return (ValueError, OSError, StorageUnreachableError, ModelNotAvailableError)


def preflight(input: str, output: str, create_bucket: bool = False, prompt: Optional[str] = None,
               qwen3: Optional[str] = None) -> None:
    """Fails in seconds, with one line, before a server starts or anything is written, on the common mistakes: a
    missing or unreadable input, a manifest without the columns a job needs, an output URL that cannot be
    right or cannot be written, a Qwen3-VL model that is not there."""
    from bridgecore.batch.sharding import check_input, check_manifest_columns
    from bridgecore.storage import Storage

    try:
        check_input(input)
        check_manifest_columns(input, prompt)
        _check_output_url(output)
        _check_output_outside_input(input, output)
        if qwen3 is not None:
            _check_model_config(qwen3)
        Storage(output).check_writable(create_bucket)
    except user_errors() as error:
        fail(str(error))


def check_input_first(input: str, prompt: Optional[str] = None) -> None:
    """The input alone (exists, has the columns a job needs), before anything is built or written: a typo must not
    wait behind minutes of tiny-zoo training."""
    from bridgecore.batch.sharding import check_input, check_manifest_columns

    try:
        check_input(input)
        check_manifest_columns(input, prompt)
    except user_errors() as error:
        fail(str(error))


def _check_output_url(output: str) -> None:
    if "://" in output and not output.startswith("file://"):
        parts = output.split("://", 1)[1].split("/")
        if any(part in (".", "..") for part in parts) or not parts[0]:
            raise ValueError(f"output {output}: an object-store URL is bucket/prefix, without '.' or '..' segments "
                             "or an empty bucket name")


def _check_output_outside_input(input: str, output: str) -> None:
    """A folder (or glob) of images is read recursively: an output inside it would feed its own edits back in as
    inputs on the next run."""
    from bridgecore.batch.sharding import MANIFEST_EXTENSIONS

    if "://" in input or "://" in output or input.lower().endswith(MANIFEST_EXTENSIONS):
        return
    if (any(c in input for c in "*?[") and "**" not in input) or os.path.isfile(os.path.expanduser(input)):
        return  # a glob that does not recurse, or a file (not a folder input)
    folder = Path(re.split(r"[*?[]", os.path.expanduser(input), maxsplit=1)[0] or ".")
    folder = folder if folder.is_dir() else folder.parent
    if Path(os.path.expanduser(output)).resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"output {output} is inside the input folder {folder}: its edits would be read as inputs "
                         "on the next run; write the output elsewhere")


def _check_model_config(name: str) -> None:
    """A Qwen3-VL model: a local directory or hub id with a config.json (its weights are not fetched here)."""
    from bridgecore.model.loading import resolve_model

    resolved = resolve_model(name, allow_patterns=["config.json"])
    if not (resolved.path / "config.json").exists():
        raise ModelNotAvailableError(f"model {name!r}: {resolved.path} has no config.json; is this a Qwen3-VL model "
                                     "directory?")


def banner(message: str) -> None:
    line = "!" * 100
    typer.secho(f"{line}\n{message}\n{line}", fg=typer.colors.YELLOW, bold=True, err=True)


# measured on 2 idle cores (AVX2 and AMX machines): what the first use of the tiny zoo costs, once
TINY_ZOO_MINUTES = {"random": "under a minute", "edit model": "4 to 8 minutes", "bridge": "1 to 2 minutes"}


def tiny_zoo_work(trained: bool = False, bridges: tuple[str, ...] = ()) -> str:
    """What the tiny zoo still has to build or train, with honest times (empty when everything is cached)."""
    from bridgecore.zoo.tiny_zoo import TRAINED_EDIT_MODEL

    todo = []
    if not (TINY_ZOO_DIR / "qwen3-vl" / ".tiny-zoo-complete").exists():
        todo.append(f"build the random tiny models ({TINY_ZOO_MINUTES['random']})")
    if trained and not (TINY_ZOO_DIR / TRAINED_EDIT_MODEL / ".tiny-zoo-complete").exists():
        todo.append(f"train the tiny edit model's VAE and DiT on the shapes task ({TINY_ZOO_MINUTES['edit model']})")
    for name in bridges:
        if not (TINY_ZOO_DIR / name / ".tiny-zoo-complete").exists():
            todo.append(f"train the tiny bridge {name} ({TINY_ZOO_MINUTES['bridge']})")
    if not todo:
        return ""
    return ("\nFirst use on this machine: " + "; then ".join(todo) + " on 2 idle cores, longer on a busy machine; "
            "cached afterwards.")


def resolve_or_tiny(qwen3: Optional[str], edit_model: Optional[str], plus: bool = False,
                    trained: bool = False, editor: str = "auto") -> tuple[str, str]:
    """The requested models; with none requested, the real defaults if already on this machine (local files or
    the Hugging Face cache: a probe must not start a 60 GB download), else the tiny zoo (loudly). `trained`
    picks the zoo's trained tiny edit model (single-image) instead of the random one; `editor` names the
    family whose default edit model is wanted (e.g. qwen-image-2.1)."""
    from bridgecore.model.loading import DEFAULT_MODEL_OF_FAMILY, resolve_model
    from bridgecore.zoo.tiny_zoo import build_tiny_zoo

    family = editor if editor != "auto" else "qwen-image-edit-plus" if plus else "qwen-image-edit"
    if family not in DEFAULT_MODEL_OF_FAMILY:
        fail(f"--editor must be auto, {', '.join(DEFAULT_MODEL_OF_FAMILY)}; got {editor!r}")
    plus = family == "qwen-image-edit-plus"
    default_edit = DEFAULT_MODEL_OF_FAMILY[family]
    if qwen3 is not None and edit_model is not None:
        return qwen3, edit_model
    try:
        if family != "qwen-image-2.1":  # 2.1 reads its own encoder: Qwen3-VL-Instruct need not be here
            resolve_model(qwen3 or DEFAULT_QWEN3_MODEL, local_only=True)
        resolve_model(edit_model or default_edit, allow_patterns=["model_index.json"], local_only=True)
        return qwen3 or DEFAULT_QWEN3_MODEL, edit_model or default_edit
    except ModelNotAvailableError as error:
        trained = trained and family == "qwen-image-edit"
        what = ("Outputs are meaningless pictures that only prove the machinery runs." if not trained else
                "The edit model's VAE and DiT are trained (on CPU) on ONE synthetic task, 'Make the <shape> <colour>': "
                "its edits are real, of that task only; the VLMs stay random.")
        # the banner comes first: building and training the zoo takes minutes the first time
        banner(
            f"NO REAL WEIGHTS FOUND: using the TINY {'TRAINED' if trained else 'RANDOM'} MODELS of the offline zoo in "
            f"{TINY_ZOO_DIR.resolve()}.\n{what}\n"
            f"Reason: {error}\nPass --qwen3 and --edit-model (hub ids or local directories) "
            "to use real models." + tiny_zoo_work(trained)
        )
        zoo = build_tiny_zoo(TINY_ZOO_DIR, trained=trained)
        tiny_edit = zoo["qwen-image-2.1" if family == "qwen-image-2.1" else "qwen-image-edit-plus" if plus else
                        "qwen-image-edit-trained" if trained else "qwen-image-edit"]
        return qwen3 or str(zoo["qwen3-vl"]), edit_model or str(tiny_edit)


def tiny_task_settings(edit_model: str, steps: Optional[int], condition_area: Optional[int],
                       default_area: int) -> tuple[Optional[int], int]:
    """(steps, condition area): with the zoo's trained tiny edit model, its own task's settings where the user gave
    none (20 steps, the 64x64 pictures it was trained on; at real-scale settings it paints noise), said loudly;
    otherwise what was given, or the real defaults."""
    import json

    from bridgecore.zoo.tiny_edit_model import REPORT_NAME
    from bridgecore.zoo.tiny_zoo import TINY_BRIDGE, TRAINED_EDIT_MODEL

    if Path(edit_model).resolve() != (TINY_ZOO_DIR / TRAINED_EDIT_MODEL).resolve():
        return steps, condition_area or default_area
    size = json.loads((Path(edit_model) / REPORT_NAME).read_text())["config"]["image_size"]
    chosen = (20 if steps is None else steps, condition_area or size * size)
    banner(f"THE TINY TRAINED EDIT MODEL knows one task, 'Make the <shape> <colour>', on {size}x{size} pictures: using "
           f"its settings ({chosen[0]} steps, condition area {chosen[1]} = {size}x{size}) where you gave none.\n"
           "Your own pictures come out as its toy rendition of them. Add "
           f"--bridge {TINY_ZOO_DIR / TINY_BRIDGE} for the tiny bridge (trained by `bash scripts/run_main.sh`).")
    return chosen

