"""A batch job's plan and its models: which shards to run, and models loaded once per process.

Planning is incremental and deterministic: samples already finished (their final stage committed in
some shard) are skipped; the rest are cut into shards whose ids hash their members, so a rerun after a
kill re-forms exactly the unfinished shards, and a rerun of a finished job plans none... except that the
job's shard list still names every shard holding its samples, for the summary.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from .shard_store import ShardStore
from .sharding import Sample, plan_shards, read_inputs
from .storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class JobPlan:
    shards: list[str]  # every shard holding this job's samples, old and new
    new_shards: list[str]  # shards that still have work to do
    samples: int


def _existing_plans(storage: Storage) -> dict[str, list[Sample]]:
    plans = {}
    for name in storage.list("plan", suffix=".json"):
        shard_id = name[: -len(".json")]
        plans[shard_id] = [Sample.from_dict(s) for s in storage.read_json("plan", name)["samples"]]
    return plans


def plan_job(input_uri: str, output_uri: str, prompt: str | None = None, shard_size: int = 16,
             final_stage: str = "metrics", retry_failed: bool = False) -> JobPlan:
    """Reads the inputs, finds what is finished under `output_uri`, and writes plans for the rest."""
    storage = Storage(output_uri)
    storage.ensure_root()
    samples = read_inputs(input_uri, prompt)
    wanted = {(s.key, s.content_sha256) for s in samples}
    finished: set[tuple[str, str]] = set()
    job_shards: list[str] = []
    final = ShardStore(storage, final_stage)
    for shard_id, members in _existing_plans(storage).items():
        if not any((s.key, s.content_sha256) in wanted for s in members):
            continue
        if final.is_done(shard_id):
            states = {row["key"]: row["status"] for row in final.manifest(shard_id)}
            finished |= {(s.key, s.content_sha256) for s in members
                         if states.get(s.key) == "done" or (states.get(s.key) == "failed" and not retry_failed)}
        job_shards.append(shard_id)
    new = plan_shards(samples, shard_size, done=finished)
    for shard_id, members in new.items():
        if not storage.exists("plan", shard_id + ".json"):
            storage.write_json({"shard": shard_id, "samples": [s.to_dict() for s in members]}, "plan", shard_id + ".json")
    shards = sorted(set(job_shards) | set(new))
    logger.info("%d samples: %d finished, %d shards to run", len(samples), len(finished), len(new))
    return JobPlan(shards, sorted(new), len(samples))


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Fingerprint of the library code: part of every cache key, so a code change recomputes."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# -- models, once per worker process ----------------------------------------------------------------------

_EDITORS: dict[tuple, "object"] = {}


def get_editor(edit_model: str, qwen3_model: str, bridge: str | None = None, device: str = "auto",
               condition_area: int = 1024 * 1024, load_in_8bit: bool = False):
    """The process's `EnhancedQwenImageEdit` for these settings: models load once and are reused."""
    from .edit_pipeline import EnhancedQwenImageEdit

    key = (edit_model, qwen3_model, bridge, device, condition_area, load_in_8bit)
    if key not in _EDITORS:
        _EDITORS[key] = EnhancedQwenImageEdit(edit_model, qwen3_model, bridge=bridge, device=device,
                                              condition_area=condition_area, load_in_8bit=load_in_8bit)
    return _EDITORS[key]


def forward_counts() -> dict[str, int]:
    """Model forwards run in this process so far (VLM batches and DiT calls)."""
    return {"vlm": sum(e.extractor.forward_count for e in _EDITORS.values()),
            "dit": sum(e.dit_calls for e in _EDITORS.values())}


@dataclass
class JobSettings:
    """Everything a stage needs besides the shard: flat, JSON-friendly (it travels as flow parameters)."""

    qwen3_model: str
    edit_model: str
    bridge: str | None = None
    device: str = "auto"
    condition_area: int = 1024 * 1024
    steps: int = 50
    seed: int = 0
    batch_size: int = 4
    load_in_8bit: bool = False
    cfg: float = 1.0  # true_cfg_scale; > 1 extracts and uses the negative prompt's embeddings too
    negative_prompt: str = " "

    @property
    def negative(self) -> str | None:
        return self.negative_prompt if self.cfg > 1 else None

    def editor(self):
        return get_editor(self.edit_model, self.qwen3_model, self.bridge, self.device, self.condition_area,
                          self.load_in_8bit)

    def fingerprint(self) -> str:
        """Model ids + revisions + bridge checksum + edit parameters: what a stage's output depends on."""
        from .loading import resolve_model
        from .stage_fuse import bridge_checksum

        revisions = [resolve_model(self.qwen3_model).revision,
                     resolve_model(self.edit_model, allow_patterns=["model_index.json"]).revision]
        parts = [self.qwen3_model, self.edit_model, *revisions, bridge_checksum(self.bridge),
                 str(self.condition_area), str(self.steps), str(self.seed), str(self.cfg), str(self.negative)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def release_vlms() -> None:
    """Frees the VLMs of every cached editor (between the extract and edit stages on one GPU)."""
    for editor in _EDITORS.values():
        editor.extractor.unload()


def invalidate_from(output_uri: str, shard_id: str, stage: str) -> None:
    """Forgets `stage` and every later stage of a shard (after corruption was found), so they recompute."""
    from .stage_evaluate import STAGES

    storage = Storage(output_uri)
    for later in STAGES[STAGES.index(stage):]:
        ShardStore(storage, later).invalidate(shard_id)


def run_stages(output_uri: str, shard_ids: list[str], settings: JobSettings) -> dict:
    """All stages over the shards in this process, without Prefect (tests, benchmarks, notebooks); the
    `process-shards` flow runs the same stage functions as Prefect tasks. Returns the run summary."""
    from .stage_edit import edit_shard
    from .stage_evaluate import evaluate_shard, summarize
    from .stage_extract import extract_shard
    from .stage_fuse import fuse_shard

    storage, editor = Storage(output_uri), settings.editor()
    for shard_id in shard_ids:
        extract_shard(storage, shard_id, editor.extractor, settings.batch_size, negative_prompt=settings.negative)
    release_vlms()
    for shard_id in shard_ids:
        fuse_shard(storage, shard_id, settings.bridge)
        edit_shard(storage, shard_id, editor, settings.steps, settings.seed, settings.batch_size, settings.cfg)
        evaluate_shard(storage, shard_id)
    return summarize(storage, shard_ids)
