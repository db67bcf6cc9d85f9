"""Capability evaluation over a benchmark folder: per-sample scores, bootstrap CIs, paired comparisons.

    evaluator = CapabilityEvaluator("bench/", editor=reference_editor("oracle"))
    summary = evaluator.evaluate_all()        # {"ocr": {...}, "spatial": {...}, "detail": {...}, "multi_image": {...}}

An editor is `f(row, sources, target) -> PIL.Image | None`: the reference editors (`oracle` returns the
target, `identity` the input, `noise` noise) let users trust the metrics; `results_editor(RUN)` reads
a `bulk-edit` run's outputs. A missing edit (the run failed or skipped the sample) scores as a failed one in
its arm's summary, is counted there (`missing`), and is left out of paired comparisons.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from bridgecore.evaluation.metrics import score_sample
from bridgecore.stats import bootstrap_ci  # noqa: F401 - part of this module's API (scores with CIs)
from bridgecore.model.images import load_image

logger = logging.getLogger(__name__)

Editor = Callable[[dict, list, Image.Image], "Image.Image | None"]
# Per capability: (summary name, per-sample field); the first is the capability's headline.
SUMMARY_FIELDS = {
    "ocr": [("exact_match", "exact_match"), ("cer", "cer"), ("ned", "ned"), ("source_residue", "source_residue"),
            ("preservation_psnr", "preservation_psnr")],
    "spatial": [("direction_accuracy", "direction_correct"), ("position_error", "position_error"),
                ("unmoved_iou", "unmoved_iou")],
    "detail": [("edit_success", "edit_success"), ("ssim_outside", "ssim_outside"), ("psnr_outside", "psnr_outside"),
               ("small_object_survival", "small_object_survival")],
    "multi_image": [("consistency", "consistency"), ("object_iou", "object_iou"), ("background_psnr", "background_psnr")],
}
# What a missing edit scores: the worst value of each metric.
WORST = {"exact_match": 0.0, "cer": 1.0, "ned": 1.0, "source_residue": 0.0, "preservation_psnr": 0.0,
         "direction_correct": 0.0, "position_error": 1.0, "unmoved_iou": 0.0, "ssim_outside": 0.0, "psnr_outside": 0.0,
         "small_object_survival": 0.0, "edit_success": 0.0, "consistency": 0.0, "object_iou": 0.0,
         "background_psnr": 0.0}


def reference_editor(name: str) -> Editor:
    """`oracle` (the ground truth), `identity` (the input, unchanged) or `noise` (uniform noise)."""
    if name == "oracle":
        return lambda row, sources, target: target
    if name == "identity":
        return lambda row, sources, target: sources[0]
    if name == "noise":
        def noise(row, sources, target):
            rng = np.random.default_rng(abs(hash(row["id"])) % 2**32)
            return Image.fromarray(rng.integers(0, 256, size=(target.height, target.width, 3), dtype=np.uint8))
        return noise
    raise ValueError(f"editor must be oracle, identity or noise; got {name!r}")


def results_editor(run: str) -> Editor:
    """The edits of a `bulk-edit` run (local dir or URL), looked up by sample id in its summary."""
    import pyarrow.parquet as pq

    from bridgecore.storage import Storage

    storage = Storage(run)
    if not storage.exists("summary.parquet"):
        raise ValueError(f"{run}: no summary.parquet; is this a bulk-edit output?")
    rows = pq.read_table(io.BytesIO(storage.read_bytes("summary.parquet"))).to_pylist()
    outputs = {row["id"]: row["output"] for row in rows if row.get("status") == "done" and row.get("output")}

    def edited(row, sources, target):
        uri = outputs.get(row["id"])
        return load_image(uri) if uri else None
    # the rewrite arm's rewritten instructions, for the report to show under its pictures
    edited.rewrites = {row["id"]: row["rewrite"] for row in rows if row.get("rewrite")}
    return edited


class CapabilityEvaluator:
    """Scores an editor on a benchmark written by `make_benchmark`."""

    def __init__(self, benchmark_dir: str | Path, editor: Editor | None = None, seed: int = 0):
        self.root = Path(benchmark_dir)
        manifest = self.root / "manifest.jsonl"
        if not manifest.exists():
            raise ValueError(f"{self.root}: no manifest.jsonl; write one with `vision-bridge make-benchmark`")
        self.rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.editor = editor or reference_editor("identity")
        self.seed = seed
        self.per_sample: list[dict] = []

    def _score(self, capability: str) -> list[dict]:
        scored = []
        for row in (r for r in self.rows if r["capability"] == capability):
            sources = [load_image(self.root / name) for name in (row.get("images") or [row["image"]])]
            target = load_image(self.root / row["target"])
            edited = self.editor(row, sources, target)
            scores = score_sample(row, edited, sources, target) if edited is not None else {
                field: WORST[field] for _, field in SUMMARY_FIELDS[capability]} | {"edit_success": 0.0}
            scored.append({"id": row["id"], "capability": capability, "missing": edited is None,
                           "language": row.get("language"), **scores})
        self.per_sample = [s for s in self.per_sample if s["capability"] != capability] + scored
        return scored

    def _summarise(self, capability: str, scored: list[dict]) -> dict[str, Any]:
        summary: dict[str, Any] = {"count": len(scored), "missing": sum(s["missing"] for s in scored)}
        for name, field in SUMMARY_FIELDS[capability]:
            values = [s[field] for s in scored]
            summary[name] = float(np.mean(values)) if values else float("nan")
            summary[f"{name}_ci"] = list(bootstrap_ci(values, seed=self.seed))
        return summary

    def evaluate_ocr_capability(self) -> dict:
        scored = self._score("ocr")
        summary = self._summarise("ocr", scored)
        languages = sorted({s["language"] for s in scored})
        summary["per_language"] = {
            lang: {"count": len(group), "exact_match": float(np.mean([s["exact_match"] for s in group])),
                   "cer": float(np.mean([s["cer"] for s in group]))}
            for lang in languages for group in [[s for s in scored if s["language"] == lang]]}
        return summary

    def evaluate_spatial_reasoning(self) -> dict:
        return self._summarise("spatial", self._score("spatial"))

    def evaluate_detail_preservation(self) -> dict:
        return self._summarise("detail", self._score("detail"))

    def evaluate_multi_image_consistency(self) -> dict:
        return self._summarise("multi_image", self._score("multi_image"))

    def evaluate_all(self) -> dict:
        return {"ocr": self.evaluate_ocr_capability(), "spatial": self.evaluate_spatial_reasoning(),
                "detail": self.evaluate_detail_preservation(),
                "multi_image": self.evaluate_multi_image_consistency()}

    def write_per_sample(self, path: str | Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(self.per_sample), path)


def paired_comparison(baseline: list[dict], enhanced: list[dict], seed: int = 0) -> dict[str, dict]:
    """Per capability and metric: mean(enhanced - baseline) over the same samples, with a bootstrap CI.

    A sample whose edit is missing in either arm is left out of the pairs (`excluded_missing` counts them): a
    missing edit scores as a failure in each arm's own summary, but differencing a failure-by-absence with a real
    edit would measure the outage, not the method."""
    by_id = {s["id"]: s for s in baseline}
    result: dict[str, dict] = {}
    for capability, fields in SUMMARY_FIELDS.items():
        both = [(by_id[s["id"]], s) for s in enhanced if s["capability"] == capability and s["id"] in by_id]
        pairs = [(b, e) for b, e in both if not b.get("missing") and not e.get("missing")]
        result[capability] = {"count": len(pairs), "excluded_missing": len(both) - len(pairs)}
        for name, field in fields:
            diffs = [e[field] - b[field] for b, e in pairs]
            result[capability][name] = {"difference": float(np.mean(diffs)) if diffs else float("nan"),
                                        "ci": list(bootstrap_ci(diffs, seed=seed))}
    return result


def arm_comparisons(per_sample: dict[str, list[dict]], seed: int = 0) -> dict[str, dict]:
    """Every pair of arms (in the given order): `"B - A"` -> `paired_comparison(A, B)`, same samples and seeds."""
    names = list(per_sample)
    return {f"{b} - {a}": paired_comparison(per_sample[a], per_sample[b], seed)
            for i, a in enumerate(names) for b in names[i + 1:]}


def arm_name(run: str) -> str:
    """A readable arm name from a run's summary: the editor family, whether the instruction was rewritten and
    whether the bridge was on (Edit, Edit+bridge, Edit+rewrite, Edit+rewrite+bridge, Qwen-Image-2.1)."""
    from bridgecore.storage import Storage

    try:
        settings = json.loads(Storage(run).read_bytes("summary.json")).get("settings", {})
    except (FileNotFoundError, ValueError):
        return run.rstrip("/").rsplit("/", 1)[-1]
    return arm_label(settings)


def arm_label(settings: dict, look_up: bool = True) -> str:
    """The arm a job's settings (or a flow's parameters) make: Edit, Edit+bridge, Edit+rewrite, ..., Qwen-Image-2.1.
    With `look_up`, an `auto` editor's family is read from the model's config where it is available; without, the
    model's name decides (no file or network access: for naming a run before it starts)."""
    family = settings.get("editor") or "auto"
    if family == "auto" and not (look_up and settings.get("edit_model")):
        family = "qwen-image-2.1" if "2.1" in str(settings.get("edit_model") or "") else "qwen-image-edit"
    if family == "auto":
        from bridgecore.model.loading import ModelNotAvailableError, editor_family

        try:
            family = editor_family(settings["edit_model"])
        except (KeyError, ValueError, ModelNotAvailableError):  # the model is not on this machine: its name decides
            family = "qwen-image-2.1" if "2.1" in str(settings.get("edit_model", "")) else "qwen-image-edit"
    if family == "qwen-image-2.1":
        return "Qwen-Image-2.1"
    rewrite = {"qwen3": "+rewrite", "identity": "+rewrite(identity)"}.get(settings.get("rewrite_with") or "none", "")
    return "Edit" + rewrite + ("+bridge" if settings.get("bridge") else "")


