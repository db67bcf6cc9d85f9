"""What a stage is, and how one shard goes through it.

A stage (see stages/) declares its name, its upstream stages, the settings it depends on and the
library code it runs, and implements `process(items, ctx)`: a batch of samples in, one result per
sample out. Everything else is here, the same for every stage and every executor:

- skip a shard already committed under this stage's fingerprint;
- read the plan and the upstream shards (checksums verified; a corrupt or missing upstream raises
  `CorruptShardError` naming it, and the executor recomputes it);
- carry earlier failures forward with their reasons;
- isolate failures: a batch that raises is retried sample by sample, CUDA out-of-memory halves the
  batch, any error of one sample fails that sample only; only storage errors fail the shard;
- commit data, table, then the marker, with counts, seconds, samples/s, worker and peak memory.
"""

from __future__ import annotations

import inspect
import json
import logging
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from bridgecore.storage import Storage, is_connection_error
from bridgecore.batch.records import Sample, SampleResult, shard_route
from bridgecore.batch.model_pool import ModelPool
from bridgecore.batch.settings import JobSettings
from bridgecore.batch.shard_store import ShardContents, ShardStore
from bridgecore.batch.sharding import load_plan

if TYPE_CHECKING:
    from bridgecore.batch.stages.outputs import StageOutput

logger = logging.getLogger(__name__)


@dataclass
class StageItem:
    """One sample entering a stage, with the payloads its upstream stages committed for it."""

    sample: Sample
    upstream: dict[str, dict[str, bytes]] = field(default_factory=dict)  # stage -> extension -> bytes
    upstream_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> its row's info

    def has(self, output: "StageOutput") -> bool:
        """Whether that stage (an upstream stage enabled for the job) handed this sample its output."""
        return output.stage in self.upstream

    def output(self, output: "StageOutput") -> Any:
        """An upstream stage's output for this sample, read back (see `stages/outputs.py`)."""
        if output.stage not in self.upstream:
            raise KeyError(f"sample {self.sample.id} has no {output.stage} output (not upstream of this stage?)")
        return output.read(self.upstream[output.stage])


@dataclass
class StageContext:
    """What a stage sees besides its items: storage, settings, every stage's fingerprint, the models, and the
    pipeline's stages by name (where its upstream stages' shards are found).

    `fingerprints` are those of one route (see `records.ROUTES`): a run's context holds the single-image
    route's, and `for_shard` gives the context of one shard's route (its plan says which).
    """

    storage: Storage
    settings: JobSettings
    fingerprints: dict[str, str]
    models: ModelPool
    stages: dict[str, "Stage"] = field(default_factory=dict)
    routes: dict[str, dict[str, str]] = field(default_factory=dict)  # route -> fingerprints, when routes differ
    shard_routes: dict[str, str] = field(default_factory=dict)  # shard -> route, read from plans once

    def route(self, shard_id: str) -> str:
        if shard_id not in self.shard_routes:
            self.shard_routes[shard_id] = shard_route(load_plan(self.storage, shard_id))
        return self.shard_routes[shard_id]

    def for_shard(self, shard_id: str) -> "StageContext":
        """This context with the fingerprints of the shard's route (itself when every route has the same)."""
        if not self.routes:
            return self
        return replace(self, fingerprints=self.routes[self.route(shard_id)])


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "CUDA out of memory" in str(error)


