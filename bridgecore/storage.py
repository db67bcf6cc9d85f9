"""The one door to storage: fsspec URLs (a local directory by default, `s3://bucket/prefix` for objects).

S3 endpoint and credentials come from the standard `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` and
`AWS_SECRET_ACCESS_KEY` (botocore reads them). Objects are written whole; a shard's completion
marker is written last with an exclusive create (S3 `If-None-Match: *`, local `O_EXCL`), so a
shard without a marker does not exist for readers, and two writers cannot both commit it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import secrets
import stat
import time
from typing import Any, Callable, TypeVar

import fsspec

from bridgecore import remote
from bridgecore.options import option

logger = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_ERRORS = (ConnectionError, TimeoutError)


class MarkerExistsError(FileExistsError):
    """Another writer committed the shard first."""


class UnsafeOutputError(PermissionError):
    """A symbolic link stands where the job writes inside its output: refused, never followed."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_connection_error(error: BaseException) -> bool:
    """A connection-level failure (storage or a remote host away, a stream cut short), whether or not its retry
    budget is spent: what fails a whole shard (never its samples) and what the CLI names as unreachable."""
    if isinstance(error, (*TRANSIENT_ERRORS, remote.IncompleteReadError)):
        return True
    name = type(error).__name__  # by type name (botocore's, aiohttp's); never by a message that may hold a URL
    if any(word in name for word in ("Connect", "Timeout", "PayloadError", "ServerDisconnected")):
        return True
    text = str(error)[:300]  # an object store's own throttling and outage codes
    return any(word in text for word in ("ServiceUnavailable", "SlowDown", "(503)", "Connection reset"))


def is_transient_error(error: BaseException) -> bool:
    """A connection-level error worth retrying; not one whose retry budget `retry_transient` already spent (the
    orchestrator's task retries must not multiply the budget)."""
    return is_connection_error(error) and not getattr(error, "retry_budget_spent", False)


# How long a running job waits out an object store that went away (outages of minutes are survived);
# the first contact of a job uses `FIRST_CONTACT_SECONDS` instead, so a wrong endpoint fails fast.
RETRY_SECONDS = float(os.environ.get("VISION_BRIDGE_STORAGE_RETRY_SECONDS", "300"))
FIRST_CONTACT_SECONDS = 10.0

# botocore's own defaults (60 s connect timeout, several attempts) would hide an unreachable endpoint for
# minutes inside each of our retries; ours decide, per attempt a connection fails within seconds.
fsspec.config.conf.setdefault("s3", {}).setdefault(
    "config_kwargs", {"connect_timeout": 5, "read_timeout": 120, "retries": {"max_attempts": 2, "mode": "standard"}})


remote.install()  # every fsspec HTTP request: time limits and the address policy (see remote.py)


class StorageUnreachableError(ConnectionError):
    """Storage could not be reached within the retry budget."""


