"""Training data streams: every example once per epoch, memory bounded by the buffer (flat as the data grow 10x),
the same micro-batches whatever the number of ranks, resume by skipping without reading, the shuffled-Qwen3
partner taken from the buffer."""

from collections import Counter

import pytest

from bridgecore.training.data import ExampleRef, StreamReader, TrainingStreams, deal_shards, loader_workers, split_refs


class CountingSource:
    """An `ExampleSource` of plain strings (the reader never looks inside an example) that counts what it reads."""

    def __init__(self, shards: int, per_shard: int, sizes: int = 1, images: int = 1):
        self._refs = [ExampleRef(f"s{s:04d}", f"s{s:04d}-{i:03d}", ("size", (s * per_shard + i) % sizes), images)
                      for s in range(shards) for i in range(per_shard)]
        self.reads: Counter = Counter()

    def refs(self):
        return list(self._refs)

    def read(self, shard, keys):
        self.reads[shard] += 1
        return {key: f"example {key}" for key in keys}


def by_shard(refs):
    grouped = {}
    for ref in refs:
        grouped.setdefault(ref.shard, []).append(ref)
    return grouped


def reader(source, stream=0, streams=1, skip=0, batch_size=4, buffer_size=16, pair=False):
    refs = source.refs()
    return StreamReader(source, by_shard(refs), deal_shards(refs, streams)[stream], seed=7, stream=stream,
                        batch_size=batch_size, buffer_size=buffer_size, pair_qwen3=pair, skip=skip)


def test_every_example_once_per_epoch_in_batches_of_one_size():
    source = CountingSource(shards=6, per_shard=10, sizes=3)
    stream = reader(source)
    seen = []
    while len(seen) < 60:
        members, _ = stream.next()
        assert len({source_ref_size(source, key) for key in members}) == 1  # one resolution per batch
        seen += members
    assert len(seen) == 60 and len(set(seen)) == 60  # the first epoch: each example exactly once
    stream.close()


def source_ref_size(source, example):
    key = example.split(" ", 1)[1]
    return next(ref.size for ref in source.refs() if ref.key == key)


def test_resident_examples_stay_flat_as_the_data_grow_tenfold():
    """10 and 100 shards: the reader holds as many examples at most (the buffer, and the shards it reads ahead),
    and reads each shard once per epoch."""
    peaks = {}
    for shards in (10, 100):
        source = CountingSource(shards=shards, per_shard=16)
        stream = reader(source, buffer_size=32)
        peak = 0
        for _ in range(shards * 16 // 4):  # one epoch in batches of 4
            stream.next()
            peak = max(peak, stream.resident_examples)
        stream.close()
        assert set(source.reads.values()) == {1} and len(source.reads) == shards
        peaks[shards] = peak
    assert peaks[100] <= 32 + 16 * 9 and peaks[100] <= peaks[10] + 16, peaks


def test_the_streams_are_the_same_whatever_the_ranks():
    """Two streams read by one process or by two ranks (one stream each): the same micro-batches per stream."""
    source = CountingSource(shards=8, per_shard=5)
    refs, dealt = source.refs(), deal_shards(source.refs(), 2)
    one = iter(TrainingStreams(source, refs, dealt, [0, 1], seed=3, batch_size=2, buffer_size=8, pair_qwen3=False,
                               skip=0))
    ranks = [iter(TrainingStreams(source, refs, dealt, [r], seed=3, batch_size=2, buffer_size=8, pair_qwen3=False,
                                  skip=0)) for r in (0, 1)]
    for _ in range(30):
        for rank in (0, 1):
            stream, members, _ = next(one)
            assert stream == rank and (stream, members) == next(ranks[rank])[:2]


def test_resume_skips_batches_without_reading_them():
    source = CountingSource(shards=12, per_shard=8)
    straight = reader(source)
    batches = [straight.next()[0] for _ in range(40)]
    straight.close()
    fresh = CountingSource(shards=12, per_shard=8)
    resumed = reader(fresh, skip=30)
    assert [resumed.next()[0] for _ in range(10)] == batches[30:]
    assert sum(fresh.reads.values()) < 12  # the shards fully used before step 30 were never read again
    resumed.close()


def test_the_shuffled_qwen3_partner_comes_from_the_buffer_with_as_many_images():
    source = CountingSource(shards=4, per_shard=8)
    source._refs += [ExampleRef("s9999", f"two-{i}", ("two images", 0), 2) for i in range(8)]
    stream = reader(source, pair=True, buffer_size=12)
    for _ in range(10):
        members, partners = stream.next()
        for member, partner in zip(members, partners):
            assert partner is not None and partner != member
            assert member.split()[1].startswith("two-") == partner.split()[1].startswith("two-")
    stream.close()


def test_split_and_dealing():
    source = CountingSource(shards=3, per_shard=20)
    train, heldout = split_refs(source.refs(), 0.1, max_heldout=4)
    assert len(heldout) == 4 and not {r.key for r in train} & {r.key for r in heldout}
    assert {r.key for r in split_refs(source.refs()[::-1], 0.1, 4)[1]} == {r.key for r in heldout}  # not by order
    # the held-out set is drawn round-robin from 8 shards (more only when they run out): reading it reads 8 shards,
    # not one per example, and no single shard (an id range) makes it up
    many = CountingSource(shards=64, per_shard=20).refs()
    for cap, shards in ((4, 4), (20, 8), (45, 8), (160, 8), (170, 16)):  # past 8 x 20: the next group of 8
        held = split_refs(many, 0.5, max_heldout=cap)[1]
        per_shard = Counter(r.shard for r in held)
        assert len(held) == cap and len(per_shard) == shards, (cap, per_shard)
        if cap <= 160:
            assert max(per_shard.values()) - min(per_shard.values()) <= 1  # round-robin: balanced
    with pytest.raises(ValueError, match="4 data streams need at least 4 shards"):
        deal_shards(train, 4)
    assert loader_workers(4, 6) == 3 and loader_workers(2, 3) == 1 and loader_workers(0, 8) == 0
