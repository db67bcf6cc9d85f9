"""A job's settings, what they resolve to (model revisions, bridge checksum), and the models of a process.

`JobSettings` is flat and JSON-friendly: it travels as Prefect flow parameters. Each stage picks the
settings it depends on (see `Stage.settings_of`), so that a changed setting reruns exactly the stages
that read it. Revisions come from config files only: fingerprinting a job never downloads weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import posixpath
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from bridgecore.model.rewrite import REWRITERS, SYSTEM_PROMPT
from bridgecore.options import option

logger = logging.getLogger(__name__)

UNTRAINED_BRIDGE = "untrained"
EDITORS = ("auto", "qwen-image-edit", "qwen-image-edit-plus", "qwen-image-2.1")


@functools.lru_cache(maxsize=16)
def _family_of(edit_model: str) -> str:
    from bridgecore.model.loading import editor_family

    return editor_family(edit_model)


@functools.lru_cache(maxsize=16)
def bridge_checksum(bridge: str | None) -> str:
    """sha256 of a bridge checkpoint (config + weights, local or URL); 'untrained' for the zero-gated default."""
    from bridgecore.storage import read_uri

    if bridge is None:
        return UNTRAINED_BRIDGE
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        try:
            digest.update(read_uri(posixpath.join(str(bridge).rstrip("/"), name)))
        except FileNotFoundError:
            raise ValueError(f"bridge {bridge!r}: no {name}; a bridge checkpoint is a directory written by "
                             "`vision-bridge train` (config.json + model.safetensors)") from None
    return digest.hexdigest()


EDITS_FORMATS = ("png", "webdataset")


@dataclass(frozen=True)
class JobSettings:
    """Everything the stages need besides the shard. Validated on creation (a bad value fails before any work)."""

    qwen3_model: str
    edit_model: str
    bridge: str | None = None
    device: str = "auto"
    condition_area: int = 1024 * 1024
    steps: int = 50
    seed: int = 0
    batch_size: int = 4
    load_in_8bit: bool = False
    cfg: float = 1.0  # true_cfg_scale; > 1 also extracts and uses the negative prompt's embeddings
    negative_prompt: str = " "
    max_prompt_tokens: int = 1024  # a longer instruction fails its sample (a guard, not part of any fingerprint)
    # speed options of the DiT (bridgecore/model/speed.py); LoRAs and the scheduler change the edits, the rest rounding
    lora: tuple[str, ...] = ()
    scheduler: str = "auto"
    compile: bool = False
    attention_backend: str | None = None
    dit_offload: bool = False
    # the fast mode's step cache: diffusers' First Block Cache with this threshold (0: off, exact). An approximation:
    # part of the edits' fingerprint, measured against the exact edit by bench/gpu_realdim.py
    step_cache: float = 0.0
    # true CFG's two forwards per step as one batch of two (exact: rounding only, no fingerprint)
    batch_cfg: bool = False
    # FP8 on the DiT blocks' linear layers (torchao): "off", "dynamic" (FP8 matmuls, compute capability >= 8.9) or
    # "weights" (FP8 storage, bf16 compute). An approximation: part of the edits' fingerprint
    fp8: str = "off"
    # editor family: auto (from the edit model's model_index.json), qwen-image-edit, qwen-image-edit-plus,
    # qwen-image-2.1 (the native arm: its own Qwen3-VL text encoder, no bridge)
    editor: str = "auto"
    # Edit-Plus model for the multi-image samples of a job whose edit model takes one image: a mixed manifest
    # runs in one job, each sample on a pipeline that can take it (None: multi-image samples fail, with a hint)
    plus_model: str | None = None
    # the rewrite arm (bridgecore/model/rewrite.py): "qwen3" lets Qwen3-VL rewrite each instruction and Qwen-Image-Edit's
    # encoder reads the rewrite; "identity" forces the rewrite to be the instruction (the plumbing's control)
    rewrite_with: str = "none"
    rewrite_system_prompt: str | None = None  # None: rewrite.SYSTEM_PROMPT
    rewrite_max_tokens: int = 256
    # how the edits are stored: "png", one object per image (+ metadata.parquet: an imagefolder), or "webdataset",
    # one tar per shard with <key>.png and <key>.json (at 10M images, 10M/shard_size objects instead of 10M)
    edits_format: str = "png"
    # how the vision caches are stored: "native" (the dtype they were computed in, bf16 on a GPU), "fp8" (float8
    # E4M3 with per-token scales) or "int8" (channel means out, int8 with per-token scales per 128 channels): Qwen3-VL's
    # features in half the bytes; see model/cache_format.py
    cache_dtype: str = "native"
    # whether the caches keep Qwen3-VL's three DeepStack taps (~40% of a 1024^2 cache's bytes): off by default, as the
    # default bridge does not read them and the measured ablation gave them no gain (see docs/training.md)
    cache_deepstack: bool = False
    # Qwen3-VL's view of each condition image in pixels when smaller than the DiT's (None: the same pixels); the
    # bridge resamples its token grid onto Qwen2.5-VL's, so a smaller view only shrinks the caches and the extraction
    qwen3_area: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "lora", tuple(self.lora or ()))  # JSON brings a list
        # One step divides by zero in Qwen-Image's scheduler (shift_terminal stretch): NaN images.
        checks = [("steps", self.steps >= 2, "at least 2"), ("batch_size", self.batch_size >= 1, "at least 1"),
                  ("condition_area", self.condition_area >= 32 * 32, "at least 32*32 = 1024 pixels"),
                  ("seed", self.seed >= 0, "a non-negative integer"),
                  ("cfg", math.isfinite(self.cfg) and self.cfg >= 1.0, "a finite number >= 1 (1 turns true CFG off)"),
                  ("max_prompt_tokens", self.max_prompt_tokens >= 16, "at least 16"),
                  ("step_cache", math.isfinite(self.step_cache) and 0.0 <= self.step_cache < 1.0,
                   "in [0, 1) (0 turns the step cache off)")]
        for name, ok, expectation in checks:
            if not ok:
                raise ValueError(f"{name} must be {expectation}; got {getattr(self, name)!r}")
        if self.attention_backend is not None:  # (diffusers' list: imported only when the option is used)
            from bridgecore.model.speed import attention_backends

            if self.attention_backend not in attention_backends():
                raise ValueError(f"{option('attention_backend')} must be one of {', '.join(attention_backends())}; "
                                 f"got {self.attention_backend!r}")
        if self.fp8 != "off" or self.batch_cfg:  # (speed imports torch: only when these options are used)
            from bridgecore.model.speed import conflicting_options

            conflict = conflicting_options(self.fp8, self.dit_offload, self.batch_cfg, self.step_cache)
            if conflict:
                raise ValueError(f"{option(conflict[0])} with {option(conflict[1])}: not supported together "
                                 f"({conflict[2]})")
        if self.qwen3_area is not None and self.qwen3_area < 32 * 32:
            raise ValueError(f"{option('qwen3_area')} must be at least 32*32 = 1024 pixels; got {self.qwen3_area}")
        if self.cache_dtype not in ("native", "fp8", "int8"):
            raise ValueError(f"{option('cache_dtype')} must be native, fp8 or int8; got {self.cache_dtype!r}")
        if self.edits_format not in EDITS_FORMATS:
            raise ValueError(f"edits_format must be one of {', '.join(EDITS_FORMATS)}; got {self.edits_format!r}")
        if self.editor not in EDITORS:
            raise ValueError(f"editor must be one of {', '.join(EDITORS)}; got {self.editor!r}")
        if self.rewrite_with not in REWRITERS:
            raise ValueError(f"rewrite_with must be one of {', '.join(REWRITERS)}; got {self.rewrite_with!r}")
        if self.rewrite_with != "none" and not 8 <= self.rewrite_max_tokens <= self.max_prompt_tokens:
            raise ValueError(f"rewrite_max_tokens must be between 8 and max_prompt_tokens ({self.max_prompt_tokens}); "
                             f"got {self.rewrite_max_tokens}")
        if self.rewrite_system_prompt is not None and not self.rewrite_system_prompt.strip():
            raise ValueError("rewrite_system_prompt is empty; leave it out for the default")

    @property
    def family(self) -> str:
        """The edit model's family, read from its model_index.json (config only, never weights)."""
        return _family_of(self.edit_model)

    @property
    def native(self) -> bool:
        """Qwen-Image-2.1: stages qwen21-caches and qwen21-edits replace caches, fused and edits."""
        return self.family == "qwen-image-2.1"

    def check_editor(self) -> None:
        """The named family matches the model, and the options make sense for it (called before any work)."""
        family = self.family
        if self.editor != "auto" and self.editor != family:
            raise ValueError(f"{option('editor', self.editor)}, but {self.edit_model} is a {family} pipeline: pass "
                             f"{option('edit_model')} with a {self.editor} model (or leave {option('editor')} out)")
        if self.plus_model and family == "qwen-image-edit" and self.lora:
            raise ValueError(f"{option('lora')} with {option('plus_model')}: a LoRA is made for one DiT; run the multi-image samples as "
                             "their own Edit-Plus job (with a LoRA made for it)")
        if family == "qwen-image-2.1":
            from bridgecore.model.native21 import min_condition_area

            floor = min_condition_area(self.edit_model)
            if floor and self.condition_area < floor:
                raise ValueError(f"condition_area {self.condition_area} is below Qwen-Image-2.1's processor floor "
                                 f"({floor} pixels): the encoder would see the images upscaled, not as the VAE does")
            unsupported = [name for name, value, default in [
                ("bridge", self.bridge, None), ("cfg", self.cfg, 1.0), ("lora", self.lora, ()),
                ("rewrite_with", self.rewrite_with, "none"),
                ("scheduler", self.scheduler, "auto"), ("compile", self.compile, False),
                ("attention_backend", self.attention_backend, None), ("dit_offload", self.dit_offload, False),
                ("step_cache", self.step_cache, 0.0), ("batch_cfg", self.batch_cfg, False), ("fp8", self.fp8, "off")]
                if value != default]
            if unsupported:
                raise ValueError(f"Qwen-Image-2.1 (the native arm) runs without {', '.join(unsupported)}: the bridge "
                                 "and the rewrite arm feed Qwen-Image-Edit's conditioning (2.1 reads Qwen3-VL itself), "
                                 "2.1 is sampled without CFG, and the speed options are wired for Qwen-Image-Edit's DiT "
                                 "only")

    @classmethod
    def for_job(cls, qwen3_model: str | None = None, edit_model: str | None = None, *, editor: str = "auto",
                multi_image: bool = False, steps: int | None = None, plus_model: str | None = None,
                route_multi_image: bool = True, plus_model_beside=None, **settings: Any) -> "JobSettings":
        """A job's settings with every default decided here, once: the CLI, the flows and their deployments
        call this and compute nothing themselves, so the same job gets the same fingerprints whichever way it
        is started.

        - `edit_model`: the `editor` family's default model, else Qwen-Image-Edit (Edit-Plus with `multi_image`);
        - `steps`: Qwen-Image-2.1's 40, a distilled (Lightning) LoRA's 4 or 8, else 50;
        - `plus_model`: none unless given, or unless the caller's policy `plus_model_beside(edit_model)` names one
          (the application passes the tiny zoo's: beside a tiny-zoo edit model, its tiny Edit-Plus, so the offline
          demo runs mixed manifests; the library knows no zoo); never with `route_multi_image` off (training data
          and its caches: a bridge is trained for one pipeline) or `plus_model="none"`; refused when it is not an
          Edit-Plus pipeline, dropped for editors that take several images themselves.
        Settings are checked (`check_editor`) before anything runs.
        """
        from bridgecore.model.loading import (
            DEFAULT_EDIT_MODEL,
            DEFAULT_EDIT_PLUS_MODEL,
            DEFAULT_MODEL_OF_FAMILY,
            DEFAULT_QWEN3_MODEL,
            editor_family,
            one_spelling,
        )
        from bridgecore.model.speed import default_steps, parse_loras, resolve_scheduler

        edit_model = edit_model or DEFAULT_MODEL_OF_FAMILY.get(editor) or (
            DEFAULT_EDIT_PLUS_MODEL if multi_image else DEFAULT_EDIT_MODEL)
        if settings.get("bridge"):
            settings["bridge"] = one_spelling(settings["bridge"])
        job = cls(one_spelling(qwen3_model or DEFAULT_QWEN3_MODEL), one_spelling(edit_model), editor=editor, **settings)
        job.check_editor()
        if steps is None:
            loras = parse_loras(list(job.lora))
            steps = 40 if job.native else default_steps(loras, resolve_scheduler(job.scheduler, loras))
        if (plus_model is None and plus_model_beside is not None and route_multi_image and job.family == "qwen-image-edit"
                and not job.lora):
            plus_model = plus_model_beside(edit_model)
        if plus_model == "none":  # said explicitly: multi-image samples fail alone, with the hint
            plus_model = None
        if plus_model is not None:
            plus_model = one_spelling(plus_model)
            if editor_family(plus_model) != "qwen-image-edit-plus":
                raise ValueError(f"plus_model {plus_model} is not an Edit-Plus pipeline")
            plus_model = plus_model if job.family == "qwen-image-edit" else None
        job = replace(job, steps=steps, plus_model=plus_model)
        job.check_editor()  # again: the Edit-Plus routing is checked too
        return job

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "JobSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown job settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def uses_cfg(self) -> bool:
        return self.cfg > 1

    def revision(self, model: str) -> str:
        from bridgecore.model.loading import model_revision

        return model_revision(model)

    def check_bridge_serves_plus(self) -> None:
        """A job whose multi-image samples go to the Edit-Plus `plus_model` can bridge them only with a bridge trained
        on that model's conditioning (the bridge records the Qwen2.5-VL model it was trained with): refused here,
        at planning, in one line, instead of failing those samples at the fused stage after dispatch."""
        if not self.plus_model or self.family != "qwen-image-edit":
            return
        from bridgecore.storage import read_uri

        trained_with = json.loads(read_uri(posixpath.join(str(self.bridge).rstrip("/"), "config.json"))).get(
            "qwen25_model_id")
        if trained_with and trained_with != self.plus_model:
            raise ValueError(f"the bridge {self.bridge} was trained on {trained_with}'s conditioning and cannot serve "
                             f"the multi-image samples, which go to the Edit-Plus model {self.plus_model}: run them as "
                             f"their own Edit-Plus job (with a bridge trained for it, or without {option('bridge')}), or "
                             f"pass {option('plus_model', 'none')} to let them fail alone")

    def check_references(self, count: int, edits: bool = True) -> None:
        """Samples with `count` reference pictures (read by Qwen3-VL only) need a bridge trained for that many to
        reach an edit (a pipeline that `edits`): refused here, at planning, in one line. Caches and training data take
        them as they are."""
        if count == 0 or not edits:
            return
        if self.native:
            raise ValueError("reference_images are read by Qwen3-VL through the bridge; Qwen-Image-2.1 has no bridge: "
                             "give them as condition images instead, or use the Qwen-Image-Edit family with a bridge "
                             "trained for reference pictures")
        if not self.bridge:
            raise ValueError(f"the manifest gives reference_images (up to {count} per sample): only Qwen3-VL reads them, "
                             f"and without {option('bridge')} the edit model never sees them; give a bridge trained on "
                             "samples with reference pictures (vision-bridge train), or drop the column")
        from bridgecore.storage import read_uri

        trained = json.loads(read_uri(posixpath.join(str(self.bridge).rstrip("/"), "config.json"))).get("reference_images", 0)
        if count > trained:
            raise ValueError(f"the manifest gives up to {count} reference picture(s) per sample, but the bridge "
                             f"{self.bridge} was trained with {trained or 'none'}: it cannot carry them into the edit; "
                             "train one on samples with reference pictures (vision-bridge train)")

    def check_bridge_levels(self) -> None:
        """A bridge that reads DeepStack taps needs caches that keep them: refused at planning, in one line."""
        if not self.bridge or self.cache_deepstack:
            return
        from bridgecore.storage import read_uri

        if json.loads(read_uri(posixpath.join(str(self.bridge).rstrip("/"), "config.json"))).get("use_deepstack"):
            raise ValueError(f"the bridge {self.bridge} reads Qwen3-VL's DeepStack taps, which these caches do not "
                             f"keep: add {option('cache_deepstack')} (the caches are extracted again, with them)")

    @property
    def rewrites(self) -> bool:
        """Whether the edits read a rewritten instruction (stage `rewrites`)."""
        return self.rewrite_with != "none"

    @property
    def rewrite_prompt(self) -> str:
        """The rewriter's system prompt: the job's, else `rewrite.SYSTEM_PROMPT`."""
        return self.rewrite_system_prompt or SYSTEM_PROMPT

    def rewrite_record(self) -> dict[str, Any]:
        """What a rewrite depends on: for qwen3 the model, its revision, the system prompt and the decoding."""
        if self.rewrite_with != "qwen3":
            return {"rewrite_with": self.rewrite_with}
        return {"rewrite_with": "qwen3", "qwen3_model": self.qwen3_model, "qwen3_revision": self.revision(self.qwen3_model),
                "system_prompt": self.rewrite_prompt,
                "decoding": {"greedy": True, "max_new_tokens": self.rewrite_max_tokens}}

    @property
    def bridge_checksum(self) -> str:
        return bridge_checksum(self.bridge)

    def plus_record(self) -> dict[str, str]:
        """The Edit-Plus routing model and its revision, for the fingerprints of the stages it runs in (empty
        when there is none, so jobs without it keep their fingerprints)."""
        if not self.plus_model or self.family != "qwen-image-edit":
            return {}
        return {"plus_model": self.plus_model, "plus_revision": self.revision(self.plus_model)}

    @property
    def speed_fingerprint(self) -> str:
        """What the speed options change in the edits (LoRA contents and scales, the scheduler)."""
        from bridgecore.model.speed import output_fingerprint, parse_loras, resolve_scheduler

        loras = parse_loras(list(self.lora))
        return output_fingerprint(loras, resolve_scheduler(self.scheduler, loras))


JOB_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(JobSettings) if f.default is not MISSING}


def settings_for_job(parameters: dict[str, Any], route_multi_image: bool = True,
                     plus_model_beside=None) -> JobSettings:
    """`JobSettings.for_job` from a job's parameters as the flows and their deployments name them (`qwen3` for
    the Qwen3-VL model, `lora` a list): the one path from a job to its settings."""
    arguments = dict(parameters)
    arguments["qwen3_model"] = arguments.pop("qwen3", None)
    arguments["lora"] = tuple(arguments.get("lora") or ())
    return JobSettings.for_job(**arguments, route_multi_image=route_multi_image, plus_model_beside=plus_model_beside)
