"""Inputs -> samples -> shards, and the plan on storage that keeps each sample in its shard.

Inputs are a manifest (CSV, JSONL or Parquet; columns `image` or `images` (a list, for Edit-Plus),
`instruction`, optional `target`, `id` and `reference_images` (a list of pictures only Qwen3-VL reads, for a
bridge trained on them), any extra columns) or a folder/glob of images with one
instruction for all. Relative references resolve against the manifest's real folder (symlinks
resolved) and must stay inside it; absolute paths and URLs are taken as given. A bad row becomes a
failed sample with its row number, never a refused job.

A sample is assigned to a shard once: the plan (`plan/shards/<shard>.json`, and one index Parquet per
planning run under `plan/index/`) outlives settings, so every setting reuses the same shards and their
caches. New samples go into new shards (sorted by id, `shard_size` each); a shard's id hashes its
members, so the same pending set always gives the same shards.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import itertools
import io
import json
import logging
import os
import posixpath
from collections import Counter
from typing import Any, Iterable, Iterator

from bridgecore.options import option
from bridgecore.storage import FileStamps, Storage, find_files, read_limited, uri_exists
from bridgecore.batch.records import Sample

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".parquet", ".csv.gz", ".jsonl.gz")
MANIFEST_LIMIT_SETTING = "VISION_BRIDGE_MAX_MANIFEST_BYTES"
EDIT_SHARD_SIZE = 16  # samples per shard of an edit job: the unit of caching, retries and scale-out
CACHE_SHARD_SIZE = 64  # samples per shard of caches built for training: a data stream reads whole shards


def manifest_limit() -> int:
    """Bytes a manifest may have (inflated, for .gz): 2 GiB unless VISION_BRIDGE_MAX_MANIFEST_BYTES says."""
    value = os.environ.get(MANIFEST_LIMIT_SETTING, str(2 * 2**30))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{MANIFEST_LIMIT_SETTING} must be a number of bytes; got {value!r}") from None
_KNOWN_COLUMNS = {"id", "image", "images", "instruction", "target", "reference_images"}
PLAN_SHARDS, PLAN_INDEX = "plan/shards", "plan/index"


class ManifestError(ValueError):
    """The input as a whole cannot be read (missing, unreadable, empty, duplicate ids)."""


# -- reading inputs ---------------------------------------------------------------------------------------


def _is_url(reference: str) -> bool:
    return "://" in reference


def _read_rows(source: str) -> Iterable[tuple[str, dict[str, Any] | str]]:
    """(row label, row dict) per manifest row; the dict is replaced by an error text for unparsable rows."""
    data = read_manifest(source)
    name = posixpath.basename(source)
    kind = source.lower().removesuffix(".gz")
    if kind.endswith(".jsonl"):
        for number, line in enumerate(_text(source, data).splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    yield f"{name} line {number}", row if isinstance(row, dict) else f"not a JSON object: {line[:80]!r}"
                except json.JSONDecodeError as error:
                    yield f"{name} line {number}", f"invalid JSON ({error.msg} at column {error.colno})"
    elif kind.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(_text(source, data)))
        for row in reader:
            if None in row:  # csv puts the fields past the header's under None: the row would be silently cut
                yield (f"{name} line {reader.line_num}", f"{len(row[None])} more field(s) than the header's "
                       f"{len(reader.fieldnames)} (an unquoted comma? quote the field)")
            else:
                yield f"{name} line {reader.line_num}", row
    else:
        for number, row in enumerate(_parquet(source, data).to_pylist(), start=1):
            yield f"{name} row {number}", row


def read_manifest(source: str, budget_s: float | None = None) -> bytes:
    """A manifest's bytes: a regular file or URL, within `manifest_limit()`; every refusal is one ManifestError line.
    Transient storage errors are retried for `budget_s` (default: a running job's whole budget)."""
    from bridgecore.remote import describe

    try:
        return read_limited(source, manifest_limit(), "manifest", MANIFEST_LIMIT_SETTING, budget_s)
    except FileNotFoundError as error:
        if _is_url(source) and error.__cause__ is not None:  # fsspec reports any HTTP failure as not found
            raise ManifestError(f"manifest {describe(source, error)}") from None
        raise ManifestError(f"manifest {source!r} does not exist") from None
    except (ValueError, PermissionError, IsADirectoryError) as error:
        raise ManifestError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - remote backends raise their own types (aiohttp, botocore)
        if not _is_url(source):
            raise
        raise ManifestError(f"manifest {describe(source, error)}") from None


def _text(source: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ManifestError(f"manifest {source} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _parquet(source: str, data: bytes):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(data))
    except (OSError, ValueError) as error:
        raise ManifestError(f"manifest {source} is not a readable Parquet file ({str(error).splitlines()[0][:120]})") from None


def manifest_columns(source: str, budget_s: float | None = None) -> set[str]:
    """The columns of a manifest: CSV header, Parquet schema, keys of the first 1000 JSONL rows."""
    from itertools import islice

    data = read_manifest(source, budget_s)
    kind = source.lower().removesuffix(".gz")
    if kind.endswith(".csv"):
        return set(csv.DictReader(io.StringIO(_text(source, data))).fieldnames or [])
    if kind.endswith(".jsonl"):
        columns: set[str] = set()
        for line in islice(io.StringIO(_text(source, data)), 1000):
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                columns.update(json.loads(line).keys())
        return columns
    return set(_parquet(source, data).schema.names)


def check_manifest_columns(source: str, prompt: str | None) -> None:
    """Refuses, before anything runs or is written, a manifest with no image column, or with no instruction
    column and no --prompt; the error names the columns it found."""
    from bridgecore.storage import FIRST_CONTACT_SECONDS

    source = str(source).rstrip("/")
    if not source.lower().endswith(MANIFEST_EXTENSIONS):
        return
    if not _is_url(source):
        source = os.path.abspath(os.path.expanduser(source))
    columns = manifest_columns(source, FIRST_CONTACT_SECONDS)  # a check before the job: fail fast
    missing = []
    if not columns & {"image", "images"}:
        missing.append("'image' (or 'images', a list)")
    if "instruction" not in columns and prompt is None:
        missing.append(f"'instruction' (or give {option('prompt')})")
    if missing:
        found = ", ".join(sorted(repr(c) for c in columns)) or "none"
        raise ManifestError(f"manifest {source} lacks the column {' and '.join(missing)}; columns found: {found}")


def _manifest_root(source: str) -> str:
    """The folder relative references resolve against: the manifest's real folder, whatever the cwd."""
    if _is_url(source):
        return posixpath.dirname(source)
    return os.path.dirname(os.path.realpath(source))


def _resolve(root: str, reference: str) -> tuple[str, str | None]:
    """(URI, error) of a manifest reference. Relative references must stay inside `root`, symlinks included."""
    if _is_url(reference) or reference.startswith("/"):
        return reference, None
    if _is_url(root):
        joined = posixpath.normpath(posixpath.join(root.split("://", 1)[1], reference))
        base = posixpath.normpath(root.split("://", 1)[1])
        uri = root.split("://", 1)[0] + "://" + joined
    else:
        joined = _real_local_path(os.path.join(root, reference))
        base, uri = root, joined
    if not (joined == base or joined.startswith(base.rstrip("/") + "/")):
        return reference, f"path {reference!r} points outside the input root {root}"
    return uri, None


@functools.lru_cache(maxsize=65536)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def _real_local_path(path: str) -> str:
    """`os.path.realpath`, with the folder's resolution shared by its files (one lstat per file, not one per
    path component: a million-row manifest resolves in seconds)."""
    folder, name = os.path.split(os.path.normpath(path))
    resolved = os.path.join(_real_folder(folder), name)
    return os.path.realpath(resolved) if os.path.islink(resolved) else resolved


def _reference_list(row: dict[str, Any]) -> list[str]:
    """The row's `reference_images`: a list, a JSON list or `a|b` text; empty when absent."""
    references = row.get("reference_images")
    if references is None or references == "" or references == []:
        return []
    if isinstance(references, str):
        references = json.loads(references) if references.strip().startswith("[") else references.split("|")
    if not isinstance(references, (list, tuple)) or not all(isinstance(r, str) and r for r in references):
        raise ValueError("row's 'reference_images' must be a list of image paths or URLs")
    return list(references)


def _image_list(row: dict[str, Any]) -> list[str]:
    images = row.get("images")
    if images is not None and images != "":
        if isinstance(images, str):
            images = json.loads(images) if images.strip().startswith("[") else images.split("|")
        if not images:
            raise ValueError("row's 'images' is an empty list")
        return [str(i) for i in images]
    if row.get("image") in (None, ""):
        raise ValueError("row has neither 'image' nor 'images'")
    return [str(row["image"])]


def input_hash(images: list[str], instruction: str, target: str | None, extra: dict[str, Any],
               stamps: FileStamps, references: list[str] | tuple[str, ...] = ()) -> str:
    """Identity of a sample's inputs: URIs with their size and modification stamp, instruction, target, extras,
    reference pictures (only when there are some: samples without them keep their identity)."""
    parts = [f"{uri}@{stamps.stamp(uri)}" for uri in images]
    parts += [instruction, f"{target}@{stamps.stamp(target)}" if target else "",
              json.dumps(extra, sort_keys=True, default=str) if extra else ""]
    if references:
        parts += ["references"] + [f"{uri}@{stamps.stamp(uri)}" for uri in references]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _manifest_samples(source: str, prompt: str | None, stamps: FileStamps) -> Iterator[Sample]:
    root = _manifest_root(source)
    for label, row in _read_rows(source):
        if isinstance(row, str):  # unparsable: failed, and distinct from every other row
            yield _sample(None, [], label, None, [f"{label}: {row}"], {}, stamps)
            continue
        errors, images, target = [], [], None
        instruction = row.get("instruction")
        if instruction in (None, "") and prompt is None:
            errors.append(f"{label}: no 'instruction' and no {option('prompt')} given")
        instruction = str(instruction if instruction not in (None, "") else (prompt or label))
        try:
            references = _image_list(row)
        except (ValueError, json.JSONDecodeError) as error:
            errors.append(f"{label}: {error}")
            references = []
        for reference in references:
            uri, error = _resolve(root, reference)
            images.append(uri)
            errors.extend([f"{label}: {error}"] if error else [])
        if row.get("target") not in (None, ""):
            target, error = _resolve(root, str(row["target"]))
            errors.extend([f"{label}: {error}"] if error else [])
        references = []
        try:
            for reference in _reference_list(row):
                uri, error = _resolve(root, reference)
                references.append(uri)
                errors.extend([f"{label}: {error}"] if error else [])
        except (ValueError, json.JSONDecodeError) as error:
            errors.append(f"{label}: {error}")
        extra = {k: v for k, v in row.items() if k not in _KNOWN_COLUMNS}
        yield _sample(row.get("id"), images, instruction, target, errors, extra, stamps, references)


def _folder_samples(source: str, prompt: str | None, stamps: FileStamps) -> Iterator[Sample]:
    _refuse_other_manifest_formats(source)
    if prompt is None:
        raise ManifestError(f"input {source!r} is a folder or glob of images: give the instruction with {option('prompt')} "
                            "(or use a manifest .csv/.jsonl/.parquet with an 'instruction' column)")
    files = find_files(source, IMAGE_EXTENSIONS)
    if files is None:
        raise ManifestError(f"input {source!r} does not exist (expected a manifest .csv/.jsonl/.parquet, "
                            "a folder of images or a glob)")
    for file in files:
        yield _sample(None, [file], prompt, None, [], {}, stamps)


_NO_EXTRA: dict[str, Any] = {}


def _sample(given_id: Any, images: list[str], instruction: str, target: str | None, errors: list[str],
            extra: dict[str, Any], stamps: FileStamps, references: list[str] | None = None) -> Sample:
    digest = input_hash(images, instruction, target, extra, stamps, references or ())
    sample_id = digest[:20] if given_id in (None, "") else str(given_id)
    return Sample(sample_id, tuple(images), instruction, digest, target, "; ".join(errors) or None, extra or _NO_EXTRA,
                  tuple(references or ()))


def _refuse_other_manifest_formats(source: str) -> None:
    if source.lower().endswith((".json", ".tsv", ".txt", ".yaml", ".yml")) and os.path.isfile(source):
        raise ManifestError(f"input {source!r}: a manifest is .csv, .jsonl or .parquet (optionally .csv.gz / "
                            ".jsonl.gz); JSON Lines is one JSON object per line, named .jsonl")


def check_input(source: str) -> None:
    """Fails at once, naming it, if the input does not exist (a cheap check before any job starts)."""
    source = str(source).rstrip("/")
    _refuse_other_manifest_formats(source)
    if any(c in source for c in "*?[") or uri_exists(source):
        return
    if source.lower().endswith(MANIFEST_EXTENSIONS):
        raise ManifestError(f"manifest {source!r} does not exist")
    raise ManifestError(f"input {source!r} does not exist (expected a manifest .csv/.jsonl/.parquet, a folder of "
                        "images or a glob)")


def read_inputs(source: str, prompt: str | None = None, content_hash: bool = False,
                limit: int | None = None) -> list[Sample]:
    """Samples from a manifest, or from a folder/glob of images with one `prompt` for all. With `content_hash`,
    local files are identified by a hash of their bytes, not by size and modification time. `limit` stops after
    the first N samples: only their images' folders are listed (a trial on a 10M-image manifest on object storage
    lists a few folders, not all of them), and duplicate ids are checked among those N only."""
    source = str(source).rstrip("/")
    if not _is_url(source):
        source = os.path.abspath(os.path.expanduser(source))
    stamps = FileStamps(content_hash)
    if source.lower().endswith(MANIFEST_EXTENSIONS):
        samples = list(itertools.islice(_manifest_samples(source, prompt, stamps), limit))
    else:
        samples = list(itertools.islice(_folder_samples(source, prompt, stamps), limit))
    if not samples:
        raise ManifestError(f"no samples found in {source!r}")
    duplicates = sorted(key for key, count in Counter(s.id for s in samples).items() if count > 1)
    if duplicates:
        raise ManifestError(f"duplicate sample ids in {source!r}: {duplicates[:5]}"
                            + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""))
    return samples


# -- shards and the plan ----------------------------------------------------------------------------------


def shard_id_for(samples: list[Sample], salt: str = "") -> str:
    digest = hashlib.sha256((salt + "\n".join(f"{s.id}\0{s.input_hash}" for s in samples)).encode())
    return "shard-" + digest.hexdigest()[:16]


def cut_shards(samples: list[Sample], shard_size: int, salt: str = "") -> dict[str, list[Sample]]:
    """Shards of `shard_size` samples, sorted by id; the same samples always give the same shards.

    Single-image and multi-image samples go to separate shards: a job that routes multi-image samples to an
    Edit-Plus model fingerprints those shards with it and leaves the single-image shards' outputs as they are.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}")
    shards: dict[str, list[Sample]] = {}
    for multi in (False, True):
        ordered = sorted((s for s in samples if s.multi_image == multi), key=lambda s: s.id)
        chunks = [ordered[i:i + shard_size] for i in range(0, len(ordered), shard_size)]
        shards.update({shard_id_for(chunk, salt): chunk for chunk in chunks})
    return shards


def load_plan(storage: Storage, shard_id: str) -> list[Sample]:
    from bridgecore.batch.shard_store import CorruptShardError

    try:
        value = storage.read_json(PLAN_SHARDS, shard_id + ".json")
        return [Sample.from_dict(s) for s in value["samples"]]
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptShardError(f"{storage.url(PLAN_SHARDS, shard_id + '.json')}: unreadable plan ({error})",
                                stage="plan", shard=shard_id) from error


def read_assignment(storage: Storage) -> dict[tuple[str, str], tuple[int, str]]:
    """{(id, input_hash): (generation, shard)} from every planning run so far; a retry shard (a higher
    generation) supersedes the shard its samples failed in. A damaged index file is named, removed and
    rebuilt from the shard plans it summarised (`plan/shards/*.json`, written before any index)."""
    import pyarrow.parquet as pq

    assignment: dict[tuple[str, str], tuple[int, str]] = {}
    damaged = []
    for name in storage.list(PLAN_INDEX, suffix=".parquet"):
        data = storage.read_bytes(PLAN_INDEX, name)  # storage errors propagate: unreachable is not damaged
        try:
            table = pq.read_table(io.BytesIO(data), columns=["id", "input_hash", "shard", "generation"])
        except (ValueError, KeyError, OSError) as error:  # pyarrow: ArrowInvalid (ValueError), OSError on bad bytes
            logger.warning("plan index %s is damaged (%s): rebuilding it from the shard plans",
                           storage.url(PLAN_INDEX, name), str(error).splitlines()[0][:120])
            damaged.append(name)
            continue
        values: dict[tuple[int, str], tuple[int, str]] = {}  # one value object per shard, not per row
        for sample_id, digest, shard, generation in zip(*(table.column(c).to_pylist() for c in
                                                          ("id", "input_hash", "shard", "generation"))):
            key = (sample_id, digest)
            if key not in assignment or generation > assignment[key][0]:
                assignment[key] = values.setdefault((generation, shard), (generation, shard))
    if damaged:
        _rebuild_index(storage, assignment, damaged)
    return assignment


def _rebuild_index(storage: Storage, assignment: dict, damaged: list[str]) -> None:
    """Assigns every sample of a shard plan that no intact index names to that shard (generation 0; where a
    sample is in several such plans, the first by shard id), writes one index for them, then removes the
    damaged files. The same shards come back, so every stage finds its committed work again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [(PLAN_SHARDS, name) for name in storage.list(PLAN_SHARDS, suffix=".json")]
    recovered: dict[tuple[str, str], str] = {}
    for (_, name), data in sorted(storage.read_many(names).items()):
        try:
            members = json.loads(data)["samples"]
        except (TypeError, ValueError, KeyError):
            continue  # a damaged shard plan: its samples are planned again (and the plan repaired)
        for member in members:
            key = (member["id"], member["input_hash"])
            if key not in assignment and key not in recovered:
                recovered[key] = name[: -len(".json")]
    if recovered:
        rows = sorted((key[0], key[1], shard) for key, shard in recovered.items())
        table = pa.table({"id": [r[0] for r in rows], "input_hash": [r[1] for r in rows], "shard": [r[2] for r in rows],
                          "generation": pa.array([0] * len(rows), pa.int32())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        rebuilt = hashlib.sha256("\n".join(f"{a}\0{b}\0{c}" for a, b, c in rows).encode()).hexdigest()[:16] + ".parquet"
        storage.write_bytes(buffer.getvalue(), PLAN_INDEX, rebuilt)
        assignment.update({key: (0, shard) for key, shard in recovered.items()})
    rebuilt = {rebuilt} if recovered else set()
    for name in damaged:
        if name not in rebuilt:  # the rebuilt index may have the damaged one's own name (same rows)
            storage.remove(PLAN_INDEX, name)


def write_plan(storage: Storage, shards: dict[str, list[Sample]], generation: int = 0) -> set[str]:
    """Writes each new shard's members, then one index file naming them (data first, index last). Returns the
    shards whose plan file it wrote (the others already had one, e.g. when a damaged index is rebuilt)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not shards:
        return set()
    existing = set(storage.list(PLAN_SHARDS, suffix=".json"))
    written = set()
    for shard_id, members in shards.items():
        if shard_id + ".json" not in existing:
            storage.write_json({"shard": shard_id, "samples": [s.to_dict() for s in members]}, PLAN_SHARDS,
                               shard_id + ".json", indent=None)
            written.add(shard_id)
    rows = [(s.id, s.input_hash, shard_id) for shard_id, members in sorted(shards.items()) for s in members]
    table = pa.table({"id": [r[0] for r in rows], "input_hash": [r[1] for r in rows], "shard": [r[2] for r in rows],
                      "generation": pa.array([generation] * len(rows), pa.int32())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    name = hashlib.sha256("\n".join(f"{a}\0{b}\0{c}" for a, b, c in rows).encode()).hexdigest()[:16]
    storage.write_bytes(buffer.getvalue(), PLAN_INDEX, f"{name}.parquet")
    return written
