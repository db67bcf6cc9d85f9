"""A project-local, temporary Prefect server for command-line runs (no server to set up).

Prefect's own temporary server, started explicitly so that its process is known: its pid is kept in
`PREFECT_HOME/temporary-server.pid`, a server left behind by a killed earlier run is stopped first, and
SIGTERM stops it like a normal exit does. `PREFECT_HOME` is project-local, never the user's ~/.prefect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)
SERVER_COMMAND_MARK = b"prefect.server.api.server:create_app"


def _stop_leftover(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if SERVER_COMMAND_MARK in command:
        logger.warning("stopping the temporary Prefect server (pid %d) left by an interrupted run", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def prefect_environment(home: Path, quiet: bool = True) -> None:
    """Settings for a local run; call before Prefect is imported (it reads them once)."""
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home.resolve()))
    for name, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("PREFECT_SERVER_UI_ENABLED", "false"),
                        ("PREFECT_LOGGING_LEVEL", "CRITICAL" if quiet else "INFO"),
                        ("PREFECT_LOGGING_TO_API_ENABLED", "false"),  # nobody reads a temporary server's logs
                        ("PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS", "2")):
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def local_prefect() -> Iterator[None]:
    """Runs the body against a temporary Prefect server (unless PREFECT_API_URL names one); see
    `prefect_environment` for the settings, which must be in place before Prefect is imported."""
    if "PREFECT_API_URL" in os.environ:
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    pid_file = Path(os.environ["PREFECT_HOME"]) / "temporary-server.pid"
    _stop_leftover(pid_file)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # exit normally: the server stops too
    server = SubprocessASGIServer()
    try:
        server.start()
        pid_file.write_text(str(server.server_process.pid))
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        server.stop()
        pid_file.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)
