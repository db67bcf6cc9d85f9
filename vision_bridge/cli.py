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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app()


if __name__ == "__main__":
    main()
