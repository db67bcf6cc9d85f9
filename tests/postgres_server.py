"""A throwaway PostgreSQL server on loopback for tests (Debian's `postgresql` package; trust auth, own port).

PostgreSQL refuses to run as root: when the tests run as root, the cluster belongs to the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from prefect_server import free_port


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} not found: install Debian's postgresql package")
    return found[-1]


class PostgresServer:
    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_postgres, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            for path in (self.folder, *self.folder.parents):
                os.chmod(path, os.stat(path).st_mode | 0o005) if path != Path("/") else None
                if path == Path("/tmp") or path == Path("/"):
                    break
            shutil.chown(self.folder, user.pw_uid, user.pw_gid)
        data = self.folder / "data"
        self._run(_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(_binary("pg_ctl"), "-D", str(data), "-l", str(self.folder / "server.log"), "-w", "-t", "60",
                  "-o", f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.folder} "
                        "-c max_connections=200 -c fsync=off", "start")
        deadline = time.monotonic() + 30
        while subprocess.run([_binary("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL did not start; see {self.folder / 'server.log'}")
            time.sleep(0.2)
        self._run(_binary("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "prefect")

    def stop(self) -> None:
        try:
            self._run(_binary("pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