class Stage:
    """One step of a pipeline. Subclasses set the class attributes and implement `process`."""

    name: ClassVar[str]  # the output folder under OUTPUT
    upstream: ClassVar[tuple[str, ...]] = ()  # stages whose committed shards this one reads
    optional_upstream: ClassVar[tuple[str, ...]] = ()  # read when that stage is enabled for the job
    layout: ClassVar[str] = "tar"  # "tar": a WebDataset tar per shard; "files": one object per sample; "table": none
    models: ClassVar[tuple[str, ...]] = ()  # large models it uses: 'vlm', 'dit' (others are released first)

    def enabled(self, settings: JobSettings) -> bool:
        return True

    def settings_of(self, settings: JobSettings) -> dict[str, Any]:
        """The settings this stage's output depends on (model revisions included): part of its fingerprint."""
        return {}

    def batch_size(self, settings: JobSettings) -> int:
        return settings.batch_size

    def group_key(self, item: StageItem, ctx: StageContext) -> Any:
        """Samples with equal keys are batched together (e.g. those one model takes); the order of the results
        does not depend on it."""
        return 0

    def process(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        raise NotImplementedError

    # -- fingerprint ----------------------------------------------------------------------------------------

    def code_version(self, root: Path | None = None) -> str:
        """Digest of the stage's own file and the value code it reaches through imports (see `code_version.py`);
        `root` reads another copy of the source tree."""
        from bridgecore.batch.code_version import ROOT, code_version

        own = Path(inspect.getfile(type(self))).resolve()
        root = (root or ROOT).resolve()
        return code_version(root / own.relative_to(ROOT), root)

    def fingerprint_record(self, settings: JobSettings, upstream_fingerprints: dict[str, str]) -> dict[str, Any]:
        return {"stage": self.name, "settings": self.settings_of(settings), "upstream": upstream_fingerprints,
                "code": self.code_version()}

    # -- one shard ------------------------------------------------------------------------------------------

    def layout_for(self, settings: JobSettings | None) -> str:
        """How this stage stores its shards under `settings` (the layout is part of the fingerprint when it varies)."""
        return self.layout

    def store(self, storage: Storage, fingerprint: str, settings: JobSettings | None = None) -> ShardStore:
        """The stage's shards under `fingerprint`. Reading markers and tables needs no `settings`; reading payloads and
        committing take the layout `settings` choose."""
        return ShardStore(storage, self.name, fingerprint, self.layout_for(settings))

    def _process_isolated(self, items: list[StageItem], ctx: StageContext) -> list[SampleResult]:
        """`process` with failure isolation: errors are pinned on the sample that causes them."""
        try:
            results = self.process(items, ctx)
            if len(results) != len(items):
                raise RuntimeError(f"stage {self.name} returned {len(results)} results for {len(items)} samples")
            return results
        except Exception as error:  # noqa: BLE001 - classified below
            if is_connection_error(error):
                raise  # storage away (budget spent or not): the shard fails and is retried whole, never its samples
            from bridgecore.model.loading import ModelNotAvailableError
            from bridgecore.model.speed import CannotRunHereError

            if isinstance(error, (ModelNotAvailableError, CannotRunHereError)):
                raise  # the same for every sample (a model missing, hardware lacking): nothing is committed
            if len(items) == 1:
                logger.warning("%s: sample %s failed: %s: %s", self.name, items[0].sample.id, type(error).__name__, error)
                return [SampleResult.failed(items[0].sample, f"{self.name} failed: {type(error).__name__}: {error}")]
            if _is_out_of_memory(error):
                import torch

                torch.cuda.empty_cache()
                half = len(items) // 2
                logger.warning("%s: out of memory with %d samples, retrying in halves", self.name, len(items))
                return self._process_isolated(items[:half], ctx) + self._process_isolated(items[half:], ctx)
            logger.warning("%s: a batch of %d failed (%s); retrying one by one", self.name, len(items), error)
            return [result for item in items for result in self._process_isolated([item], ctx)]

    def _upstream_contents(self, ctx: StageContext, shard_id: str) -> dict[str, ShardContents]:
        names = self.upstream + tuple(n for n in self.optional_upstream if n in ctx.fingerprints)
        return {name: ctx.stages[name].store(ctx.storage, ctx.fingerprints[name], ctx.settings).read(shard_id)
                for name in names}

    def run_shard(self, ctx: StageContext, shard_id: str, progress: Callable[[int], None] | None = None) -> dict:
        """Runs one shard through this stage unless it is committed. Returns the marker."""
        ctx = ctx.for_shard(shard_id)
        store = self.store(ctx.storage, ctx.fingerprints[self.name], ctx.settings)
        if store.is_done(shard_id):
            return {**store.marker(shard_id), "skipped": True}
        with store.leased(shard_id):
            if store.is_done(shard_id):  # committed by the lease's previous holder meanwhile
                return {**store.marker(shard_id), "skipped": True}
            return self._compute(ctx, store, shard_id, progress)

    def _compute(self, ctx: StageContext, store: ShardStore, shard_id: str,
                 progress: Callable[[int], None] | None) -> dict:
        started = time.monotonic()
        samples = load_plan(ctx.storage, shard_id)
        upstream = self._upstream_contents(ctx, shard_id)
        results: dict[str, SampleResult] = {}
        ready: list[StageItem] = []
        for sample in samples:
            rows = {name: contents.rows.get(sample.id) for name, contents in upstream.items()}
            failed_upstream = next(((name, row) for name, row in rows.items()
                                    if row is None or row["status"] != "done"), None)
            if sample.error:  # known bad before any stage ran (e.g. escapes the input root)
                results[sample.id] = SampleResult(sample, "failed", sample.error, info={"failed_at": "plan"})
            elif failed_upstream is not None:
                name, row = failed_upstream
                earlier = json.loads(row["info"]).get("failed_at", name) if row else name
                results[sample.id] = SampleResult(sample, "failed", row["error"] if row else f"missing from {name}",
                                                  info={"failed_at": earlier})
            else:
                ready.append(StageItem(sample, {name: upstream[name].payloads.get(sample.id, {}) for name in rows},
                                       {name: json.loads(row["info"]) for name, row in rows.items()}))
        ready.sort(key=lambda item: self.group_key(item, ctx))  # stable: plan order within a group
        size = self.batch_size(ctx.settings)
        for start in range(0, len(ready), size):
            for result in self._process_isolated(ready[start:start + size], ctx):
                results[result.sample.id] = result
            if progress is not None:
                progress(min(start + size, len(ready)))
        for result in results.values():
            if result.status == "failed":
                result.info.setdefault("failed_at", self.name)
        seconds = time.monotonic() - started
        stats = {"seconds": round(seconds, 3), "samples_per_s": round(len(ready) / seconds, 3) if seconds > 0 else None,
                 "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                 **_gpu_peak()}
        store.write_settings(self._settings_record(ctx))
        return store.commit(shard_id, [results[s.id] for s in samples], stats)

    def _settings_record(self, ctx: StageContext) -> dict[str, Any]:
        upstream = {n: ctx.fingerprints[n] for n in self.upstream + self.optional_upstream if n in ctx.fingerprints}
        return {**self.fingerprint_record(ctx.settings, upstream), "fingerprint": ctx.fingerprints[self.name]}


def _gpu_peak() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
