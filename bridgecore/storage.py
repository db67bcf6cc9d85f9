"""The one door to storage: fsspec URLs (a local directory by default, `s3://bucket/prefix` for objects).

S3 endpoint and credentials come from the standard `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` and
`AWS_SECRET_ACCESS_KEY` (botocore reads them). Objects are written whole; a shard's completion
marker is written last with an exclusive create (S3 `If-None-Match: *`, local `O_EXCL`), so a
shard without a marker does not exist for readers, and two writers cannot both commit it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from typing import Any, Callable, TypeVar

import fsspec

logger = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_ERRORS = (ConnectionError, TimeoutError)


class MarkerExistsError(FileExistsError):
    """Another writer committed the shard first."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_transient_error(error: Exception) -> bool:
    if isinstance(error, TRANSIENT_ERRORS):
        return True
    text = f"{type(error).__name__} {error}"
    return any(word in text for word in ("Connect", "Timeout", "EndpointConnectionError", "ServiceUnavailable",
                                         "SlowDown", "503", "Connection reset"))


def retry_transient(fn: Callable[[], T], attempts: int = 6, base_delay: float = 0.5) -> T:
    """Retries `fn` on connection-level errors (object store away for a moment); re-raises anything else."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - classified just below
            if attempt == attempts - 1 or not is_transient_error(error):
                raise
            delay = base_delay * 2**attempt
            logger.warning("storage error (%s), retrying in %.1fs", error, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Storage:
    """A root URL and the few operations the pipeline needs, all retried on transient errors."""

    def __init__(self, root: str, **storage_options: Any):
        self.root = str(root).rstrip("/")
        self.fs, self.root_path = fsspec.core.url_to_fs(self.root, **storage_options)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def url(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root_path, *parts)

    def ensure_root(self) -> None:
        """Creates the local directory or the S3 bucket if needed."""
        def make():
            if self.is_local:
                os.makedirs(self.root_path, exist_ok=True)
            elif not self.fs.exists(self.root_path.split("/")[0]):
                self.fs.mkdir(self.root_path.split("/")[0])
        retry_transient(make)

    def exists(self, *parts: str) -> bool:
        return retry_transient(lambda: self.fs.exists(self.path(*parts)))

    def read_bytes(self, *parts: str) -> bytes:
        return retry_transient(lambda: self.fs.cat_file(self.path(*parts)))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Writes an object whole. Locally via a temporary file and an atomic rename."""
        path = self.path(*parts)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temporary = f"{path}.tmp-{os.getpid()}"
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
            return
        retry_transient(lambda: self.fs.pipe_file(path, data))

    def write_json(self, value: Any, *parts: str, indent: int | None = 1) -> None:
        """`indent=None` for bulk files: Python's C encoder only runs without indentation (several times faster)."""
        self.write_bytes(json.dumps(value, indent=indent, sort_keys=True).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def create_marker(self, value: dict, *parts: str) -> None:
        """Writes a small JSON marker only if none exists (exclusive create); raises `MarkerExistsError`."""
        path = self.path(*parts)
        data = json.dumps(value, sort_keys=True).encode()
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError as error:
                raise MarkerExistsError(path) from error
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            return

        def put():
            try:
                with self.fs.open(path, "xb") as handle:
                    handle.write(data)
            except (OSError, ValueError) as error:
                if "pre-condition" in str(error).lower() or "precondition" in str(error).lower() or isinstance(
                        error, FileExistsError):
                    raise MarkerExistsError(path) from error
                raise
        retry_transient(put)

    def list(self, *parts: str, suffix: str = "") -> list[str]:
        """Names (not paths) directly under a prefix, filtered by suffix; empty if the prefix is absent."""
        prefix = self.path(*parts)

        def ls():
            try:
                return self.fs.ls(prefix, detail=False, refresh=True) if not self.is_local else self.fs.ls(prefix, detail=False)
            except FileNotFoundError:
                return []
        return sorted(posixpath.basename(p) for p in retry_transient(ls) if p.endswith(suffix))

    def mtime_and_size(self, *parts: str) -> tuple[Any, int]:
        info = retry_transient(lambda: self.fs.info(self.path(*parts)))
        return info.get("mtime") or info.get("LastModified") or info.get("last_modified"), info["size"]

    def remove(self, *parts: str) -> None:
        """Deletes one object if it exists."""
        path = self.path(*parts)

        def rm():
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
        retry_transient(rm)


def _stamp(info: dict[str, Any]) -> str:
    """Size plus modification stamp (ETag on object stores) of one listing entry."""
    moment = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{moment}"


class FileStamps:
    """"size:stamp" of files, with one listing per folder (not one request per file), cached: a changed file
    gets a new stamp, a missing one None. URLs that cannot be listed (http) are stamped by their URI."""

    def __init__(self):
        self._folders: dict[str, dict[str, str]] = {}

    def _list(self, folder: str) -> dict[str, str]:
        if "://" not in folder:  # local: os.scandir is several times cheaper than fsspec's ls
            try:
                with os.scandir(folder or ".") as entries:
                    return {e.name: f"{s.st_size}:{s.st_mtime_ns}" for e in entries if e.is_file()
                            for s in (e.stat(),)}
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                return {}
        try:
            fs, path = fsspec.core.url_to_fs(folder)
            return {posixpath.basename(entry["name"].rstrip("/")): _stamp(entry)
                    for entry in retry_transient(lambda: fs.ls(path, detail=True))}
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return {}

    def stamp(self, uri: str) -> str | None:
        if uri.startswith(("http://", "https://")):
            return uri
        folder = posixpath.dirname(uri)
        if folder not in self._folders:
            try:
                self._folders[folder] = self._list(folder)
            except Exception as error:  # noqa: BLE001 - an unlistable folder leaves its files to the stages
                logger.warning("cannot list %s (%s); its files are identified by name only", folder, error)
                self._folders[folder] = {}
                return uri
        return self._folders[folder].get(posixpath.basename(uri))


def find_files(source: str, extensions: tuple[str, ...]) -> list[str] | None:
    """URIs of the files under a folder (recursively) or matching a glob, with one of `extensions`; None when
    `source` is neither an existing folder nor a glob."""
    fs, path = fsspec.core.url_to_fs(source)
    is_glob = any(c in path for c in "*?[")
    if not is_glob and not retry_transient(lambda: fs.isdir(path)):
        return None
    pattern = path if is_glob else posixpath.join(path, "**")
    scheme = source.split("://", 1)[0] + "://" if "://" in source else ""
    return sorted(scheme + p for p in retry_transient(lambda: fs.glob(pattern)) if p.lower().endswith(extensions))


class InputTooLargeError(ValueError):
    """An input file is larger than the configured read limit."""


def read_uri(uri: str, max_bytes: int | None = None) -> bytes:
    """Reads a whole local file or fsspec URL, retried on transient errors, refusing more than `max_bytes`
    (read in chunks: a device file or a huge object is never loaded whole)."""
    def read() -> bytes:
        with fsspec.open(uri, "rb") as handle:
            if max_bytes is None:
                return handle.read()
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise InputTooLargeError(f"{uri}: larger than the input limit of {max_bytes} bytes")
        return data
    return retry_transient(read)
