"""The mechanism proof: does the bridge move what only Qwen3-VL read *or saw* into the DiT, without costing
ordinary edits?

Two tiny tasks on the trained tiny edit model (`tiny_edit_model.py`), each trained with the project's own
trainer and loss (DiT, VAE and both VLMs frozen), each beside a control trained the same way on Qwen3 caches
re-paired with other samples at every step (`ablate_qwen3="shuffle"`):

- **read** (words): "Make the <shape> <colour>" with the colour word removed from what Qwen2.5-VL (the DiT's
  own encoder) reads, while Qwen3-VL reads the instruction, worded by one of `TRAINING_TEMPLATES`. In two phases:
  the bridge first forms on those examples alone, then (from `no_harm_from` of the steps) half the examples
  (`full_share`) also give Qwen2.5-VL the full instruction: it learns to add nothing where the DiT's own encoder
  already knows the answer. Mixed from the first step, the same bridge failed to form on a seed in two (follow
  17% and 49% on seeds 0-1; 19% even at twice the steps): early on, the full-instruction examples only ever see
  the still-random token as harm and push it toward silence.
- **saw** (pixels): one instruction for every colour, "Make the <shape> the colour of the reference", and a
  swatch picture that only Qwen3-VL sees (not Qwen2.5-VL, not the VAE). The colour exists only in those pixels.

Measured per seed, on held-out pictures:

- follow rate (counterfactual): Qwen3-VL reads every colour word (read) or sees every swatch (saw) in turn,
  Qwen2.5-VL's input unchanged; how often the decoded colour is that colour (guessing: 1 in 6);
- unseen phrasings: the same with `HELDOUT_TEMPLATES`, never trained on, with the colour word after a space and
  glued to punctuation (other tokens);
- no harm (paired): Edit vs Edit+bridge with *both* encoders reading the full instruction, same pictures, noise
  and colours: the difference in follow rate (bootstrap over pictures; t over seeds) and in edit success;
- fraction captured = (L_control - L_bridge) / (L_control - L_reference), held-out flow-matching losses;
- for the saw task, which Qwen3 features carry the swatch: follow with each level zeroed, with the text /
  vision / reference positions zeroed, and a second bridge that also reads the DeepStack taps.

A seed "formed" when its follow rate is at least `formed_threshold`. Intervals over seeds are Student t (the seed
count printed): a bootstrap over three seeds cannot put its lower bound below the worst seed.

    python bench/prove_bridge_information.py [--quick] [--workers 2]      # tables + one JSON line
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from bridgecore.model.bridge import BridgeConfig, VisionCacheBridge, identity_bridge, negative_prompt_embeds
from bridgecore.model.cache_format import SampleCache
from bridgecore.model.edit_prompt import condition_size
from bridgecore.model.latents import encode_latents
from bridgecore.stats import bootstrap_ci
from bridgecore.training.examples import TrainingExample
from bridgecore.training.trainer import BridgeTrainer, TrainConfig, without_level, without_positions
from bridgecore.zoo.synthetic_triplets import (
    CANONICAL_TEMPLATE,
    COLOURS,
    HELDOUT_TEMPLATES,
    TRAINING_TEMPLATES,
    Triplet,
    edit_success,
    make_reference_triplets,
    make_triplets,
    nearest_colour,
    shape_mask,
)

logger = logging.getLogger(__name__)

CHANGE_THRESHOLD = 2  # an edit "changed" when some pixel moved by more than this (of 255): not rounding noise
DECODE_CHUNK = 48  # edits per DiT call: bounded memory


@dataclass
class ProofConfig:
    seeds: tuple[int, ...] = tuple(range(10))
    design: str = "both"  # the bridge's mode
    overrides: dict = field(default_factory=dict)  # extra BridgeConfig fields for every bridge
    train_samples: int = 512
    heldout_samples: int = 64
    steps: int = 1500
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    lr_schedule: str = "constant"  # or "cosine" over the whole run (both phases), see TrainConfig
    heldout_repeats: int = 4
    full_share: float = 0.5  # share of the read task's training examples where Qwen2.5-VL reads the full instruction
    no_harm_from: float = 0.5  # the full-instruction examples join after this fraction of the steps (form first)
    templates: tuple[str, ...] = TRAINING_TEMPLATES  # how the read task's instructions are worded for Qwen3-VL
    counterfactual_images: int = 16  # held-out pictures x every colour, per condition
    noharm_images: int = 64  # held-out pictures x every colour, both encoders reading the full instruction
    template_images: int = 8  # held-out pictures x every colour, per held-out template
    saw: bool = True  # the reference-picture task
    saw_deepstack: bool = True  # also train a saw bridge that reads the DeepStack taps (ablation) ...
    deepstack_seeds: int = 3  # ... on the first this-many seeds
    ablation_images: int = 8  # held-out pictures x every colour, per ablation of the saw bridge
    inference_steps: int = 20
    extract_batch_size: int = 32
    formed_threshold: float = 0.7
    reuse: bool = False  # take a bridge already trained in the work folder with these settings (re-decoding only)
    cache_dtype: str = "native"  # "fp8"/"int8": every cache goes through that storage before training and evaluation
    qwen3_area: int | None = None  # Qwen3-VL's view of the condition image in pixels, when smaller (the job setting)


# What --quick can show in under 10 minutes on 2 idle cores (2 workers): the whole path on two seeds, shorter
# training, fewer pictures. Two seeds give an interval, but a wide one; whether every seed forms, it cannot say.
QUICK = ProofConfig(seeds=(0, 1), train_samples=256, heldout_samples=32, steps=800, counterfactual_images=8,
                    noharm_images=16, template_images=4, saw_deepstack=False, ablation_images=4, inference_steps=10)


# -- data ------------------------------------------------------------------------------------------------


def as_stored(qwen3s: list, qwen25s: list, cache_dtype: str) -> tuple[list, list]:
    """The caches as a job storing them in `cache_dtype` would read them back (fp8/int8: quantized and dequantized)."""
    if cache_dtype == "native":
        return qwen3s, qwen25s
    from bridgecore.model.cache_format import cache_from_bytes, cache_to_bytes

    back = [cache_from_bytes(cache_to_bytes(SampleCache(q3, q25, "", []), cache_dtype)) for q3, q25 in zip(qwen3s, qwen25s)]
    return [b.qwen3 for b in back], [b.qwen25 for b in back]


def _latents(editor, triplet: Triplet) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    width, height = condition_size(triplet.source, editor.condition_area)
    return (encode_latents(editor.pipe, triplet.source, width, height),
            encode_latents(editor.pipe, triplet.target, width, height), (height // 16, width // 16))


@torch.no_grad()
def colour_examples(editor, triplets: list[Triplet], prefix: str, batch_size: int = 32,
                    templates: tuple[str, ...] = (CANONICAL_TEMPLATE,), seed: int = 0, cache_dtype: str = "native"):
    """The read task's examples: Qwen3-VL reads the instruction worded by a template drawn per picture (seeded);
    Qwen2.5-VL reads it without the colour (`redacted`) or in the canonical wording (`full`, same key + "-full").
    Returns (redacted, full), one of each per picture, sharing latents."""
    extractor, redacted, full = editor.extractor, [], []
    rng = random.Random(seed)
    for start in range(0, len(triplets), batch_size):
        chunk = triplets[start:start + batch_size]
        images = [[t.source] for t in chunk]
        qwen3 = extractor.extract_qwen3_vision(images, [t.phrased(rng.choice(templates)) for t in chunk])
        hidden = extractor.extract_qwen25_vision(images, [t.instruction_without_colour() for t in chunk])
        told = extractor.extract_qwen25_vision(images, [t.phrased(CANONICAL_TEMPLATE) for t in chunk])
        qwen3, hidden = as_stored(qwen3, hidden, cache_dtype)
        told = as_stored(qwen3, told, cache_dtype)[1]
        for offset, triplet in enumerate(chunk):
            key = f"{prefix}-{start + offset:05d}"
            condition, target, latent_hw = _latents(editor, triplet)
            for kind, qwen25, out in (("", hidden[offset], redacted), ("-full", told[offset], full)):
                cache = SampleCache(qwen3[offset], qwen25, triplet.instruction, [triplet.source.size])
                out.append(TrainingExample(key + kind, cache, condition, target, latent_hw))
    return redacted, full


def redacted_examples(editor, triplets: list[Triplet], prefix: str, batch_size: int = 32):
    """Examples whose Qwen2.5 cache saw the instruction without its colour word and whose Qwen3 cache saw it in
    full; plus, per key, the Qwen2.5 cache of the full instruction (the reference row)."""
    redacted, full = colour_examples(editor, triplets, prefix, batch_size)
    return redacted, {e.key: f.cache.qwen25 for e, f in zip(redacted, full)}


@torch.no_grad()
def reference_examples(editor, triplets: list[Triplet], prefix: str, batch_size: int = 32, cache_dtype: str = "native"):
    """The saw task's examples: both encoders read the same instruction (no colour), Qwen3-VL also sees the swatch.
    Returns (examples, told): `told` has Qwen2.5-VL read the colour in words (the reference condition)."""
    extractor, examples, told = editor.extractor, [], []
    for start in range(0, len(triplets), batch_size):
        chunk = triplets[start:start + batch_size]
        images = [[t.source] for t in chunk]
        prompts = [t.instruction for t in chunk]
        qwen3 = extractor.extract_qwen3_vision(images, prompts, references=[list(t.references) for t in chunk])
        task = extractor.extract_qwen25_vision(images, prompts)
        words = extractor.extract_qwen25_vision(images, [t.phrased(CANONICAL_TEMPLATE) for t in chunk])
        qwen3, task = as_stored(qwen3, task, cache_dtype)
        words = as_stored(qwen3, words, cache_dtype)[1]
        for offset, triplet in enumerate(chunk):
            key = f"{prefix}-{start + offset:05d}"
            condition, target, latent_hw = _latents(editor, triplet)
            for qwen25, out in ((task[offset], examples), (words[offset], told)):
                out.append(TrainingExample(key, SampleCache(qwen3[offset], qwen25, triplet.instruction,
                                                            [triplet.source.size]), condition, target, latent_hw))
    return examples, told


def painted_colour(triplet: Triplet, edited) -> str:
    """The palette colour nearest to the mean inside the named shape of a decoded edit."""
    pixels = np.asarray(edited.convert("RGB").resize(triplet.source.size), dtype=np.float64)
    box = triplet.shapes[triplet.shape][1]
    return nearest_colour(pixels[shape_mask(triplet.shape, box, pixels.shape[0])].mean(axis=0))


# -- decoding every colour ------------------------------------------------------------------------------


@dataclass
class Sweep:
    """Held-out pictures, each with every colour: caches image-major, colours in `COLOURS` order."""

    triplets: list[Triplet]
    qwen3: list
    qwen25: dict[str, list]  # name -> caches (e.g. "hidden": no colour, "told": the colour in words)

    @property
    def colours(self) -> list[str]:
        return list(COLOURS)


@torch.no_grad()
def colour_sweep(editor, triplets: list[Triplet], template: str = CANONICAL_TEMPLATE, cache_dtype: str = "native") -> Sweep:
    """Qwen3-VL reads `template` with every colour; Qwen2.5-VL reads the instruction without the colour ("hidden")
    and with each colour in the canonical wording ("told")."""
    extractor, colours = editor.extractor, list(COLOURS)
    qwen3, hidden, told = [], [], []
    for triplet in triplets:
        images = [[triplet.source]] * len(colours)
        qwen3 += extractor.extract_qwen3_vision(images, [triplet.phrased(template, c) for c in colours])
        told += extractor.extract_qwen25_vision(images, [triplet.phrased(CANONICAL_TEMPLATE, c) for c in colours])
        hidden += extractor.extract_qwen25_vision([[triplet.source]], [triplet.instruction_without_colour()]) * len(colours)
    qwen3, hidden = as_stored(qwen3, hidden, cache_dtype)
    told = as_stored(qwen3, told, cache_dtype)[1]
    return Sweep(triplets, qwen3, {"hidden": hidden, "told": told})


@torch.no_grad()
def reference_sweep(editor, triplets: list[Triplet], seed: int = 0, cache_dtype: str = "native") -> Sweep:
    """Qwen3-VL sees a swatch of every colour in turn; Qwen2.5-VL reads the task's instruction ("task") or the colour
    in words ("told")."""
    extractor, colours = editor.extractor, list(COLOURS)
    qwen3, task, told = [], [], []
    for index, triplet in enumerate(triplets):
        images = [[triplet.source]] * len(colours)
        swatches = [[triplet.with_reference(c, seed * 1_000 + index)] for c in colours]
        qwen3 += extractor.extract_qwen3_vision(images, [triplet.instruction] * len(colours), references=swatches)
        task += extractor.extract_qwen25_vision([[triplet.source]], [triplet.instruction]) * len(colours)
        told += extractor.extract_qwen25_vision(images, [triplet.phrased(CANONICAL_TEMPLATE, c) for c in colours])
    qwen3, task = as_stored(qwen3, task, cache_dtype)
    told = as_stored(qwen3, told, cache_dtype)[1]
    return Sweep(triplets, qwen3, {"task": task, "told": told})


@torch.no_grad()
def decode_sweep(editor, sweep: Sweep, conditions: dict, steps: int, keep_images: bool = False) -> dict[str, dict]:
    """Decodes every (picture, colour) under each condition, all with the same noise seed per picture.

    Args:
        conditions: name -> (bridge or None, Qwen2.5 caches' name in `sweep.qwen25`, optional transform of the Qwen3
            caches, e.g. an ablation). None: Qwen-Image-Edit's own embeddings of those caches.
    Returns:
        name -> {"follow": [n_images x n_colours] bool, "changed": same (False at the picture's own colour),
        "success": [n_images] bool (the own colour's edit, both shapes checked)}, plus "images" with `keep_images`.
    """
    colours = sweep.colours
    rows = [(t, c) for t in sweep.triplets for c in colours]
    samples = [[t.source] for t, _ in rows]
    seeds = [1000 + i for i in range(len(sweep.triplets)) for _ in colours]
    results = {}
    for name, spec in conditions.items():
        bridge, qwen25_name, transform = (*spec, None)[:3]
        qwen25 = sweep.qwen25[qwen25_name]
        qwen3 = [transform(q) for q in sweep.qwen3] if transform else sweep.qwen3
        output = negative_prompt_embeds(qwen25) if bridge is None else bridge(qwen3, qwen25)
        edits = []
        for start in range(0, len(samples), DECODE_CHUNK):
            part = slice(start, start + DECODE_CHUNK)
            edits += editor.denoise(samples[part], output.prompt_embeds[part].detach(), output.prompt_embeds_mask[part],
                                    seeds[part], steps, 1.0, None, "pil")
        n = len(sweep.triplets)
        follow = np.array([painted_colour(t, e) == k for (t, k), e in zip(rows, edits)]).reshape(n, -1)
        arrays = [np.asarray(e.convert("RGB"), dtype=np.int16) for e in edits]
        changed = np.zeros_like(follow)
        success = np.zeros(n, dtype=bool)
        for i, triplet in enumerate(sweep.triplets):
            own = i * len(colours) + colours.index(triplet.colour)
            success[i] = edit_success(triplet, edits[own])
            for j in range(len(colours)):
                if j != colours.index(triplet.colour):
                    changed[i, j] = np.abs(arrays[i * len(colours) + j] - arrays[own]).max() > CHANGE_THRESHOLD
        results[name] = {"follow": follow, "changed": changed, "success": success,
                         **({"images": edits} if keep_images else {})}
    return results


def counterfactual_edits(editor, conditions: dict, examples: list[TrainingExample], triplets: dict[str, Triplet],
                         config: ProofConfig, keep_images: bool = False) -> dict[str, dict]:
    """The read task's counterfactual on the first `config.counterfactual_images` examples: Qwen3-VL reads every
    colour word, Qwen2.5-VL the instruction without it. `conditions`: name -> a bridge, or "baseline" / "reference"
    (the DiT's own encoder without / with the colour word)."""
    sweep = colour_sweep(editor, [triplets[e.key] for e in examples[: config.counterfactual_images]])
    specs = {name: (None, "hidden") if name == "baseline" else (None, "told") if name == "reference" else (bridge, "hidden")
             for name, bridge in conditions.items()}
    return decode_sweep(editor, sweep, specs, config.inference_steps, keep_images)


# -- one seed --------------------------------------------------------------------------------------------


def _train(editor, examples, heldout, work_dir: Path, name: str, config: ProofConfig, seed: int,
           ablate: str = "none", later: list | None = None, **bridge_fields):
    """A bridge trained with the project's trainer on `examples`; with `later`, those examples join for the steps
    after `config.no_harm_from` of them (the run resumes from its checkpoint on the larger set)."""
    first = examples[0].cache
    bridge_config = BridgeConfig.from_caches(first.qwen3, first.qwen25, mode=config.design,
                                             **{**config.overrides, **bridge_fields})
    switch = round(config.steps * config.no_harm_from) if later else config.steps
    phases = [(examples, switch)] + ([(examples + later, config.steps)] if later and switch < config.steps else [])
    if later and switch <= 0:
        phases = [(examples + later, config.steps)]
    import json
    import shutil

    def train_config(steps: int) -> TrainConfig:  # one phase; the schedule spans the whole run (config.steps)
        return TrainConfig(steps=steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
                           warmup_steps=config.warmup_steps, lr_schedule=config.lr_schedule, lr_decay_steps=config.steps,
                           eval_every=steps, checkpoint_every=steps, seed=seed, heldout_repeats=config.heldout_repeats,
                           gradient_checkpointing=False, ablate_qwen3=ablate)

    if config.reuse and (work_dir / name / "metrics.json").is_file():  # trained before: decode it again, do not retrain
        metrics = json.loads((work_dir / name / "metrics.json").read_text())
        if metrics.get("steps") == config.steps:
            trainer = BridgeTrainer(editor.pipe, examples, work_dir / name, train_config(config.steps), bridge_config,
                                    heldout=heldout)
            trainer.bridge.load_state_dict(VisionCacheBridge.from_pretrained(work_dir / name).state_dict())
            return trainer, metrics
    shutil.rmtree(work_dir / name, ignore_errors=True)  # the second phase resumes the latest checkpoint: only ours
    trainer, metrics = None, None
    for number, (data, steps) in enumerate(phases):
        trainer = BridgeTrainer(editor.pipe, data, work_dir / name, train_config(steps), bridge_config, heldout=heldout)
        metrics = trainer.train(resume=number > 0, progress=False)
    return trainer, metrics


def _rates(result: dict) -> dict:
    """Means of one condition's outcome arrays (changed: only where the colour differs from the picture's own)."""
    changed = result["changed"]
    return {"follow": float(result["follow"].mean()), "success": float(result["success"].mean()),
            "changed": float(changed.sum() / max(1, changed.size - changed.shape[0]))}


def run_read_task(editor, seed: int, config: ProofConfig, work_dir: Path, size: int, progress=None) -> dict:
    """The read task of one seed: the bridge and its control trained on the mixture; losses, follow, unseen
    templates, no harm."""
    triplets = make_triplets(config.train_samples + config.heldout_samples, size, seed=10_000 + seed)
    n_train = config.train_samples
    redacted, full = colour_examples(editor, triplets[:n_train], f"seed{seed}", config.extract_batch_size,
                                     config.templates, seed, config.cache_dtype)
    heldout, heldout_full = colour_examples(editor, triplets[n_train:], f"seed{seed}-heldout", config.extract_batch_size,
                                            cache_dtype=config.cache_dtype)
    extra_full = round(n_train * config.full_share / (1 - config.full_share)) if config.full_share < 1 else n_train
    chosen = sorted(random.Random(seed).sample(range(n_train), min(n_train, extra_full)))
    later = [full[i] for i in chosen]
    bridge, metrics = _train(editor, redacted, heldout, work_dir, f"seed{seed}-read", config, seed, later=later)
    control, control_metrics = _train(editor, redacted, heldout, work_dir, f"seed{seed}-read-control", config, seed,
                                      ablate="shuffle", later=later)
    if progress:
        progress(f"seed {seed}: read task trained")
    heldout_triplets = triplets[n_train:]
    losses = {"baseline": np.asarray(metrics["heldout_per_sample"]["baseline"]),
              "bridge": np.asarray(metrics["heldout_per_sample"]["trained"]),
              "bridge_qwen3_shuffled": np.asarray(metrics["heldout_per_sample"]["qwen3_shuffled"]),
              "control": np.asarray(control_metrics["heldout_per_sample"]["trained"]),
              "reference": bridge.heldout_losses(identity_bridge(bridge.bridge_config), examples=heldout_full)}
    steps = config.inference_steps
    model, shuffled = bridge.bridge.eval(), control.bridge.eval()
    sweep = colour_sweep(editor, heldout_triplets[: config.counterfactual_images], cache_dtype=config.cache_dtype)
    counterfactual = decode_sweep(editor, sweep, {"baseline": (None, "hidden"), "bridge": (model, "hidden"),
                                                  "control": (shuffled, "hidden"), "reference": (None, "told")}, steps)
    templates = {}
    for template in HELDOUT_TEMPLATES:
        unseen = colour_sweep(editor, heldout_triplets[: config.template_images], template, config.cache_dtype)
        templates[template] = decode_sweep(editor, unseen, {"bridge": (model, "hidden")}, steps)["bridge"]["follow"]
    noharm_sweep = colour_sweep(editor, heldout_triplets[: config.noharm_images], cache_dtype=config.cache_dtype)
    noharm = decode_sweep(editor, noharm_sweep, {"edit": (None, "told"), "bridge": (model, "told")}, steps)
    if progress:
        progress(f"seed {seed}: read task decoded")
    return {"losses": losses, "counterfactual": counterfactual, "templates": templates, "noharm": noharm,
            "level_zeroed": metrics["heldout_loss_level_zeroed"], "statistics": metrics["bridge_statistics"],
            "control_statistics": control_metrics["bridge_statistics"]}


def run_saw_task(editor, seed: int, config: ProofConfig, work_dir: Path, size: int, progress=None) -> dict:
    """The saw task of one seed: the bridge, its control (shuffled references) and optionally a DeepStack bridge;
    follow with every swatch, and the ablations of the bridge."""
    triplets = make_reference_triplets(config.train_samples + config.heldout_samples, size, seed=40_000 + seed)
    examples, told = reference_examples(editor, triplets, f"saw{seed}", config.extract_batch_size, config.cache_dtype)
    n_train = config.train_samples
    training, heldout = examples[:n_train], examples[n_train:]
    bridges = {}
    bridge, metrics = _train(editor, training, heldout, work_dir, f"seed{seed}-saw", config, seed, reference_images=1)
    control, control_metrics = _train(editor, training, heldout, work_dir, f"seed{seed}-saw-control", config, seed,
                                      ablate="shuffle", reference_images=1)
    bridges.update(bridge=bridge.bridge.eval(), control=control.bridge.eval())
    deepstack_metrics = None
    if config.saw_deepstack and seed in config.seeds[: config.deepstack_seeds]:
        deepstack, deepstack_metrics = _train(editor, training, heldout, work_dir, f"seed{seed}-saw-deepstack", config,
                                              seed, reference_images=1, use_deepstack=True)
        bridges["deepstack"] = deepstack.bridge.eval()
    if progress:
        progress(f"seed {seed}: saw task trained")
    heldout_triplets = triplets[n_train:]
    steps = config.inference_steps
    sweep = reference_sweep(editor, heldout_triplets[: config.counterfactual_images], seed, config.cache_dtype)
    conditions = {"baseline": (None, "task"), **{name: (b, "task") for name, b in bridges.items()},
                  "reference": (None, "told")}
    counterfactual = decode_sweep(editor, sweep, conditions, steps)
    small = Sweep(sweep.triplets[: config.ablation_images], sweep.qwen3[: config.ablation_images * len(COLOURS)],
                  {k: v[: config.ablation_images * len(COLOURS)] for k, v in sweep.qwen25.items()})
    ablations = {}
    for name, model in (("bridge", bridges["bridge"]), *((("deepstack", bridges["deepstack"]),) if "deepstack" in bridges else ())):
        specs = {f"{level} zeroed": (model, "task", lambda q, l=level: without_level(q, l)) for level in model.config.levels}
        if model.config.use_deepstack:
            specs["deepstack zeroed"] = (model, "task", lambda q: without_level(q, "deepstack"))
        specs.update({f"{where} positions zeroed": (model, "task", lambda q, w=where: without_positions(q, w))
                      for where in ("text", "vision", "reference")})
        ablations[name] = {k: float(v["follow"].mean()) for k, v in decode_sweep(editor, small, specs, steps).items()}
    if progress:
        progress(f"seed {seed}: saw task decoded")
    losses = {"baseline": np.asarray(metrics["heldout_per_sample"]["baseline"]),
              "bridge": np.asarray(metrics["heldout_per_sample"]["trained"]),
              "control": np.asarray(control_metrics["heldout_per_sample"]["trained"]),
              "reference": bridge.heldout_losses(identity_bridge(bridge.bridge_config), examples=told[n_train:])}
    if deepstack_metrics is not None:
        losses["deepstack"] = np.asarray(deepstack_metrics["heldout_per_sample"]["trained"])
    return {"losses": losses, "counterfactual": counterfactual, "ablations": ablations,
            "level_zeroed": metrics["heldout_loss_level_zeroed"]}


def run_seed(editor, seed: int, config: ProofConfig, work_dir: Path, image_size: int = 64, progress=None) -> dict:
    result = {"seed": seed, "read": run_read_task(editor, seed, config, work_dir, image_size, progress)}
    if config.saw:
        result["saw"] = run_saw_task(editor, seed, config, work_dir, image_size, progress)
    return result


# -- statistics ------------------------------------------------------------------------------------------


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean over seeds (NaN with fewer than two)."""
    from scipy.stats import t

    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float("nan"), float("nan")
    half = t.ppf((1 + level) / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean() - half), float(values.mean() + half)


def fraction_captured(losses: dict) -> float:
    """(L_control - L_bridge) / (L_control - L_reference), mean held-out losses of one seed."""
    control = losses["control"].mean()
    gap = control - losses["reference"].mean()
    return float((control - losses["bridge"].mean()) / gap) if gap > 0 else float("nan")


def paired_picture_bootstrap(per_seed: list[np.ndarray], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean paired difference, resampling pictures within each seed (each array:
    [n_pictures, ...] differences of one seed) and averaging the seeds."""
    rng = np.random.default_rng(seed)
    per_picture = [np.asarray(d, dtype=np.float64).reshape(len(d), -1).mean(axis=1) for d in per_seed]
    means = np.zeros(resamples)
    for values in per_picture:
        means += values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    means /= len(per_picture)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _over_seeds(values) -> dict:
    values = [float(v) for v in values]
    low, high = t_interval(values)
    return {"mean": float(np.mean(values)), "ci_low": low, "ci_high": high, "per_seed": values}


def summarize(results: list[dict], config: ProofConfig) -> dict:
    """The headline JSON: follow, no harm, formation, unseen phrasings, the saw task; intervals over seeds."""
    read = [r["read"] for r in results]
    follow = _over_seeds([_rates(r["counterfactual"]["bridge"])["follow"] for r in read])
    control = _over_seeds([_rates(r["counterfactual"]["control"])["follow"] for r in read])
    formed = [v >= config.formed_threshold for v in follow["per_seed"]]
    noharm_follow = [r["noharm"]["bridge"]["follow"].astype(float) - r["noharm"]["edit"]["follow"].astype(float) for r in read]
    noharm_success = [r["noharm"]["bridge"]["success"].astype(float) - r["noharm"]["edit"]["success"].astype(float) for r in read]
    noharm = _over_seeds([d.mean() for d in noharm_follow])
    boot_low, boot_high = paired_picture_bootstrap(noharm_follow)
    templates = {t: _over_seeds([r["templates"][t].mean() for r in read]) for t in HELDOUT_TEMPLATES}
    by_kind = {kind: float(np.mean([templates[t]["mean"] for t, k in HELDOUT_TEMPLATES.items() if k == kind]))
               for kind in ("space", "no space")}
    unseen = _over_seeds([np.mean([r["templates"][t].mean() for t in HELDOUT_TEMPLATES]) for r in read])
    summary = {
        "design": config.design,
        "seeds": len(results),
        "interval": "95% Student t over seeds" if len(results) > 1 else "one seed: no interval over seeds",
        "guessing": 1 / len(COLOURS),
        "follow_rate": follow["mean"], "follow_rate_ci": [follow["ci_low"], follow["ci_high"]],
        "follow_rate_per_seed": follow["per_seed"],
        "follow_rate_control": control["mean"], "follow_rate_control_ci": [control["ci_low"], control["ci_high"]],
        "follow_rate_baseline": float(np.mean([_rates(r["counterfactual"]["baseline"])["follow"] for r in read])),
        "follow_rate_reference": float(np.mean([_rates(r["counterfactual"]["reference"])["follow"] for r in read])),
        "changed_rate": float(np.mean([_rates(r["counterfactual"]["bridge"])["changed"] for r in read])),
        "changed_rate_control": float(np.mean([_rates(r["counterfactual"]["control"])["changed"] for r in read])),
        "edit_success": {name: float(np.mean([_rates(r["counterfactual"][name])["success"] for r in read]))
                         for name in ("baseline", "bridge", "control", "reference")},
        "seeds_formed": int(sum(formed)),
        "formed_threshold": config.formed_threshold,
        "no_harm_difference": noharm["mean"],
        "no_harm_difference_ci_low": boot_low, "no_harm_difference_ci_high": boot_high,
        "no_harm_interval": "bootstrap over pictures (within seeds), 95%",
        "no_harm_difference_seed_ci": [noharm["ci_low"], noharm["ci_high"]],
        "no_harm_difference_per_seed": noharm["per_seed"],
        "no_harm_follow_edit": float(np.mean([r["noharm"]["edit"]["follow"].mean() for r in read])),
        "no_harm_follow_bridge": float(np.mean([r["noharm"]["bridge"]["follow"].mean() for r in read])),
        "no_harm_success_edit": float(np.mean([r["noharm"]["edit"]["success"].mean() for r in read])),
        "no_harm_success_bridge": float(np.mean([r["noharm"]["bridge"]["success"].mean() for r in read])),
        "no_harm_success_difference": float(np.mean([d.mean() for d in noharm_success])),
        "no_harm_pictures": int(len(read[0]["noharm"]["edit"]["success"])),
        "follow_rate_unseen_templates": unseen["mean"],
        "follow_rate_unseen_templates_ci": [unseen["ci_low"], unseen["ci_high"]],
        "follow_rate_unseen_templates_by_tokenisation": by_kind,
        "follow_rate_per_unseen_template": {t: v["mean"] for t, v in templates.items()},
        "fraction_captured": _over_seeds([fraction_captured(r["losses"]) for r in read]),
        "level_zeroed_loss": {level: float(np.mean([r["level_zeroed"][level] for r in read])) for level in read[0]["level_zeroed"]},
        "heldout_samples": int(len(read[0]["losses"]["baseline"])),
        "counterfactual_edits_per_condition": int(np.size(read[0]["counterfactual"]["bridge"]["follow"]) * len(results)),
        "config": asdict(config),
    }
    if config.saw:
        saw = [r["saw"] for r in results]
        vision = _over_seeds([_rates(r["counterfactual"]["bridge"])["follow"] for r in saw])
        vision_control = _over_seeds([_rates(r["counterfactual"]["control"])["follow"] for r in saw])
        summary.update({
            "vision_follow_rate": vision["mean"], "vision_follow_rate_ci": [vision["ci_low"], vision["ci_high"]],
            "vision_follow_rate_per_seed": vision["per_seed"],
            "vision_follow_rate_control": vision_control["mean"],
            "vision_follow_rate_control_ci": [vision_control["ci_low"], vision_control["ci_high"]],
            "vision_follow_rate_baseline": float(np.mean([_rates(r["counterfactual"]["baseline"])["follow"] for r in saw])),
            "vision_follow_rate_reference": float(np.mean([_rates(r["counterfactual"]["reference"])["follow"] for r in saw])),
            "vision_seeds_formed": int(sum(v >= config.formed_threshold for v in vision["per_seed"])),
            "vision_edit_success": {name: float(np.mean([_rates(r["counterfactual"][name])["success"] for r in saw
                                                         if name in r["counterfactual"]]))
                                    for name in saw[0]["counterfactual"]},
            "vision_fraction_captured": _over_seeds([fraction_captured(r["losses"]) for r in saw]),
            "vision_ablations": {bridge: {name: float(np.mean([r["ablations"][bridge][name] for r in saw
                                                               if bridge in r["ablations"]]))
                                          for name in saw[0]["ablations"][bridge]} for bridge in saw[0]["ablations"]},
        })
        with_taps = [r for r in saw if "deepstack" in r["counterfactual"]]
        if with_taps:  # the DeepStack bridge and, paired, the plain one on the same seeds
            deepstack = _over_seeds([_rates(r["counterfactual"]["deepstack"])["follow"] for r in with_taps])
            summary["vision_follow_rate_without_taps_same_seeds"] = float(np.mean(
                [_rates(r["counterfactual"]["bridge"])["follow"] for r in with_taps]))
            summary["vision_deepstack_seeds"] = len(with_taps)
            summary["vision_follow_rate_deepstack"] = deepstack["mean"]
            summary["vision_follow_rate_deepstack_ci"] = [deepstack["ci_low"], deepstack["ci_high"]]
    return summary


# -- printing ---------------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:>5.0%}"


def format_table(results: list[dict], config: ProofConfig) -> str:
    """Per seed: the read task's conditions (held-out loss, follow, changed, success), unseen templates, no harm;
    the saw task's conditions and ablations."""
    labels = {"baseline": "no bridge (the DiT's encoder without the colour)", "bridge": f"bridge ({config.design})",
              "control": "control: the bridge trained on shuffled Qwen3", "reference": "reference: the DiT's encoder told it",
              "deepstack": "bridge reading the DeepStack taps too"}
    lines = [f"read task: Qwen3-VL reads the colour word, Qwen2.5-VL does not (half the training examples: it does)",
             f"{'seed':>4}  {'condition':<50} {'loss':>8} {'follow':>7} {'changed':>8} {'success':>8}"]
    for result in results:
        read = result["read"]
        for name in ("baseline", "bridge", "control", "reference"):
            rates = _rates(read["counterfactual"][name])
            lines.append(f"{result['seed']:>4}  {labels[name]:<50} {read['losses'][name].mean():>8.4f} {_pct(rates['follow']):>7} "
                         f"{_pct(rates['changed']):>8} {_pct(rates['success']):>8}")
        unseen = ", ".join(f"{t.format(shape='<s>', colour='<k>')!r} {v.mean():.0%}" for t, v in read["templates"].items())
        lines.append(f"{'':>4}  unseen phrasings: {unseen}")
        edit, bridge = read["noharm"]["edit"], read["noharm"]["bridge"]
        lines.append(f"{'':>4}  no harm (both encoders read it all): follow {edit['follow'].mean():.1%} -> {bridge['follow'].mean():.1%} "
                     f"({bridge['follow'].mean() - edit['follow'].mean():+.1%}); success {int(edit['success'].sum())}/{len(edit['success'])} "
                     f"-> {int(bridge['success'].sum())}/{len(bridge['success'])}")
    if config.saw:
        lines += ["", "saw task: the colour only in a reference picture Qwen3-VL sees; one instruction for every colour",
                  f"{'seed':>4}  {'condition':<50} {'loss':>8} {'follow':>7} {'changed':>8} {'success':>8}"]
        for result in results:
            saw = result["saw"]
            for name in saw["counterfactual"]:
                rates = _rates(saw["counterfactual"][name])
                loss = saw["losses"].get(name)
                lines.append(f"{result['seed']:>4}  {labels[name]:<50} {(loss.mean() if loss is not None else float('nan')):>8.4f} "
                             f"{_pct(rates['follow']):>7} {_pct(rates['changed']):>8} {_pct(rates['success']):>8}")
            for bridge, ablation in saw["ablations"].items():
                lines.append(f"{'':>4}  {bridge} follow with " + ", ".join(f"{k} {v:.0%}" for k, v in ablation.items()))
    return "\n".join(lines)


def _interval(values: list) -> str:
    low, high = values
    return "" if low is None or math.isnan(low) else f" [{low:.0%}, {high:.0%}]"


def format_summary(summary: dict) -> str:
    n = summary["seeds"]
    lines = [f"over {n} seed{'s' if n != 1 else ''} ({summary['interval']}):",
             f"  read:  follow {summary['follow_rate']:.1%}{_interval(summary['follow_rate_ci'])} (control "
             f"{summary['follow_rate_control']:.0%}, no bridge {summary['follow_rate_baseline']:.0%}, the DiT's encoder told it "
             f"{summary['follow_rate_reference']:.0%}, guessing {summary['guessing']:.0%}); formed on "
             f"{summary['seeds_formed']} of {n} seeds (follow >= {summary['formed_threshold']:.0%})",
             f"  no harm: follow {summary['no_harm_follow_edit']:.1%} (Edit) -> {summary['no_harm_follow_bridge']:.1%} "
             f"(Edit+bridge), difference {summary['no_harm_difference'] * 100:+.1f} points [{summary['no_harm_difference_ci_low'] * 100:+.1f}, "
             f"{summary['no_harm_difference_ci_high'] * 100:+.1f}] ({summary['no_harm_interval']}); edit success "
             f"{summary['no_harm_success_edit']:.0%} -> {summary['no_harm_success_bridge']:.0%}",
             f"  unseen phrasings: follow {summary['follow_rate_unseen_templates']:.1%}"
             f"{_interval(summary['follow_rate_unseen_templates_ci'])} (colour after a space "
             f"{summary['follow_rate_unseen_templates_by_tokenisation']['space']:.0%}, glued "
             f"{summary['follow_rate_unseen_templates_by_tokenisation']['no space']:.0%})"]
    if "vision_follow_rate" in summary:
        lines.append(f"  saw:   follow {summary['vision_follow_rate']:.1%}{_interval(summary['vision_follow_rate_ci'])} (control "
                     f"{summary['vision_follow_rate_control']:.0%}{_interval(summary['vision_follow_rate_control_ci'])}, no bridge "
                     f"{summary['vision_follow_rate_baseline']:.0%}, the DiT's encoder told it in words "
                     f"{summary['vision_follow_rate_reference']:.0%}); formed on {summary['vision_seeds_formed']} of {n} seeds"
                     + (f"; a bridge reading the DeepStack taps too {summary['vision_follow_rate_deepstack']:.1%} vs "
                        f"{summary['vision_follow_rate_without_taps_same_seeds']:.1%} without, on the same "
                        f"{summary['vision_deepstack_seeds']} seed(s)" if "vision_follow_rate_deepstack" in summary else ""))
        for bridge, ablation in summary["vision_ablations"].items():
            lines.append(f"  saw, {bridge} ablations (follow): " + ", ".join(f"{k} {v:.0%}" for k, v in ablation.items()))
    return "\n".join(lines)


def _claim(what: str, low: float, control_high: float | None, per_seed: list[float], control: float, seeds: int,
           formed: float) -> str:
    if control_high is not None and low > control_high:
        return f"carries what only Qwen3-VL {what} (lower bound {low:.0%} vs control's upper {control_high:.0%})"
    if seeds <= 3 and per_seed and min(per_seed) >= formed:  # every seed formed
        return (f"formed on every seed for what only Qwen3-VL {what} ({', '.join(f'{f:.0%}' for f in per_seed)} vs "
                f"control {control:.0%}), but a t-interval over {seeds} seeds cannot exclude the control (lower bound "
                f"{low:.0%}): no claim either way; the full run's 10 seeds decide")
    return f"does NOT reliably carry what only Qwen3-VL {what} (lower bound {low:.0%} vs control's upper " + (
        f"{control_high:.0%})" if control_high is not None else "unknown)")


def verdict(summary: dict) -> str:
    """One sentence. With one seed no interval over seeds exists, and with two or three the t-multiplier (12.7, 4.3)
    makes an interval that excludes the control nearly impossible: it says so instead of claiming a failure."""
    if summary["seeds"] < 2:
        return ("one seed: no interval over seeds, so no claim either way (follow "
                f"{summary['follow_rate']:.0%} vs control {summary['follow_rate_control']:.0%}); run two or more seeds")
    text = f"the {summary['design']} bridge " + _claim(
        "read", summary["follow_rate_ci"][0], summary["follow_rate_control_ci"][1], summary["follow_rate_per_seed"],
        summary["follow_rate_control"], summary["seeds"], summary["formed_threshold"])
    if "vision_follow_rate" in summary:
        text += "; it " + _claim(
            "saw", summary["vision_follow_rate_ci"][0], summary["vision_follow_rate_control_ci"][1],
            summary["vision_follow_rate_per_seed"], summary["vision_follow_rate_control"], summary["seeds"],
            summary["formed_threshold"])
    return text


# -- running ----------------------------------------------------------------------------------------------


def result_to_json(value):
    """A seed's result as JSON (arrays as lists): written as each seed finishes, so a run's work is never lost."""
    if isinstance(value, dict):
        return {str(k): result_to_json(v) for k, v in value.items() if k != "images"}
    if isinstance(value, (list, tuple)):
        return [result_to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def result_from_json(value, key: str = ""):
    """The inverse of `result_to_json`: numeric lists back to arrays (bool arrays stay bool)."""
    if isinstance(value, dict):
        return {k: result_from_json(v, k) for k, v in value.items()}
    if isinstance(value, list) and value and key not in ("per_seed",):
        return np.asarray(value)
    return value


def save_result(path: Path, result: dict) -> None:
    import json

    path.write_text(json.dumps(result_to_json(result)))


def load_results(work_dir: Path, seeds) -> list[dict]:
    """Per-seed results written by `save_result` (a summary can be rebuilt without recomputing anything)."""
    import json

    return [result_from_json(json.loads((Path(work_dir) / f"result-seed{seed}.json").read_text())) for seed in seeds]


def seed_headline(result: dict) -> str:
    """One seed's numbers in a line, printed as each seed finishes."""
    read = result["read"]
    noharm = read["noharm"]["bridge"]["follow"].mean() - read["noharm"]["edit"]["follow"].mean()
    unseen = np.mean([v.mean() for v in read["templates"].values()])
    text = (f"read follow {_rates(read['counterfactual']['bridge'])['follow']:.0%} (control "
            f"{_rates(read['counterfactual']['control'])['follow']:.0%}), no harm {noharm * 100:+.1f} points, unseen "
            f"phrasings {unseen:.0%}")
    if "saw" in result:
        text += f"; saw follow {_rates(result['saw']['counterfactual']['bridge'])['follow']:.0%}"
    return text


def _editor(trained_edit_model, qwen3_model, qwen3_area: int | None = None):
    import json

    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit
    from bridgecore.zoo.tiny_edit_model import REPORT_NAME

    report = Path(trained_edit_model) / REPORT_NAME
    size = json.loads(report.read_text())["config"]["image_size"] if report.exists() else 64
    return EnhancedQwenImageEdit(trained_edit_model, qwen3_model, device="cpu", condition_area=size * size,
                                 qwen3_area=qwen3_area), size


def _die_with_parent() -> None:
    """A worker process of the proof ends when the proof's process does (Linux: parent-death signal), instead of
    training on for an hour after a Ctrl-C or a kill."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _seed_worker(trained_edit_model, qwen3_model, seed: int, config: ProofConfig, work_dir: str) -> dict:
    """One seed in a worker process (one thread: tiny models are overhead-bound)."""
    torch.set_num_threads(1)
    editor, size = _editor(trained_edit_model, qwen3_model, config.qwen3_area)
    return run_seed(editor, seed, config, Path(work_dir), size)


def run_proof(trained_edit_model: str | Path, qwen3_model: str | Path, config: ProofConfig, work_dir: str | Path,
              progress=print, workers: int = 1) -> tuple[list[dict], dict]:
    """Every seed on the trained tiny edit model (`workers` processes at once); returns (per-seed results, summary)."""
    if workers <= 1:
        editor, size = _editor(trained_edit_model, qwen3_model, config.qwen3_area)
        results = []
        for seed in config.seeds:
            results.append(run_seed(editor, seed, config, Path(work_dir), size, progress))
            save_result(Path(work_dir) / f"result-seed{seed}.json", results[-1])
            progress(f"seed {seed} done: {seed_headline(results[-1])}")
        return results, summarize(results, config)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent) as pool:
        futures = {pool.submit(_seed_worker, str(trained_edit_model), str(qwen3_model), seed, config, str(work_dir)): seed
                   for seed in config.seeds}
        done = {}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            save_result(Path(work_dir) / f"result-seed{futures[future]}.json", done[futures[future]])
            progress(f"seed {futures[future]} done ({len(done)} of {len(futures)}): {seed_headline(done[futures[future]])}")
    results = [done[seed] for seed in config.seeds]
    return results, summarize(results, config)