def retry_transient(fn: Callable[[], T], budget_s: float | None = None, base_delay: float = 0.5,
                    quiet: bool = False) -> T:
    """Retries `fn` on connection-level errors for up to `budget_s` seconds (default RETRY_SECONDS), with
    exponential backoff capped at 30 s; re-raises anything else at once."""
    budget = RETRY_SECONDS if budget_s is None else budget_s
    start, attempt = time.monotonic(), 0
    while True:
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - classified just below
            delay = min(base_delay * 2**attempt, 30.0)
            if not is_transient_error(error):
                raise
            if time.monotonic() - start + delay > budget:
                error.retry_budget_spent = True  # the orchestrator's own retries must not multiply the budget
                raise
            attempt += 1
            logger.log(logging.DEBUG if quiet else logging.WARNING, "storage error (%s), retrying in %.1fs", error, delay)
            time.sleep(delay)


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

    def ensure_root(self, create_bucket: bool = False) -> None:
        """Creates the local directory; checks the bucket exists (creates it only with `create_bucket`: a typo must
        not silently become a new bucket). The first contact of a job: an unreachable endpoint or missing
        credentials fail within seconds, with what to set."""
        def make():
            if self.is_local:
                os.makedirs(self.root_path, exist_ok=True)
                return
            bucket = self.root_path.split("/")[0]
            try:  # not fs.exists: s3fs answers False to a connection failure as to a missing bucket
                self.fs.ls(bucket, refresh=True)
            except FileNotFoundError:
                if not create_bucket:
                    raise FileNotFoundError(f"bucket {bucket!r} of {self.root} does not exist: check the name, or "
                                            f"pass {option('create_bucket')} to create it")
                self.fs.mkdir(bucket)
        try:
            retry_transient(make, budget_s=FIRST_CONTACT_SECONDS, quiet=True)  # one clear error says it all
        except Exception as error:  # noqa: BLE001 - connection and credential failures are rephrased
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
            if "NoCredentials" in type(error).__name__ or "Unable to locate credentials" in str(error):
                raise PermissionError(f"no credentials for {self.root}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                      f"(and AWS_ENDPOINT_URL for a store other than AWS; now {endpoint})") from None
            if not is_connection_error(error):
                raise
            raise StorageUnreachableError(f"cannot reach the storage of {self.root} at {endpoint} "
                                          f"({type(error).__name__}: {error}); check AWS_ENDPOINT_URL") from None

    def check_writable(self, create_bucket: bool = False) -> None:
        """Creates the root if needed and writes then deletes a probe object: a read-only folder, a file in the
        way, a full disk or an unreachable endpoint fails here, in seconds, with one clear message."""
        if self.is_local and os.path.exists(self.root_path) and not os.path.isdir(self.root_path):
            raise NotADirectoryError(f"output {self.root} is a file, not a folder")
        try:
            self.ensure_root(create_bucket)
            probe = f".write-check-{os.getpid()}"
            self.write_bytes(b"ok", probe)
            self.remove(probe)
        except PermissionError as error:
            raise PermissionError(f"output {self.root} is not writable ({error.strerror or error})") from None
        except OSError as error:
            if isinstance(error, StorageUnreachableError):
                raise
            raise OSError(f"cannot write to output {self.root}: {error.strerror or error}") from None

    def exists(self, *parts: str) -> bool:
        return retry_transient(lambda: self.fs.exists(self.path(*parts)))

    def read_bytes(self, *parts: str) -> bytes:
        return retry_transient(lambda: self.fs.cat_file(self.path(*parts)))

    def read_many(self, names: list[tuple[str, ...]]) -> dict[tuple[str, ...], bytes | None]:
        """Many small objects at once (concurrently on object stores); None for a missing one."""
        if not names:
            return {}
        paths = {self.path(*parts): parts for parts in names}
        if self.is_local:
            found = {}
            for path, parts in paths.items():
                try:
                    with open(path, "rb") as handle:
                        found[parts] = handle.read()
                except FileNotFoundError:
                    found[parts] = None
            return found
        data = retry_transient(lambda: self.fs.cat(list(paths), on_error="return"))
        return {paths[path]: (None if isinstance(value, Exception) else value) for path, value in data.items()}

    def _open_folder(self, parts: tuple[str, ...]) -> int:
        """A descriptor of the folder holding `parts[-1]`, reached from the root one real folder at a time.

        Never follows a link inside the output: a symbolic link found where the job writes (a data folder
        replaced by a link to elsewhere, even a link a user made on purpose) is refused with a message naming
        it, and nothing is written through it. So every write lands under the root, whatever others planted in
        a shared output. The root itself may be a link (an output on another disk)."""
        names = [name for part in parts[:-1] for name in part.split("/") if name]
        if any(name in (".", "..") for name in names) or not parts or "/" in parts[-1] or parts[-1] in ("", ".", ".."):
            raise ValueError(f"refusing to write {'/'.join(parts)!r}: not a plain path under {self.root}")
        os.makedirs(self.root_path, exist_ok=True)
        folder = os.open(self.root_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for depth, name in enumerate(names):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, dir_fd=folder)
                try:
                    inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
                except OSError as error:
                    where = self.url(*names[:depth + 1])
                    if error.errno == errno.ELOOP or stat.S_ISLNK(os.lstat(name, dir_fd=folder).st_mode):
                        raise UnsafeOutputError(
                            f"{where} is a symbolic link (to {os.readlink(name, dir_fd=folder)}) inside the output: the "
                            "job never writes through links; remove it (or point the output at the real folder)") from None
                    if error.errno == errno.ENOTDIR:
                        raise NotADirectoryError(f"{where}: expected a folder, found a file in the way") from None
                    raise
                os.close(folder)
                folder = inner
            return folder
        except BaseException:
            os.close(folder)
            raise

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Writes an object whole. Locally: into an exclusively created temporary file with an unpredictable
        name (a link planted there is never followed), then an atomic rename, in a folder reached without
        following links (see `_open_folder`)."""
        if self.is_local:
            name = parts[-1]
            folder = self._open_folder(parts)
            try:
                temporary = f"{name}.tmp-{secrets.token_hex(8)}"
                descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=folder)
                try:
                    with os.fdopen(descriptor, "wb") as handle:
                        handle.write(data)
                    os.replace(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)  # replaces a link, never follows it
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temporary, dir_fd=folder)
                    raise
            finally:
                os.close(folder)
            return
        path = self.path(*parts)
        retry_transient(lambda: self.fs.pipe_file(path, data))

    def write_json(self, value: Any, *parts: str, indent: int | None = 1) -> None:
        """`indent=None` for bulk files: Python's C encoder only runs without indentation (several times faster)."""
        self.write_bytes(json.dumps(value, indent=indent, sort_keys=True).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    @contextlib.contextmanager
    def folder_lock(self, *parts: str):
        """Holds an exclusive lock on the folder of `parts[-1]` while the block runs (local storage: `flock` on the
        folder itself, so no lock file is left behind; it serialises processes of every host that shares a POSIX
        file system with working locks). Object storage has no locks: the block runs unguarded there."""
        if not self.is_local:
            yield
            return
        import fcntl

        folder = self._open_folder(parts)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # closing the descriptor releases the lock

    def create_marker(self, value: dict, *parts: str) -> None:
        """Writes a small JSON marker only if none exists (exclusive create); raises `MarkerExistsError`."""
        path = self.path(*parts)
        data = json.dumps(value, sort_keys=True).encode()
        if self.is_local:  # written aside, then linked into place: exclusive, and never seen empty or half-written
            folder = self._open_folder(parts)
            aside = f".{parts[-1]}.tmp-{os.getpid()}-{secrets.token_hex(4)}"  # swept by remove_stale_temporaries
            try:
                descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=folder)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(data)
                try:  # a link planted at the marker's name counts as taken: never followed
                    os.link(aside, parts[-1], src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
                except FileExistsError as error:
                    raise MarkerExistsError(path) from error
                except OSError as error:  # no hard links (some FUSE and SMB mounts): an exclusive create instead
                    if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                        raise
                    self._create_exclusive(folder, parts[-1], data, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(aside, dir_fd=folder)
                os.close(folder)
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

    @staticmethod
    def _create_exclusive(folder: int, name: str, data: bytes, path: str) -> None:
        """`O_EXCL` create then write: a reader may see the file empty for an instant (read as stale by a lease
        taker): the fallback where a file system has no hard links."""
        try:
            descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=folder)
        except FileExistsError as error:
            raise MarkerExistsError(path) from error
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)

    def sizes(self, *parts: str) -> dict[str, int]:
        """{name: size} of the objects directly under a prefix (one listing); empty if it is absent."""
        prefix = self.path(*parts)

        def ls():
            try:
                return self.fs.ls(prefix, detail=True, **({} if self.is_local else {"refresh": True}))
            except FileNotFoundError:
                return []
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in retry_transient(ls)
                if e.get("type") != "directory"}

    def remove_stale_temporaries(self, older_than_s: float = 3600) -> int:
        """Deletes `*.tmp-<pid>` files a killed writer left behind (local storage; object writes are atomic)."""
        if not self.is_local or not os.path.isdir(self.root_path):
            return 0
        removed, cutoff = 0, time.time() - older_than_s
        for folder, _, files in os.walk(self.root_path):
            for name in files:
                path = os.path.join(folder, name)
                if ".tmp-" in name and os.path.getmtime(path) < cutoff:
                    os.remove(path)
                    removed += 1
        if removed:
            logger.warning("removed %d temporary files left by interrupted writers under %s", removed, self.root)
        return removed

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
    gets a new stamp, a missing one None. URLs that cannot be listed (http) are stamped by their URI.

    With `content_hash`, local files are stamped by the SHA-256 of their bytes instead (every file read once):
    a file replaced by other bytes of the same size and modification time is then a new input. Object-store
    files keep their ETag (a content hash already, for single-part uploads)."""

    def __init__(self, content_hash: bool = False):
        self._folders: dict[str, dict[str, str]] = {}
        self._hashes: dict[str, str | None] = {}
        self.content_hash = content_hash

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
        if self.content_hash and "://" not in uri:
            if uri not in self._hashes:  # a picture named by many rows is read once
                self._hashes[uri] = _file_sha256(uri)
            return self._hashes[uri]
        folder = posixpath.dirname(uri)
        if folder not in self._folders:
            try:
                self._folders[folder] = self._list(folder)
            except Exception as error:  # noqa: BLE001 - an unlistable folder leaves its files to the stages
                logger.warning("cannot list %s (%s); its files are identified by name only", folder, error)
                self._folders[folder] = {}
                return uri
        return self._folders[folder].get(posixpath.basename(uri))


def _file_sha256(path: str) -> str | None:
    """"sha256:<hex>" of a regular local file's bytes (read in 1 MiB blocks), None if it is missing or not a file."""
    digest = hashlib.sha256()
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        os.set_blocking(descriptor, True)
        while block := os.read(descriptor, 1 << 20):
            digest.update(block)
    finally:
        os.close(descriptor)
    return "sha256:" + digest.hexdigest()


