"""Training data as streams: examples read shard by shard, memory bounded by a shuffle buffer, not by the data.

An `ExampleSource` says which examples exist (`refs`: keys, batching sizes and image counts, from small
tables) and reads one shard's examples on demand (`read`). The batch floor provides one over the shards
`build-caches` / the training-data pipeline committed (local or `s3://`); `InMemorySource` wraps examples
already in memory (research code, tests).

The training examples are dealt to `streams` independent data streams (shard i to stream i mod streams). A
stream walks its shards in a seeded order per epoch through a shuffle buffer, and emits micro-batches of
equal-size examples. Every decision is taken on refs alone (`plan_stream`), so:

- the order is a pure function of (seed, stream, epoch): a run with one process and a run with N ranks,
  each rank reading only its own streams, see the same micro-batches at every step;
- resuming skips the batches already trained on without reading them (`skip`), from the global sample
  count recorded in the checkpoint, whatever world size wrote it;
- payloads are read only for the shards about to be needed (prefetched in a thread), and an example is
  dropped once emitted: resident examples <= buffer + one shard per stream.

The shuffled-Qwen3 training control pairs each example with another example's Qwen3 cache from the same
buffer (an equal number of condition images), so it works on streams too.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch

from bridgecore.training.examples import TrainingExample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExampleRef:
    """What the data order needs to know of an example before reading it."""

    shard: str
    key: str
    size: tuple  # examples of equal size batch together (the DiT takes one resolution per batch)
    images: int  # condition images (the shuffled-Qwen3 control pairs equal counts)


class ExampleSource(Protocol):
    def refs(self) -> list[ExampleRef]:
        """Every usable example, in a stable order."""

    def read(self, shard: str, keys: set[str]) -> dict[str, TrainingExample]:
        """Those examples of one shard, by key."""


def example_size(example: TrainingExample) -> tuple:
    return (tuple(example.latent_hw), tuple(example.condition_hw), tuple(example.target.shape))


class InMemorySource:
    """Examples already in memory, dealt into shards of `shard_size` by key (so streams have shards to take)."""

    def __init__(self, examples: list[TrainingExample], shard_size: int = 16):
        ordered = sorted(examples, key=lambda e: e.key)
        self.examples = {e.key: e for e in ordered}
        if len(self.examples) != len(ordered):
            raise ValueError("training examples must have distinct keys")
        self._refs = [ExampleRef(f"memory-{i // shard_size:06d}", e.key, example_size(e),
                                 int(e.cache.qwen3.grid_thw.shape[0])) for i, e in enumerate(ordered)]

    def refs(self) -> list[ExampleRef]:
        return list(self._refs)

    def read(self, shard: str, keys: set[str]) -> dict[str, TrainingExample]:
        return {key: self.examples[key] for key in keys}


# -- the held-out split ---------------------------------------------------------------------------------

MIN_HELDOUT = 4  # the Qwen3-shuffled evaluation needs two or more held-out samples; four give it a spread


HELDOUT_SHARDS = 8  # the held-out set is drawn from this many shards (more only when they run out)


def split_refs(refs: list[ExampleRef], fraction: float, max_heldout: int | None = None) -> tuple[list, list]:
    """Deterministic held-out split: `fraction` of the examples (at most `max_heldout`), but on small sets up to
    `MIN_HELDOUT` (never more than a quarter), so the information gain and its ablations have samples to compare.

    The examples are drawn round-robin from `HELDOUT_SHARDS` shards (ranked by a hash of their name; examples
    within one by a hash of their key), more shards only when those run out: reading the held-out set reads 8
    shards, not one shard per example (chosen by key alone, 256 examples came from up to 256 shards: hundreds of
    GB from object storage at start-up with real caches). Shards are contiguous runs of sorted sample ids, so the
    draw spans 8 of them rather than filling one, which could be one id range or one capability.
    Returns (train, held-out), each in the order of `refs`."""
    count = max(1, round(len(refs) * fraction), min(MIN_HELDOUT, len(refs) // 4)) if len(refs) > 1 else 0
    if max_heldout is not None:
        count = min(count, max_heldout)
    if count < 2:
        logger.warning("%d example(s): %d held out, so the Qwen3 information gain (which shuffles Qwen3 caches "
                       "across held-out samples) cannot be measured; use 8 or more examples", len(refs), count)

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    shard_rank = {shard: rank for rank, shard in enumerate(sorted({r.shard for r in refs}, key=digest))}
    in_shard: dict[str, list[ExampleRef]] = {}
    for ref in sorted(refs, key=lambda r: digest(r.key)):
        in_shard.setdefault(ref.shard, []).append(ref)
    position = {ref.key: index for members in in_shard.values() for index, ref in enumerate(members)}
    # groups of HELDOUT_SHARDS shards, round-robin inside a group: (group, place in its shard, shard)
    ranked = sorted(refs, key=lambda r: (shard_rank[r.shard] // HELDOUT_SHARDS, position[r.key], shard_rank[r.shard]))
    heldout = {r.key for r in ranked[:count]}
    return [r for r in refs if r.key not in heldout], [r for r in refs if r.key in heldout]


def read_refs(source: ExampleSource, refs: list[ExampleRef]) -> list[TrainingExample]:
    """The examples of `refs`, in their order (one read per shard)."""
    by_shard: dict[str, set[str]] = {}
    for ref in refs:
        by_shard.setdefault(ref.shard, set()).add(ref.key)
    found: dict[str, TrainingExample] = {}
    for shard, keys in by_shard.items():
        found.update(source.read(shard, keys))
    return [found[ref.key] for ref in refs]


# -- streams ---------------------------------------------------------------------------------------------


def deal_shards(refs: list[ExampleRef], streams: int) -> list[list[str]]:
    """Shard i (sorted) goes to stream i mod `streams`."""
    shards = sorted({ref.shard for ref in refs})
    if len(shards) < streams:
        raise ValueError(f"{streams} data streams need at least {streams} shards of training examples; there are "
                         f"{len(shards)}: use fewer streams (or GPUs), or a smaller shard size when building caches")
    return [shards[i::streams] for i in range(streams)]


@dataclass
class PlannedBatch:
    """One micro-batch of one stream, decided on refs: the examples, and for the shuffled-Qwen3 control the
    example whose Qwen3 cache each one gets."""

    epoch: int
    members: list[ExampleRef]
    partners: list[ExampleRef | None]


def plan_stream(refs_by_shard: dict[str, list[ExampleRef]], shards: list[str], seed: int, stream: int,
                batch_size: int, buffer_size: int, pair_qwen3: bool = False) -> Iterator[PlannedBatch]:
    """The stream's micro-batches, forever (epoch after epoch), a pure function of its arguments."""
    if not any(refs_by_shard.get(shard) for shard in shards):
        raise ValueError(f"stream {stream} has no training examples")
    epoch = 0
    while True:
        rng = random.Random(f"{seed}/{stream}/{epoch}")
        order = list(shards)
        rng.shuffle(order)
        buffer: list[ExampleRef] = []
        for shard in order:
            for ref in refs_by_shard.get(shard, ()):
                buffer.append(ref)
                if len(buffer) >= buffer_size:
                    yield _take(buffer, rng, epoch, batch_size, pair_qwen3)
        while buffer:
            yield _take(buffer, rng, epoch, batch_size, pair_qwen3)
        epoch += 1