# -- reading ability of the encoders themselves (the seed's "text detection" claim, without the DiT) ----

READ_PROMPT = "Read the text in the image. Answer with the text only."


def _generate_text(model, processor, image: Image.Image, max_new_tokens: int) -> str:
    import torch

    from bridgecore.model.chat_templates import QWEN25_VL_CHAT_TEMPLATE

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": READ_PROMPT}]}]
    template = processor.chat_template or QWEN25_VL_CHAT_TEMPLATE
    text = processor.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def encoder_reading(benchmark_dir: str | Path, extractor, max_new_tokens: int = 24) -> dict[str, dict]:
    """Character error rate of Qwen2.5-VL (Qwen-Image-Edit's encoder) and Qwen3-VL reading each OCR card,
    per model and language (greedy decoding)."""
    from bridgecore.evaluation.metrics import levenshtein, normalise_text

    root = Path(benchmark_dir)
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if line]
    qwen25 = extractor.qwen25_encoder
    models = {"qwen25_vl": (qwen25.text_encoder, qwen25.processor), "qwen3_vl": extractor.qwen3}
    result: dict[str, dict] = {name: {} for name in models}
    for row in (r for r in rows if r["capability"] == "ocr"):
        image = load_image(root / row["image"])
        truth = normalise_text(row["source_text"])
        for name, (model, processor) in models.items():
            read = normalise_text(_generate_text(model, processor, image, max_new_tokens))
            per_language = result[name].setdefault(row["language"], [])
            per_language.append(levenshtein(read, truth) / max(1, len(truth)))
    return {name: {"cer": float(np.mean([v for values in langs.values() for v in values])) if langs else float("nan"),
                   "per_language_cer": {lang: float(np.mean(values)) for lang, values in langs.items()}}
            for name, langs in result.items()}
