"""A real Prefect server and process workers on loopback, for tests (see DESIGN.md, Prefect facts)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_env(home: Path, api_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VISION_BRIDGE_CODE_DIR"}  # never at deploy time
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_WORKER_PREFETCH_SECONDS="1", HF_HUB_OFFLINE="1",
               PREFECT_LOGGING_LEVEL="INFO")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    # the environment's own python first, as in an activated venv (prefect.yaml's build step runs `python -m ...`)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class PrefectServer:
    def __init__(self, home: Path, database_url: str | None = None):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.processes: list[subprocess.Popen] = []
        self.env = prefect_env(home, self.url)
        if database_url:  # e.g. PostgreSQL, as a cluster runs it (SQLite otherwise)
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url

    def _spawn(self, args, log_name, **env):
        log = open(self.home / log_name, "ab")
        from helpers import dies_with_this_process

        process = subprocess.Popen(dies_with_this_process(args), env={**self.env, **env}, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        self.processes.append(process)
        return process

    def start(self, timeout: float = 90) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        server_env = {k: v for k, v in self.env.items() if k != "PREFECT_API_URL"}
        log = open(self.home / "server.log", "ab")
        from helpers import dies_with_this_process

        self.processes.append(subprocess.Popen(dies_with_this_process([PREFECT, "server", "start", "--host",
                                                                       "127.0.0.1", "--port", str(self.port)]),
                                               env=server_env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"prefect server did not answer; see {self.home / 'server.log'}")

    def cli(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run([PREFECT, *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def start_worker(self, pool: str, name: str) -> subprocess.Popen:
        # --limit 1: one flow run at a time per worker, as one worker per GPU should
        return self._spawn([PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--name", name, "--limit", "1"],
                           f"worker-{name}.log", VISION_BRIDGE_WORKER=name,
                           VISION_BRIDGE_CODE_DIR=str(REPO))  # where this worker's code is, resolved per run

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        # flow-run processes started by workers live in the workers' sessions: killed above
