"""The mechanism proof: does the bridge move information that only Qwen3-VL has into the DiT?

On the trained tiny edit model (`tiny_edit_model.py`), the task "Make the <shape> <colour>" with the
colour word removed from the prompt that Qwen2.5-VL (the DiT's own encoder) reads, while Qwen3-VL reads
the full instruction. Without the bridge the DiT cannot know the colour. Per seed, every design
(`residual`, `tokens`, `both`) is trained with the project's own trainer, plus a control trained the same
way with Qwen3 caches re-paired with other samples at every step (`ablate_qwen3="shuffle"`: it can only
learn a generic correction of the redacted prompt).

The headline is counterfactual: for held-out images, Qwen2.5-VL reads "Make the <shape>" and Qwen3-VL
reads "Make the <shape> <k>" for every colour k; the edit is decoded and the named shape's colour read.

- follow rate: how often the decoded colour is the k that Qwen3-VL read (guessing: 1 in 6);
- changed rate: how often the edit changes at all when only Qwen3-VL's colour word changes;
- fraction captured = (L_control - L_bridge) / (L_control - L_reference), with held-out flow-matching
  losses, L_reference the DiT's own encoder given the full instruction: how much of the reference's
  advantage over a generic correction the bridge recovers.

Intervals are over seeds (Student t, the seed count printed): a bootstrap over three seeds cannot put
its lower bound below the worst seed.

    python bench/prove_bridge_information.py [--quick]      # table + one JSON line
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from bridgecore.model.bridge import identity_bridge, negative_prompt_embeds
from bridgecore.model.cache_format import SampleCache
from bridgecore.model.edit_prompt import condition_size
from bridgecore.zoo.synthetic_triplets import COLOURS, Triplet, edit_success, make_triplets, nearest_colour, shape_mask
from bridgecore.training.trainer import BridgeTrainer, TrainConfig
from bridgecore.model.latents import encode_latents
from bridgecore.training.examples import TrainingExample

logger = logging.getLogger(__name__)

DESIGNS = ("residual", "tokens", "both")
CHANGE_THRESHOLD = 2  # an edit "changed" when some pixel moved by more than this (of 255): not rounding noise


@dataclass
class ProofConfig:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    designs: tuple[str, ...] = DESIGNS
    default_design: str = "both"  # the design of the headline numbers
    controls: tuple[str, ...] | None = None  # designs that get a shuffled-Qwen3 control (None: every design)
    num_tokens: int = 1
    train_samples: int = 512
    heldout_samples: int = 64
    steps: int = 1500
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    heldout_repeats: int = 4
    counterfactual_images: int = 16  # held-out images decoded with every colour, per condition (0: skip)
    inference_steps: int = 20
    extract_batch_size: int = 32
    overrides: dict = field(default_factory=dict)  # extra BridgeConfig fields for every design


QUICK = ProofConfig(seeds=(0, 1), train_samples=256, heldout_samples=32, steps=800, counterfactual_images=8,
                    inference_steps=10, controls=("both",))  # every design, one control: under 10 minutes on 2 cores


# -- data ------------------------------------------------------------------------------------------------


@torch.no_grad()
def redacted_examples(editor, triplets: list[Triplet], prefix: str, batch_size: int = 32):
    """Training examples whose Qwen2.5 cache saw the instruction without its colour word and whose Qwen3 cache
    saw it in full; plus, per key, the Qwen2.5 cache of the full instruction (the reference row)."""
    extractor, examples, full = editor.extractor, [], {}
    for start in range(0, len(triplets), batch_size):
        chunk = triplets[start:start + batch_size]
        images = [[t.source] for t in chunk]
        qwen3 = extractor.extract_qwen3_vision(images, [t.instruction for t in chunk])
        redacted = extractor.extract_qwen25_vision(images, [t.instruction_without_colour() for t in chunk])
        complete = extractor.extract_qwen25_vision(images, [t.instruction for t in chunk])
        for offset, triplet in enumerate(chunk):
            key = f"{prefix}-{start + offset:05d}"
            width, height = condition_size(triplet.source, editor.condition_area)
            cache = SampleCache(qwen3[offset], redacted[offset], triplet.instruction, [triplet.source.size])
            examples.append(TrainingExample(key, cache, encode_latents(editor.pipe, triplet.source, width, height),
                                            encode_latents(editor.pipe, triplet.target, width, height),
                                            (height // 16, width // 16)))
            full[key] = complete[offset]
    return examples, full


def painted_colour(triplet: Triplet, edited) -> str:
    """The palette colour nearest to the mean inside the named shape of a decoded edit."""
    pixels = np.asarray(edited.convert("RGB").resize(triplet.source.size), dtype=np.float64)
    box = triplet.shapes[triplet.shape][1]
    return nearest_colour(pixels[shape_mask(triplet.shape, box, pixels.shape[0])].mean(axis=0))


# -- the counterfactual ----------------------------------------------------------------------------------


@torch.no_grad()
def counterfactual_edits(editor, conditions: dict, examples: list[TrainingExample], triplets: dict[str, Triplet],
                         config: ProofConfig, keep_images: bool = False) -> dict[str, dict]:
    """Every held-out image with every colour word, read by Qwen3-VL only (Qwen2.5-VL keeps the redacted prompt).

    Args:
        conditions: name -> a bridge, or "baseline" / "reference" (the DiT's own encoder without / with the
            colour word). All conditions decode with the same seed per image, so only the words differ.
    Returns:
        name -> {"follow": [n_images x n_colours] bool, "changed": same (False where k is the instruction's own
        colour), "success": [n_images] bool (the instruction's own colour, both shapes checked)}, plus "images"
        (the decoded edits, image-major, colours in `COLOURS` order) with `keep_images`.
    """
    extractor, colours = editor.extractor, list(COLOURS)
    examples = examples[: config.counterfactual_images]
    qwen3, full, redacted, samples, seeds, rows = [], [], [], [], [], []
    for index, example in enumerate(examples):
        triplet = triplets[example.key]
        prompts = [f"Make the {triplet.shape} {colour}" for colour in colours]
        images = [[triplet.source]] * len(colours)
        qwen3 += extractor.extract_qwen3_vision(images, prompts)
        full += extractor.extract_qwen25_vision(images, prompts)
        redacted += [example.cache.qwen25] * len(colours)
        samples += images
        seeds += [1000 + index] * len(colours)
        rows += [(triplet, colour) for colour in colours]
    results = {}
    for name, condition in conditions.items():
        if name == "baseline":
            output = negative_prompt_embeds(redacted)  # Qwen-Image-Edit's own embeddings, no bridge
        elif name == "reference":
            output = negative_prompt_embeds(full)
        else:
            output = condition(qwen3, redacted)
        edits = []
        for start in range(0, len(samples), 48):  # bounded memory; one DiT call per chunk
            part = slice(start, start + 48)
            edits += editor.denoise(samples[part], output.prompt_embeds[part].detach(), output.prompt_embeds_mask[part],
                                    seeds[part], config.inference_steps, 1.0, None, "pil")
        painted = np.array([painted_colour(t, e) == k for (t, k), e in zip(rows, edits)]).reshape(len(examples), -1)
        arrays = [np.asarray(e.convert("RGB"), dtype=np.int16) for e in edits]
        changed = np.zeros_like(painted)
        success = np.zeros(len(examples), dtype=bool)
        for i, example in enumerate(examples):
            triplet = triplets[example.key]
            own = i * len(colours) + colours.index(triplet.colour)
            success[i] = edit_success(triplet, edits[own])
            for j in range(len(colours)):
                if j != colours.index(triplet.colour):
                    changed[i, j] = np.abs(arrays[i * len(colours) + j] - arrays[own]).max() > CHANGE_THRESHOLD
        results[name] = {"follow": painted, "changed": changed, "success": success, **({"images": edits} if keep_images else {})}
    return results


# -- one seed --------------------------------------------------------------------------------------------


def control_designs(config: ProofConfig) -> tuple[str, ...]:
    """The designs that get their own shuffled-Qwen3 control (the default design always does)."""
    chosen = config.designs if config.controls is None else config.controls
    return tuple(dict.fromkeys((*chosen, config.default_design)))


def _train(editor, examples, work_dir: Path, name: str, train: TrainConfig, config: ProofConfig, mode: str):
    from bridgecore.model.bridge import BridgeConfig

    first = examples[0].cache
    bridge_config = BridgeConfig.from_caches(first.qwen3, first.qwen25, mode=mode, num_tokens=config.num_tokens,
                                             **config.overrides)
    trainer = BridgeTrainer(editor.pipe, examples, work_dir / name, train, bridge_config)
    return trainer, trainer.train(resume=False, progress=False)


def run_seed(editor, seed: int, config: ProofConfig, work_dir: Path, image_size: int = 64, progress=None) -> dict:
    """Trains every design and the control; held-out losses per condition, the counterfactual edits, statistics."""
    total = config.train_samples + config.heldout_samples
    triplets = make_triplets(total, image_size, seed=10_000 + seed)  # disjoint from the DiT's training pictures (seed 0)
    examples, full = redacted_examples(editor, triplets, f"seed{seed}", config.extract_batch_size)
    by_key = {e.key: t for e, t in zip(examples, triplets)}
    train = TrainConfig(steps=config.steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
                        warmup_steps=config.warmup_steps, eval_every=config.steps, checkpoint_every=config.steps,
                        heldout_fraction=config.heldout_samples / total, seed=seed,
                        heldout_repeats=config.heldout_repeats, gradient_checkpointing=False)
    trained, metrics = {}, {}
    for design in config.designs:
        trained[design], metrics[design] = _train(editor, examples, work_dir, f"seed{seed}-{design}", train, config, design)
        if progress:
            progress(f"seed {seed}: {design} trained")
    controls = {}
    for design in control_designs(config):  # trained the same way, on Qwen3 caches of other samples
        controls[design] = _train(editor, examples, work_dir, f"seed{seed}-control-{design}",
                                  replace(train, ablate_qwen3="shuffle"), config, design)
        if progress:
            progress(f"seed {seed}: {design} control trained")
    some = trained[config.designs[0]]
    reference = [replace(e, cache=replace(e.cache, qwen25=full[e.key])) for e in some.heldout]
    losses = {"baseline": np.asarray(metrics[config.designs[0]]["heldout_per_sample"]["baseline"]),
              "reference": some.heldout_losses(identity_bridge(some.bridge_config), examples=reference)}
    for design, (_, control_metrics) in controls.items():
        losses[f"control_{design}"] = np.asarray(control_metrics["heldout_per_sample"]["trained"])
    losses["control"] = losses[f"control_{config.default_design}"]
    for design in config.designs:
        losses[design] = np.asarray(metrics[design]["heldout_per_sample"]["trained"])
        losses[f"{design}_qwen3_shuffled"] = np.asarray(metrics[design]["heldout_per_sample"]["qwen3_shuffled"])
    result = {"seed": seed, "losses": losses,
              "statistics": {d: metrics[d]["bridge_statistics"] for d in config.designs},
              "level_zeroed": {d: metrics[d]["heldout_loss_level_zeroed"] for d in config.designs},
              "control_statistics": {d: m["bridge_statistics"] for d, (_, m) in controls.items()}}
    if config.counterfactual_images:
        conditions = {"baseline": None, **{d: trained[d].bridge.eval() for d in config.designs},
                      **{f"control_{d}": trainer.bridge.eval() for d, (trainer, _) in controls.items()},
                      "reference": None}
        result["counterfactual"] = counterfactual_edits(editor, conditions, some.heldout, by_key, config)
        result["counterfactual"]["control"] = result["counterfactual"][f"control_{config.default_design}"]
        if progress:
            progress(f"seed {seed}: counterfactual edits decoded")
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


def _relative(losses: dict, better: str, worse: str = "baseline") -> float:
    """(mean worse - mean better) / mean baseline."""
    return float((losses[worse].mean() - losses[better].mean()) / losses["baseline"].mean())


def fraction_captured(losses: dict, design: str) -> float:
    """(L_control - L_design) / (L_control - L_reference), mean held-out losses of one seed; L_control is the
    design's own control (trained the same way on shuffled Qwen3 caches) when it has one."""
    control = losses.get(f"control_{design}", losses["control"]).mean()
    gap = control - losses["reference"].mean()
    return float((control - losses[design].mean()) / gap) if gap > 0 else float("nan")


def pooled_fraction(results: list[dict], design: str) -> float:
    """The fraction captured from losses averaged over seeds first: steadier than a mean of per-seed ratios when
    one seed's denominator (control minus reference) is small."""
    control = np.mean([r["losses"].get(f"control_{design}", r["losses"]["control"]).mean() for r in results])
    bridge = np.mean([r["losses"][design].mean() for r in results])
    reference = np.mean([r["losses"]["reference"].mean() for r in results])
    return float((control - bridge) / (control - reference)) if control > reference else float("nan")


def _rate(result: dict, name: str, what: str) -> float:
    counterfactual = result.get("counterfactual", {}).get(name)
    if counterfactual is None:
        return float("nan")
    values = counterfactual[what]
    if what == "changed":  # only the pairs where Qwen3's word differs from the instruction's own
        return float(values.sum() / max(1, values.size - values.shape[0]))
    return float(values.mean())


def _summary_of(results: list[dict], name: str, per_seed) -> dict:
    values = [per_seed(r) for r in results]
    low, high = t_interval(values)
    return {"mean": float(np.mean(values)), "ci_low": low, "ci_high": high, "per_seed": values}


def summarize(results: list[dict], config: ProofConfig) -> dict:
    """The final JSON: the default design's headline numbers, every design's, intervals over seeds."""
    default = config.default_design
    designs = {}
    for design in config.designs:
        designs[design] = {
            "gain": _summary_of(results, design, lambda r, d=design: _relative(r["losses"], d)),
            "fraction_captured": _summary_of(results, design, lambda r, d=design: fraction_captured(r["losses"], d)),
            "fraction_captured_pooled": pooled_fraction(results, design),
            "information_gain_eval": _summary_of(results, design, lambda r, d=design: _relative(
                r["losses"], d, f"{d}_qwen3_shuffled")),
            "control": f"control_{design}" if f"control_{design}" in results[0]["losses"] else
                       f"control_{config.default_design}",
            "follow_rate": _summary_of(results, design, lambda r, d=design: _rate(r, d, "follow")),
            "follow_rate_control": _summary_of(results, design, lambda r, d=design: _rate(
                r, f"control_{d}" if f"control_{d}" in r["losses"] else "control", "follow")),
            "changed_rate": _summary_of(results, design, lambda r, d=design: _rate(r, d, "changed")),
            "edit_success": _summary_of(results, design, lambda r, d=design: _rate(r, d, "success")),
            "level_zeroed_loss": {level: float(np.mean([r["level_zeroed"][design][level] for r in results]))
                                  for level in results[0]["level_zeroed"][design]},
        }
    headline = designs[default] if default in designs else next(iter(designs.values()))
    diff = [(_relative(r["losses"], default) - _relative(r["losses"], "control")) for r in results] \
        if default in config.designs else [float("nan")]
    diff_low, diff_high = t_interval(diff)
    others = {name: _summary_of(results, name, lambda r, n=name: _rate(r, n, "follow"))
              for name in ("baseline", "control", "reference")}
    summary = {
        "design": default,
        "follow_rate": headline["follow_rate"]["mean"],
        "follow_rate_ci": [headline["follow_rate"]["ci_low"], headline["follow_rate"]["ci_high"]],
        "follow_rate_control": others["control"]["mean"],
        "follow_rate_reference": others["reference"]["mean"],
        "follow_rate_baseline": others["baseline"]["mean"],
        "guessing": 1 / len(COLOURS),
        "changed_rate": headline["changed_rate"]["mean"],
        "changed_rate_control": _summary_of(results, "control", lambda r: _rate(r, "control", "changed"))["mean"],
        "fraction_captured": headline["fraction_captured"]["mean"],
        "fraction_captured_ci_low": headline["fraction_captured"]["ci_low"],
        "fraction_captured_ci_high": headline["fraction_captured"]["ci_high"],
        "fraction_captured_pooled": headline["fraction_captured_pooled"],
        "gain_real": headline["gain"]["mean"],
        "gain_shuffled": float(np.mean([_relative(r["losses"], "control") for r in results])),
        "diff": float(np.mean(diff)),
        "diff_ci_low": diff_low,
        "diff_ci_high": diff_high,
        "gain_full_instruction": float(np.mean([_relative(r["losses"], "reference") for r in results])),
        "edit_success": {name: _summary_of(results, name, lambda r, n=name: _rate(r, n, "success"))["mean"]
                         for name in ("baseline", *config.designs, *_control_names(config), "reference")},
        "designs": designs,
        "seeds": len(results),
        "interval": "95% Student t over seeds",
        "heldout_samples": int(len(results[0]["losses"]["baseline"])),
        "counterfactual_edits_per_condition": int(config.counterfactual_images * len(COLOURS) * len(results)),
        "config": asdict(config),
    }
    summary["bridge_beats_shuffled_control"] = bool(summary["fraction_captured_ci_low"] > 0)
    return summary


def _control_names(config: ProofConfig) -> tuple[str, ...]:
    return tuple(f"control_{d}" for d in control_designs(config))


def format_table(results: list[dict], config: ProofConfig) -> str:
    """Per seed and condition: held-out loss, gain over no bridge, counterfactual follow and changed rates, edit
    success; then each design's per-level ablation."""
    names = ("baseline", *config.designs, *_control_names(config), "reference")
    labels = {"baseline": "no bridge (Qwen2.5-VL without the colour)", "reference": "reference: Qwen2.5-VL given the colour",
              **{d: f"bridge: {d}" for d in config.designs},
              **{f"control_{d}": f"control: {d}, trained on shuffled Qwen3" for d in control_designs(config)}}
    lines = [f"{'seed':>4}  {'condition':<46} {'held-out loss':>13} {'gain':>8} {'follow':>7} {'changed':>8} {'success':>8}"]
    for result in results:
        losses = result["losses"]
        for name in names:
            lines.append(f"{result['seed']:>4}  {labels[name]:<46} {losses[name].mean():>13.5f} "
                         f"{_relative(losses, name):>+8.2%} {_rate(result, name, 'follow'):>7.0%} "
                         f"{_rate(result, name, 'changed'):>8.0%} {_rate(result, name, 'success'):>8.0%}")
        for design in config.designs:
            zeroed = ", ".join(f"{k} {v:.4f}" for k, v in result["level_zeroed"][design].items())
            lines.append(f"{'':>4}  {design}: level zeroed -> held-out loss {zeroed}")
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    lines = [f"over {summary['seeds']} seeds ({summary['interval']}), {summary['heldout_samples']} held-out samples and "
             f"{summary['counterfactual_edits_per_condition']} counterfactual edits per condition:"]
    for design, values in summary["designs"].items():
        f, r = values["fraction_captured"], values["follow_rate"]
        lines.append(f"  {design:<9} fraction captured {f['mean']:+.2f} [{f['ci_low']:+.2f}, {f['ci_high']:+.2f}] "
                     f"(pooled {values['fraction_captured_pooled']:+.2f}; vs "
                     f"{values['control']})  follow rate {r['mean']:.0%} [{r['ci_low']:.0%}, {r['ci_high']:.0%}] "
                     f"(its control {values['follow_rate_control']['mean']:.0%})  changed "
                     f"{values['changed_rate']['mean']:.0%}  edit success {values['edit_success']['mean']:.0%}")
    lines.append(f"  follow rate: control {summary['follow_rate_control']:.0%}, no bridge {summary['follow_rate_baseline']:.0%}, "
                 f"reference {summary['follow_rate_reference']:.0%}, guessing {summary['guessing']:.0%}")
    return "\n".join(lines)


def run_proof(trained_edit_model: str | Path, qwen3_model: str | Path, config: ProofConfig, work_dir: str | Path,
              progress=print) -> tuple[list[dict], dict]:
    """All seeds on the trained tiny edit model; returns (per-seed results, summary)."""
    import json

    from bridgecore.model.edit_pipeline import EnhancedQwenImageEdit
    from bridgecore.zoo.tiny_edit_model import REPORT_NAME

    report = Path(trained_edit_model) / REPORT_NAME
    size = json.loads(report.read_text())["config"]["image_size"] if report.exists() else 64
    editor = EnhancedQwenImageEdit(trained_edit_model, qwen3_model, device="cpu", condition_area=size * size)
    results = []
    for seed in config.seeds:
        results.append(run_seed(editor, seed, config, Path(work_dir), size, progress))
        progress(f"seed {seed} done")
    return results, summarize(results, config)
