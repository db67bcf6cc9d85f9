"""How a message names a setting: `--plus-model` to someone at the command line, `plus_model` to someone who
submitted a deployment (where the same setting is a flow parameter). The flows switch it for their run.

    raise ValueError(f"... pass {option('create_bucket')} to create it")
"""

from __future__ import annotations

import contextlib
import contextvars

_AS_PARAMETERS = contextvars.ContextVar("vision_bridge_options_as_parameters", default=False)


def option(name: str, value: str | None = None) -> str:
    """`name` (a settings field, e.g. "plus_model") as the user gave it: `--plus-model VALUE` or
    `the plus_model parameter (VALUE)`."""
    if _AS_PARAMETERS.get():
        return f"the {name} parameter" + (f" ({value})" if value is not None else "")
    return f"--{name.replace('_', '-')}" + (f" {value}" if value is not None else "")


@contextlib.contextmanager
def named_as_parameters():
    """Within the block (and the threads and tasks it starts with a copy of its context), messages name flow
    parameters instead of command-line options."""
    token = _AS_PARAMETERS.set(True)
    try:
        yield
    finally:
        _AS_PARAMETERS.reset(token)
