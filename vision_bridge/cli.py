"""`vision-bridge`: the command line. Run `vision-bridge --help`.

It sits above both layers: the library (`bridgecore`, which never imports Prefect or the flows) and the
orchestration (`flows`, imported lazily by the commands that run a flow, so the others start fast). One module
per command in `commands/`; what they share (the app, errors, the tiny-zoo fallback, the preflight) in `app.py`.
"""

from __future__ import annotations

import logging
import sys

from vision_bridge import commands  # noqa: F401 - registers every command on the app
from vision_bridge.app import app  # noqa: F401 - `vision_bridge.cli:app` for typer's test runner and docs


ERROR_LOG = ".vision-bridge/logs/last-error.log"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from bridgecore.console import quiet_library_bars

    quiet_library_bars()
    try:
        app()  # click's standalone mode: usage errors, Exit and Ctrl-C end the process as click decides
    except Exception as error:  # noqa: BLE001 - the last resort: one line, the traceback in a file
        exit_on(error)


def exit_on(error: BaseException) -> None:
    """Ends the process for an error no command turned into its own line: one `error:` line that names what happened
    (storage or a remote host unreachable past its retry budget: nothing committed is lost, the same command
    resumes), exit 1, and the full traceback in `ERROR_LOG` (on the terminal with --debug)."""
    import traceback
    from pathlib import Path

    from vision_bridge import app as shared

    if shared.DEBUG:
        raise error
    if shared.caused_by_interrupt(error):
        sys.stderr.write("interrupted: committed work is kept; the same command resumes\n")
        raise SystemExit(130)
    from bridgecore.remote import describe
    from bridgecore.storage import is_connection_error

    log = Path(ERROR_LOG)
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
        where = f"the traceback is in {log} (or rerun with --debug)"
    except OSError:
        where = "rerun with --debug for the traceback"
    if is_connection_error(error):
        message = (f"storage or a remote host stayed unreachable past the retry budget ({describe('', error).lstrip(': ')}); "
                   "nothing committed is lost: the same command resumes")
    else:
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    sys.stderr.write(f"error: {message}\n{where}\n")
    raise SystemExit(1)


if __name__ == "__main__":
    main()