def is_remote(uri: str | os.PathLike) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def mirror_down(uri: str, local: str, exclude: tuple[str, ...] = ()) -> str:
    """Copies a remote folder (a training run, a benchmark) into `local`, but for the top-level names in
    `exclude`, and returns it; a local folder is returned as is. A missing remote folder gives an empty one."""
    if not is_remote(uri):
        return uri
    fs, path = fsspec.core.url_to_fs(uri)
    os.makedirs(local, exist_ok=True)
    root = path.rstrip("/") + "/"
    for remote_file in retry_transient(lambda: fs.find(root)):
        relative = remote_file[len(root):]
        if relative.split("/", 1)[0] in exclude:
            continue
        target = os.path.join(local, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        retry_transient(lambda: fs.get_file(remote_file, target))
    return local


def mirror_up(local: str, uri: str, exclude: tuple[str, ...] = ()) -> None:
    """Uploads a local folder's files (but for the top-level names in `exclude`) to a remote folder."""
    if not is_remote(uri):
        return
    storage = Storage(uri)
    for folder, _, files in os.walk(local):
        if os.path.relpath(folder, local).split(os.sep)[0] in exclude:
            continue
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                storage.write_bytes(handle.read(), *os.path.relpath(path, local).split(os.sep))


def uri_exists(uri: str) -> bool:
    """Whether a local path or URL exists; an unreachable server is an error naming it, not a missing file."""
    fs, path = fsspec.core.url_to_fs(uri)
    if uri.startswith(("http://", "https://")):
        try:
            retry_transient(lambda: fs.info(path), budget_s=FIRST_CONTACT_SECONDS, quiet=True)
            return True
        except FileNotFoundError as error:  # fsspec turns every HTTP failure into this; the cause says which
            cause = error.__cause__
            if cause is not None and ("Connect" in type(cause).__name__ or isinstance(cause, (OSError, TimeoutError))):
                raise StorageUnreachableError(f"cannot reach {uri}: {cause.__class__.__name__} "
                                              f"({str(cause).split(', ', 1)[-1][:120]})") from None
            return False
    return retry_transient(lambda: fs.exists(path), budget_s=FIRST_CONTACT_SECONDS)


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


class NotARegularFileError(ValueError):
    """A local input is a FIFO, a device, a socket or a folder (reading it could hang or never end)."""


GZIP_MAGIC = b"\x1f\x8b"
READ_CHUNK = 1 << 20


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@contextlib.contextmanager
def _opened(uri: str, what: str):
    """A binary handle on a regular local file (a FIFO, device or folder refused before any read; opened non-blocking:
    a FIFO without a writer never hangs us) or on a URL (HTTP: one streamed GET of the bytes as stored)."""
    if "://" not in uri or uri.startswith("file://"):
        path = os.path.expanduser(uri.removeprefix("file://"))
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            mode = os.fstat(descriptor).st_mode
            if not stat.S_ISREG(mode):
                kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                        else "a folder" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
                raise NotARegularFileError(f"{what} {path} is {kind}, not a regular file")
            os.set_blocking(descriptor, True)
            with os.fdopen(descriptor, "rb", closefd=False) as handle:
                yield handle
        finally:
            os.close(descriptor)
        return
    if _is_http(uri):  # the bytes as stored, no decompression behind our back, streamed by one GET (block_size 0;
        # a size given skips fsspec's HEAD, which reports any failure as FileNotFoundError)
        fs, path = fsspec.core.url_to_fs(uri, client_kwargs={"auto_decompress": False},
                                         headers={"Accept-Encoding": "identity"})
        with fs.open(path, "rb", block_size=0, size=-1, timeout=remote.client_timeout()) as handle:  # limits as now set
            yield handle
        return
    with fsspec.open(uri, "rb", compression=None) as handle:
        yield handle


def _stated_size(handle) -> int | None:
    """The length the source stated: an HTTP response's Content-Length, or a file object's known size."""
    response = getattr(handle, "r", None)  # fsspec's streamed HTTP file keeps its aiohttp response here
    if response is not None and hasattr(response, "headers"):
        length = response.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else None
    size = getattr(handle, "size", None)
    return size if isinstance(size, int) else None


def _chunks(handle, uri: str, what: str, limit: int | None, deadline: float | None):
    """The handle's bytes to the end of the stream, in chunks, stopping once more than `limit` came; a stream that
    ends short of the length its source stated raises IncompleteReadError (never a silently shorter input)."""
    total = 0
    while True:
        chunk = handle.read(READ_CHUNK if limit is None else max(1, min(READ_CHUNK, limit + 1 - total)))
        if not chunk:
            break
        total += len(chunk)
        yield chunk
        if limit is not None and total > limit:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise remote.IncompleteReadError(f"{uri}: {what} still arriving after {remote.timeouts()['total']:g} s "
                                             f"({total} bytes so far; total time limit)")
    stated = _stated_size(handle)
    if stated is not None and total < stated:
        raise remote.IncompleteReadError(f"{uri}: {what} ended after {total} of the {stated} bytes its source stated")


def _read_stream(uri: str, what: str, limit: int | None) -> bytes:
    deadline = time.monotonic() + remote.timeouts()["total"] if _is_http(uri) else None
    with _opened(uri, what) as handle:
        return b"".join(_chunks(handle, uri, what, limit, deadline))


def _read_gzip_stream(uri: str, what: str, limit: int, limit_hint: str) -> bytes:
    """A .gz source inflated as it streams (every gzip member), refused as soon as it inflates past `limit`: memory
    stays within the limit whatever the compression ratio."""
    import zlib

    deadline = time.monotonic() + remote.timeouts()["total"] if _is_http(uri) else None
    parts, inflated, decompressor, started = [], 0, zlib.decompressobj(31), False
    with _opened(uri, what) as handle:
        for chunk in _chunks(handle, uri, what, None, deadline):
            started = True
            while chunk:
                try:
                    out = decompressor.decompress(chunk, limit + 1 - inflated)
                except zlib.error as error:
                    raise ValueError(f"{what} {uri} is named .gz but is not gzip data ({error})") from None
                parts.append(out)
                inflated += len(out)
                if inflated > limit:
                    raise InputTooLargeError(f"{what} {uri} inflates to more than the limit of {limit} bytes{limit_hint}")
                if decompressor.unconsumed_tail:  # output capped: feed the rest
                    chunk = decompressor.unconsumed_tail
                elif decompressor.eof and decompressor.unused_data:  # the next gzip member
                    chunk, decompressor = decompressor.unused_data, zlib.decompressobj(31)
                else:
                    chunk = b""
    if not started or not decompressor.eof:
        raise ValueError(f"{what} {uri} is named .gz but is not complete gzip data (it ends inside a member)")
    return b"".join(parts)


def read_limited(uri: str, max_bytes: int, what: str = "input", setting: str = "", budget_s: float | None = None) -> bytes:
    """Reads a regular local file or a URL whole, safely: a FIFO, device or folder is refused without a read
    (never blocks), the stream is read to its end (a server streaming without a Content-Length answers a read in
    pieces) and checked against the length its source stated, at most `max_bytes` are kept, and nothing is
    decompressed behind our back: an HTTP server is asked for the bytes as stored (`Accept-Encoding: identity`) and
    a compressed answer is refused; only a name ending in `.gz` is inflated, as it streams, every gzip member of it,
    capped at `max_bytes` inflated. Transient errors are retried for `budget_s` (default `RETRY_SECONDS`). `setting`
    names the variable that raises the limit."""
    limit_hint = f" (raise {setting})" if setting else ""
    if uri.lower().split("?", 1)[0].endswith(".gz"):
        return retry_transient(lambda: _read_gzip_stream(uri, what, max_bytes, limit_hint), budget_s)
    data = retry_transient(lambda: _read_stream(uri, what, max_bytes), budget_s)
    if len(data) > max_bytes:
        raise InputTooLargeError(f"{what} {uri} is larger than the limit of {max_bytes} bytes{limit_hint}")
    if data.startswith(GZIP_MAGIC):
        raise ValueError(f"{what} {uri} is gzip-compressed (or served with Content-Encoding: gzip) but its name does "
                         "not end in .gz: name it .jsonl.gz or .csv.gz to have it inflated (with a size limit)")
    return data


def read_uri(uri: str, max_bytes: int | None = None, budget_s: float | None = None) -> bytes:
    """Reads a whole local file or fsspec URL to the end of its stream (checked against the length its source
    stated), retried on transient errors for `budget_s`, refusing more than `max_bytes` (read in chunks: a device
    file or a huge object is never loaded whole)."""
    def read() -> bytes:
        data = _read_stream(uri, "input", max_bytes)
        if max_bytes is not None and len(data) > max_bytes:
            raise InputTooLargeError(f"{uri}: larger than the input limit of {max_bytes} bytes")
        return data
    return retry_transient(read, budget_s)
