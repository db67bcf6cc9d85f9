"""A project-local, temporary Prefect server for command-line runs (no server to set up).

Prefect's own temporary server, started explicitly so that its process is known and tied to ours:
- its pid is kept in `PREFECT_HOME/temporary-server-<run pid>.pid`; a server left behind by a killed earlier
  run is stopped first (a concurrent run's live server is left alone);
- on Linux it gets a parent-death signal, so a SIGKILL of the run takes the server with it at once;
- SIGTERM stops it like a normal exit does;
- it may take its time to start: a fresh database is migrated first, and on a busy 2-core machine that
  alone passes Prefect's default 20 s limit. The limit here is `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`
  (Prefect's own setting; 180 s unless set), with one retry, then one clear error.
`PREFECT_HOME` is project-local, never the user's ~/.prefect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)
SERVER_COMMAND_MARK = b"prefect.server.api.server:create_app"
STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_SECONDS = 180  # a fresh database under load 4-8 on 2 cores took 20-60 s; idle ~10 s


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not answer in time (twice)."""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_leftovers(home: Path) -> None:
    """Stops temporary servers whose run is gone (killed where a parent-death signal does not exist); a server
    of a run still alive (a concurrent run with the same PREFECT_HOME) is left alone. One pid file per run:
    `temporary-server-<run pid>.pid` holds its server's pid (`temporary-server.pid`: an older version's)."""
    for pid_file in home.glob("temporary-server*.pid"):
        owner = pid_file.stem.removeprefix("temporary-server").removeprefix("-")
        if owner.isdigit() and _alive(int(owner)):
            continue
        try:
            pid = int(pid_file.read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            command = b""
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
                        ("PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS", "2"),
                        (STARTUP_SETTING, str(DEFAULT_STARTUP_SECONDS))):
        os.environ.setdefault(name, value)


def startup_seconds() -> int:
    value = os.environ.get(STARTUP_SETTING, str(DEFAULT_STARTUP_SECONDS))
    try:
        seconds = int(value)
    except ValueError:
        raise ValueError(f"{STARTUP_SETTING} must be a whole number of seconds; got {value!r}") from None
    if seconds < 1:
        raise ValueError(f"{STARTUP_SETTING} must be at least 1; got {seconds}")
    return seconds


# Run in the server's own process before it becomes uvicorn: a parent-death signal (kept across exec), and an
# exit if the parent is already gone. No `preexec_fn`: that is unsafe in a process with threads.
_TIE_TO_PARENT = (
    "import ctypes, os, signal, sys\n"
    "parent = int(sys.argv[1])\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != parent: sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def _server_class():
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class TiedServer(SubprocessASGIServer):
        """Prefect's temporary server whose process dies with ours (parent-death signal, Linux)."""

        # Copied from prefect.server.api.server.SubprocessASGIServer._run_uvicorn_command (3.9), started through
        # the parent-death launcher
        def _run_uvicorn_command(self) -> subprocess.Popen:
            command = ["-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                       "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                       "--log-level", "error", "--lifespan", "on"]
            if sys.platform.startswith("linux"):
                command = ["-c", _TIE_TO_PARENT, str(os.getpid()), *command]
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            # its own session: a terminal's Ctrl-C (SIGINT to the whole foreground group) stops our run, which
            # takes the server down with it; a server stopped first left the run retrying a dead API for minutes
            return subprocess.Popen(args=[sys.executable, *command], start_new_session=True, env={
                **os.environ, **server_env, **get_current_settings().to_environment_variables(exclude_unset=True)})

    return TiedServer


def start_server(attempts: int = 2):
    """A started temporary server; retries once, then raises `ServerStartError` naming the setting."""
    seconds = startup_seconds()
    server_class = _server_class()
    for attempt in range(1, attempts + 1):
        server = server_class()
        try:
            server.start(timeout=seconds)
            return server
        except Exception as error:  # noqa: BLE001 - a timeout (RuntimeError), an unhealthy answer (httpx), no port
            server.stop()  # a server that did not answer may still be starting: never leave it behind
            logger.warning("the temporary Prefect server did not answer within %d s (attempt %d of %d): %s",
                           seconds, attempt, attempts, str(error).splitlines()[0][:200])
    raise ServerStartError(
        f"the temporary Prefect server did not answer within {seconds} s, {attempts} times (a busy machine?); "
        f"raise {STARTUP_SETTING} (now {seconds}) or point PREFECT_API_URL at a running Prefect server")


_active_url: list[str] = []  # the temporary server of this process, while one runs (nested calls reuse it)


def active_api_url() -> str | None:
    """The API URL of this process's temporary server (give it to a child process as PREFECT_API_URL), or None."""
    return _active_url[-1] if _active_url else os.environ.get("PREFECT_API_URL")


@contextlib.contextmanager
def local_prefect() -> Iterator[None]:
    """Runs the body against a temporary Prefect server (unless PREFECT_API_URL names one, or one of this
    process already runs: one process talks to one server, as Prefect's event worker stays with the first);
    see `prefect_environment` for the settings, which must be in place before Prefect is imported."""
    if "PREFECT_API_URL" in os.environ or _active_url:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = Path(os.environ["PREFECT_HOME"])
    _stop_leftovers(home)
    pid_file = home / f"temporary-server-{os.getpid()}.pid"
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # exit normally: the server stops too
    server = None
    try:
        server = start_server()
        pid_file.write_text(str(server.server_process.pid))
        _active_url.append(server.api_url)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        _active_url.clear()
        if server is not None:
            server.stop()
        pid_file.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)
