"""A job's live progress, from the shards' markers alone (what every worker commits): samples done and failed per
stage, samples per second and an estimate of the time left. Each marker is read once; a look costs one listing
per stage, so a dispatcher can look every few seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bridgecore.batch.fingerprints import ShardFingerprints
from bridgecore.batch.settings import JobSettings
from bridgecore.storage import Storage


@dataclass
class StageProgress:
    shards: int = 0  # committed
    done: int = 0  # samples
    failed: int = 0


@dataclass
class JobProgress:
    """`look()` refreshes; `fraction`, `samples_per_s`, `eta_s` and `line()` describe the job since the first look."""

    output: str
    pipeline: str
    settings: JobSettings
    shards: list[str]
    stages: dict[str, StageProgress] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    _first: tuple[float, int] | None = None  # (fraction, stage-samples) at the first look
    _seen: set[tuple[str, str]] = field(default_factory=set)
    _prints: ShardFingerprints | None = None

    def look(self) -> "JobProgress":
        if self._prints is None:
            self._prints = ShardFingerprints(Storage(self.output), self.pipeline, self.settings, self.shards)
            self.stages = {stage.name: StageProgress() for stage in self._prints.stages}
        committed = self._prints.committed(self.shards)
        for stage in self._prints.stages:
            for shard in committed[stage.name]:
                if (stage.name, shard) in self._seen:
                    continue
                counts = self._prints.store(stage, shard).marker(shard).get("counts", {})
                progress = self.stages[stage.name]
                progress.shards += 1
                progress.done += counts.get("done", 0)
                progress.failed += counts.get("failed", 0)
                self._seen.add((stage.name, shard))
        if self._first is None:
            self._first = (self.fraction, self._stage_samples())
            self.started = time.monotonic()
        return self

    def _stage_samples(self) -> int:
        return sum(p.done + p.failed for p in self.stages.values())

    @property
    def fraction(self) -> float:
        total = len(self.shards) * len(self.stages)
        return sum(p.shards for p in self.stages.values()) / total if total else 1.0

    @property
    def samples_per_s(self) -> float | None:
        """Samples through the whole pipeline per second (stage-samples / stages), since the first look."""
        elapsed = time.monotonic() - self.started
        if self._first is None or elapsed <= 0 or not self.stages:
            return None
        return (self._stage_samples() - self._first[1]) / len(self.stages) / elapsed

    @property
    def eta_s(self) -> float | None:
        elapsed = time.monotonic() - self.started
        if self._first is None or self.fraction <= self._first[0] or elapsed <= 0:
            return None
        return (1 - self.fraction) * elapsed / (self.fraction - self._first[0])

    def line(self) -> str:
        stages = ", ".join(f"{name} {p.shards}/{len(self.shards)} ({p.done} done, {p.failed} failed)"
                           for name, p in self.stages.items())
        rate, eta = self.samples_per_s, self.eta_s
        return (f"{100 * self.fraction:.0f}% of {len(self.shards)} shards x {len(self.stages)} stages; {stages}"
                + (f"; {rate:.2f} samples/s" if rate else "")
                + (f"; ETA {_duration(eta)}" if eta is not None else ""))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