def _take(buffer: list[ExampleRef], rng: random.Random, epoch: int, batch_size: int,
          pair_qwen3: bool) -> PlannedBatch:
    candidates = buffer
    if pair_qwen3:  # start from an example that has a partner in the buffer, when one has
        counts = Counter(ref.images for ref in buffer)
        candidates = [ref for ref in buffer if counts[ref.images] > 1] or buffer
    first = candidates[rng.randrange(len(candidates))]
    same = [ref for ref in buffer if ref.size == first.size and ref is not first]
    members = [first, *rng.sample(same, min(batch_size - 1, len(same)))]
    chosen = {id(ref) for ref in members}
    buffer[:] = [ref for ref in buffer if id(ref) not in chosen]
    partners: list[ExampleRef | None] = []
    for ref in members:
        pool = [other for other in buffer + members if other is not ref and other.images == ref.images] \
            if pair_qwen3 else []
        partners.append(pool[rng.randrange(len(pool))] if pool else None)
    return PlannedBatch(epoch, members, partners)


class StreamReader:
    """Materializes a stream's planned micro-batches: reads shards as they become needed (the next ones in a
    background thread), keeps an example only until it is emitted."""

    def __init__(self, source: ExampleSource, refs_by_shard: dict[str, list[ExampleRef]], shards: list[str],
                 seed: int, stream: int, batch_size: int, buffer_size: int, pair_qwen3: bool = False,
                 skip: int = 0, lookahead: int = 8):
        self.source, self.refs_by_shard = source, refs_by_shard
        self.plan = plan_stream(refs_by_shard, shards, seed, stream, batch_size, buffer_size, pair_qwen3)
        self.stream, self.lookahead = stream, lookahead
        self.emitted: dict[tuple[int, str], set[str]] = {}  # (epoch, shard) -> keys emitted (while skipping)
        self.resident: dict[tuple[int, str], dict[str, TrainingExample]] = {}
        self.loading: dict[tuple[int, str], Future] = {}
        self.upcoming: deque[PlannedBatch] = deque()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stream{stream}")
        for _ in range(skip):  # resume: the batches trained on before, decided again without reading anything
            batch = next(self.plan)
            for ref in batch.members:
                self.emitted.setdefault((batch.epoch, ref.shard), set()).add(ref.key)
        if skip:  # only the current epoch's shards are still to be read: earlier epochs' records are dead weight
            self.emitted = {slot: keys for slot, keys in self.emitted.items() if slot[0] >= batch.epoch}

    @property
    def resident_examples(self) -> int:
        return sum(len(examples) for examples in self.resident.values())

    def _load(self, epoch: int, shard: str) -> dict[str, TrainingExample]:
        keys = {ref.key for ref in self.refs_by_shard[shard]} - self.emitted.pop((epoch, shard), set())
        return self.source.read(shard, keys)

    def _request(self, epoch: int, shard: str) -> None:
        slot = (epoch, shard)
        if slot not in self.resident and slot not in self.loading:
            self.loading[slot] = self.pool.submit(self._load, epoch, shard)

    def _example(self, epoch: int, ref: ExampleRef, keep: bool) -> TrainingExample:
        slot = (epoch, ref.shard)
        if slot not in self.resident:
            if slot not in self.loading:
                self._request(epoch, ref.shard)
            self.resident[slot] = self.loading.pop(slot).result()
        examples = self.resident[slot]
        example = examples[ref.key] if keep else examples.pop(ref.key)
        if not examples:
            del self.resident[slot]
        return example

    def next(self) -> tuple[list[TrainingExample], list[TrainingExample | None]]:
        """The next micro-batch: its examples, and each one's Qwen3 partner (None: its own)."""
        while len(self.upcoming) <= self.lookahead:
            batch = next(self.plan)
            self.upcoming.append(batch)
            for ref in batch.members:
                self._request(batch.epoch, ref.shard)
        batch = self.upcoming.popleft()
        members = [self._example(batch.epoch, ref, keep=True) for ref in batch.members]
        partners = [None if ref is None else members[batch.members.index(ref)] if ref in batch.members
                    else self._example(batch.epoch, ref, keep=True)  # still in the buffer: stays for its turn
                    for ref in batch.partners]
        for ref in batch.members:  # emitted: dropped
            self._example(batch.epoch, ref, keep=False)
        return members, partners

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class TrainingStreams(torch.utils.data.IterableDataset):
    """The micro-batches of some streams, in round-robin order, as a `torch.utils.data` dataset: a `DataLoader`
    with worker processes reads them ahead (each worker takes an equal share of the streams). Items are
    (stream, examples, partners)."""

    def __init__(self, source: ExampleSource, refs: list[ExampleRef], dealt: list[list[str]], streams: list[int],
                 seed: int, batch_size: int, buffer_size: int, pair_qwen3: bool, skip: int):
        super().__init__()
        self.source, self.streams, self.dealt = source, streams, dealt
        self.refs_by_shard: dict[str, list[ExampleRef]] = {}
        for ref in refs:
            self.refs_by_shard.setdefault(ref.shard, []).append(ref)
        self.seed, self.batch_size, self.buffer_size = seed, batch_size, buffer_size
        self.pair_qwen3, self.skip = pair_qwen3, skip

    def __iter__(self) -> Iterator[tuple[int, list[TrainingExample], list[TrainingExample | None]]]:
        info = torch.utils.data.get_worker_info()
        mine = self.streams[info.id::info.num_workers] if info is not None else self.streams
        readers = [StreamReader(self.source, self.refs_by_shard, self.dealt[stream], self.seed, stream,
                                self.batch_size, self.buffer_size, self.pair_qwen3, self.skip) for stream in mine]
        try:
            while True:
                for stream, reader in zip(mine, readers):
                    members, partners = reader.next()
                    yield stream, members, partners
        finally:
            for reader in readers:
                reader.close()


def loader_workers(requested: int, streams: int) -> int:
    """Worker processes for a rank's streams: at most `requested`, and a divisor of the stream count, so every
    worker holds as many streams and the round-robin order stays even."""
    return max((w for w in range(0, min(requested, streams) + 1) if w == 0 or streams % w == 0), default=0)


def _as_is(item: Any) -> Any:
    return item


def stream_loader(dataset: TrainingStreams, workers: int) -> torch.utils.data.DataLoader:
    count = loader_workers(workers, len(dataset.streams))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=count, collate_fn=_as_is,
                                       prefetch_factor=2 if count else None, persistent_workers=False)
