"""The models of a run: built once per job settings and kept resident across shards (`ModelPool`).

How a pool builds an editor decides what the edits are: every stage that runs a model through the pool has this
module in its code fingerprint (see `code_version.py`), so a change to what reaches `EnhancedQwenImageEdit`
recomputes what it affects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridgecore.batch.settings import JobSettings


COUNTS = ("qwen21_encodes", "qwen21_edits", "qwen21_encoder_loads", "qwen21_pipeline_loads", "vlm_forwards",
          "qwen3_rewrites", "dit_calls", "qwen3_loads", "qwen25_loads", "pipeline_loads")


class LoadedModels:
    """The models a run has built, by what determines them (model, revision, bridge, placement, speed options).
    Owned by whoever runs: `run_pipeline` makes one per call unless given one (a test, or training after its
    data preparation, shares one so that nothing loads twice)."""

    def __init__(self):
        self.editors: dict[tuple, Any] = {}
        self.natives: dict[tuple, Any] = {}

    @property
    def counts(self) -> dict[str, int]:
        """Model forwards and loads so far, summed over the models: proves what cached work skipped."""
        totals = dict.fromkeys(COUNTS, 0)
        for model in (*self.editors.values(), *self.natives.values()):
            for name, value in model.counts.items():
                totals[name] += value
        return totals


class ModelPool:
    """The models of one job's settings, drawn from `loaded`: each loads on first use and stays resident across
    shards (and across the stages that share it) until `release` frees it."""

    def __init__(self, settings: JobSettings, loaded: LoadedModels | None = None):
        self.settings = settings
        self.loaded = loaded if loaded is not None else LoadedModels()

    @property
    def counts(self) -> dict[str, int]:
        return self.loaded.counts

    @property
    def editor(self):
        """The `EnhancedQwenImageEdit` for these settings (its VLMs, bridge and pipeline load lazily)."""
        return self._editor(self.settings.edit_model)

    def _editor(self, edit_model: str):
        from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit

        s = self.settings
        key = (edit_model, s.revision(edit_model), s.qwen3_model, s.revision(s.qwen3_model), s.bridge_checksum,
               s.device, s.condition_area, s.load_in_8bit, s.lora, s.scheduler, s.compile, s.attention_backend,
               s.dit_offload, s.step_cache, s.batch_cfg, s.fp8, s.qwen3_area)
        if key not in self.loaded.editors:
            self.loaded.editors[key] = EnhancedQwenImageEdit(
                edit_model, s.qwen3_model, bridge=s.bridge, device=s.device, condition_area=s.condition_area,
                load_in_8bit=s.load_in_8bit, lora=list(s.lora) or None, scheduler=s.scheduler, compile=s.compile,
                attention_backend=s.attention_backend, dit_offload=s.dit_offload, step_cache=s.step_cache,
                batch_cfg=s.batch_cfg, fp8=s.fp8, qwen3_area=s.qwen3_area)
        return self.loaded.editors[key]

    @property
    def plus_editor(self):
        """The Edit-Plus `plus_model`'s editor (None without one)."""
        return self._editor(self.settings.plus_model) if self.settings.plus_model else None

    def editor_for(self, sample):
        """The editor that can take this sample: the Edit-Plus `plus_model` for a multi-image sample when the
        job's edit model takes one image, else the job's editor."""
        if len(sample.images) > 1 and self.settings.plus_model and not self.editor.plus:
            return self.plus_editor
        return self.editor

    def routes_to_plus(self, sample) -> bool:
        """Whether this sample goes to the Edit-Plus `plus_model` (a stage batches such samples together)."""
        return bool(self.settings.plus_model) and self.editor_for(sample) is not self.editor

    def use(self, editor, kinds: tuple[str, ...]) -> None:
        """Keeps one editor's models of these kinds ('vlm', 'dit') resident: a mixed job has two editors (Edit and
        Edit-Plus), and two DiTs or two VLM pairs do not fit one GPU. Samples are batched by route (see
        `Stage.group_key`), so a shard swaps at most once per stage."""
        if not self.settings.plus_model:
            return
        for other in (self.editor, self.plus_editor):
            if other is not editor:
                if "vlm" in kinds:
                    other.extractor.unload()
                if "dit" in kinds:
                    other.unload_pipeline()

    def route(self, items: list) -> list[tuple[Any, list]]:
        """Items (anything with `.sample`, or (item, images) pairs) grouped by `editor_for`, in first-seen order."""
        groups: dict[int, tuple[Any, list]] = {}
        for entry in items:
            item = entry[0] if isinstance(entry, tuple) else entry
            editor = self.editor_for(item.sample)
            groups.setdefault(id(editor), (editor, []))[1].append(entry)
        return list(groups.values())

    @property
    def extractor(self):
        return self.editor.extractor

    @property
    def native(self):
        """The `NativeQwenImage21` for these settings (its text encoder and DiT load separately, lazily)."""
        from bridgecore.model.native21 import NativeQwenImage21

        s = self.settings
        key = (s.edit_model, s.revision(s.edit_model), s.device, s.condition_area, s.load_in_8bit)
        if key not in self.loaded.natives:
            self.loaded.natives[key] = NativeQwenImage21(s.edit_model, device=s.device,
                                                         condition_area=s.condition_area, load_in_8bit=s.load_in_8bit)
        return self.loaded.natives[key]

    def release(self, keep: tuple[str, ...]) -> None:
        """Frees the large models a coming stage does not use ('vlm', 'dit'), so one GPU holds one kind."""
        for editor in self.loaded.editors.values():
            if "vlm" not in keep:
                editor.extractor.unload()
            if "dit" not in keep:
                editor.unload_pipeline()
        for native in self.loaded.natives.values():
            if "vlm" not in keep:
                native.unload_encoder()
            if "dit" not in keep:
                native.unload_pipeline()
