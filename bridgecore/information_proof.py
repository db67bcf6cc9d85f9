"""The mechanism proof: does the bridge move information that only Qwen3-VL has into the DiT?

On the trained tiny edit model (`tiny_edit_model.py`), the task "Make the <shape> <colour>" with the
colour word removed from the prompt that Qwen2.5-VL (the DiT's own encoder) reads, while Qwen3-VL reads
the full instruction. Without the bridge the DiT cannot know the colour. Per seed, the bridge is trained
twice with the project's own trainer: normally, and with Qwen3 caches re-paired with other samples at
every step (`ablate_qwen3="shuffle"`, which can only learn a generic correction). The bridge carries
Qwen3-VL information if the normally trained bridge gains more over the zero-init bridge than the
control does, and loses that gain when its Qwen3 caches are shuffled at evaluation.

    python bench/prove_bridge_information.py [--quick]      # table + one JSON line
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .bridge import negative_prompt_embeds
from .cache_format import SampleCache
from .edit_prompt import condition_size
from .synthetic_triplets import Triplet, edit_success, make_triplets
from .training import BridgeTrainer, TrainConfig
from .batch.stages.latents import encode_latents
from .training_data import TrainingExample

logger = logging.getLogger(__name__)

CONDITIONS = ("baseline", "trained", "trained_qwen3_shuffled", "shuffle_trained", "full_instruction")
LABELS = {
    "baseline": "zero-init bridge (Qwen2.5-VL without the colour)",
    "trained": "trained bridge",
    "trained_qwen3_shuffled": "trained bridge, Qwen3 caches shuffled",
    "shuffle_trained": "bridge trained on shuffled Qwen3 caches",
    "full_instruction": "reference: Qwen2.5-VL with the full instruction",
}


@dataclass
class ProofConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    train_samples: int = 512
    heldout_samples: int = 64
    steps: int = 1500
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    heldout_repeats: int = 4
    edit_samples: int = 32  # held-out samples decoded per condition for edit success (0: skip)
    inference_steps: int = 20
    extract_batch_size: int = 32


QUICK = ProofConfig(train_samples=128, heldout_samples=32, steps=200, edit_samples=16)


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


# -- one seed --------------------------------------------------------------------------------------------


def _edit_success(editor, bridges: dict, examples: list[TrainingExample], shuffled: list, full: dict,
                  triplets: dict[str, Triplet], config: ProofConfig) -> dict[str, float]:
    """Fraction of decoded held-out edits that recolour the named shape correctly, per condition."""
    examples = examples[: config.edit_samples]
    qwen3 = [e.cache.qwen3 for e in examples]
    qwen25 = [e.cache.qwen25 for e in examples]
    embeds = {
        "baseline": negative_prompt_embeds(qwen25),  # Qwen-Image-Edit's own embeddings, unbridged
        "trained": bridges["trained"](qwen3, qwen25),
        "trained_qwen3_shuffled": bridges["trained"](shuffled[: len(examples)], qwen25),
        "shuffle_trained": bridges["shuffle_trained"](qwen3, qwen25),
        "full_instruction": negative_prompt_embeds([full[e.key] for e in examples]),
    }
    samples = [[triplets[e.key].source] for e in examples]
    seeds = [1000 + i for i in range(len(examples))]
    success = {}
    for name, output in embeds.items():
        images = editor.denoise(samples, output.prompt_embeds.detach(), output.prompt_embeds_mask, seeds,
                                config.inference_steps, 1.0, None, "pil")
        success[name] = float(np.mean([edit_success(triplets[e.key], image) for e, image in zip(examples, images)]))
    return success


def run_seed(editor, seed: int, config: ProofConfig, work_dir: Path, image_size: int = 64) -> dict:
    """Trains the bridge normally and on shuffled Qwen3 caches; per-sample held-out losses of every condition."""
    total = config.train_samples + config.heldout_samples
    triplets = make_triplets(total, image_size, seed=10_000 + seed)  # disjoint from the DiT's training pictures (seed 0)
    examples, full = redacted_examples(editor, triplets, f"seed{seed}", config.extract_batch_size)
    by_key = {e.key: t for e, t in zip(examples, triplets)}
    train = TrainConfig(steps=config.steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
                        warmup_steps=config.warmup_steps, eval_every=config.steps, checkpoint_every=config.steps,
                        heldout_fraction=config.heldout_samples / total, seed=seed,
                        heldout_repeats=config.heldout_repeats, gradient_checkpointing=False)
    real = BridgeTrainer(editor.pipe, examples, work_dir / f"seed{seed}-real", train)
    real_metrics = real.train(resume=False, progress=False)
    control = BridgeTrainer(editor.pipe, examples, work_dir / f"seed{seed}-shuffle", replace(train, ablate_qwen3="shuffle"))
    control_metrics = control.train(resume=False, progress=False)
    from .bridge import VisionCacheBridge

    reference = [replace(e, cache=replace(e.cache, qwen25=full[e.key])) for e in real.heldout]
    untrained = VisionCacheBridge(real.bridge_config)
    per_sample = {
        "baseline": np.asarray(real_metrics["heldout_per_sample"]["baseline"]),
        "trained": np.asarray(real_metrics["heldout_per_sample"]["trained"]),
        "trained_qwen3_shuffled": np.asarray(real_metrics["heldout_per_sample"]["qwen3_shuffled"]),
        "shuffle_trained": np.asarray(control_metrics["heldout_per_sample"]["trained"]),
        "full_instruction": real.heldout_losses(untrained, examples=reference),
    }
    result = {"seed": seed, "losses": per_sample, "statistics": real_metrics["bridge_statistics"],
              "control_statistics": control_metrics["bridge_statistics"]}
    if config.edit_samples:
        with torch.no_grad():
            result["edit_success"] = _edit_success(editor, {"trained": real.bridge, "shuffle_trained": control.bridge},
                                                   real.heldout, real.heldout_shuffled, full, by_key, config)
    return result


# -- statistics ------------------------------------------------------------------------------------------


def _relative(losses: dict, better: str, worse: str = "baseline") -> float:
    """(mean worse - mean better) / mean baseline."""
    return float((losses[worse].mean() - losses[better].mean()) / losses["baseline"].mean())


def hierarchical_bootstrap_ci(results: list[dict], better: str, worse: str, resamples: int = 2000,
                              seed: int = 0) -> tuple[float, float]:
    """95% CI of mean over seeds of (worse - better) / baseline, resampling seeds and then held-out samples."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        draws = []
        for s in rng.integers(0, len(results), len(results)):
            losses = results[s]["losses"]
            pick = rng.integers(0, len(losses["baseline"]), len(losses["baseline"]))
            draws.append((losses[worse][pick].mean() - losses[better][pick].mean()) / losses["baseline"][pick].mean())
        values.append(np.mean(draws))
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def summarize(results: list[dict], config: ProofConfig) -> dict:
    """The final JSON: gains as fractions of the baseline held-out loss, averaged over seeds, with CIs."""
    gain_real = float(np.mean([_relative(r["losses"], "trained") for r in results]))
    gain_shuffled = float(np.mean([_relative(r["losses"], "shuffle_trained") for r in results]))
    low, high = hierarchical_bootstrap_ci(results, "trained", "shuffle_trained")
    eval_low, eval_high = hierarchical_bootstrap_ci(results, "trained", "trained_qwen3_shuffled")
    summary = {
        "gain_real": gain_real,
        "gain_shuffled": gain_shuffled,
        "diff": gain_real - gain_shuffled,
        "diff_ci_low": low,
        "diff_ci_high": high,
        "gain_real_evaluated_shuffled": float(np.mean([_relative(r["losses"], "trained_qwen3_shuffled") for r in results])),
        "information_gain_eval": float(np.mean([_relative(r["losses"], "trained", "trained_qwen3_shuffled") for r in results])),
        "information_gain_eval_ci": [eval_low, eval_high],
        "gain_full_instruction": float(np.mean([_relative(r["losses"], "full_instruction") for r in results])),
        "seeds": len(results),
        "heldout_samples": int(len(results[0]["losses"]["baseline"])),
        "config": asdict(config),
        "bridge_beats_shuffled_control": bool(low > 0),
    }
    if "edit_success" in results[0]:
        summary["edit_success"] = {name: float(np.mean([r["edit_success"][name] for r in results])) for name in CONDITIONS}
    return summary


def format_table(results: list[dict]) -> str:
    """Per seed and condition: held-out loss, gain over the zero-init bridge, edit success; bridge statistics."""
    lines = [f"{'seed':>4}  {'condition':<50} {'held-out loss':>13} {'gain':>8} {'edit success':>13}"]
    for result in results:
        losses = result["losses"]
        for name in CONDITIONS:
            success = result.get("edit_success", {}).get(name)
            lines.append(f"{result['seed']:>4}  {LABELS[name]:<50} {losses[name].mean():>13.5f} "
                         f"{_relative(losses, name):>+8.2%} {'' if success is None else f'{success:>13.0%}'}")
        stats = result["statistics"]
        lines.append(f"{'':>4}  trained bridge: correction/base RMS {stats['correction_rms_ratio']:.3f} "
                     f"(token max {stats['correction_rms_ratio_token_max']:.3f}), token cosine "
                     f"{stats['token_cosine_base']:.3f} -> {stats['token_cosine_enhanced']:.3f}, gates text "
                     f"{stats['gate_text']:+.3f} vision {stats['gate_vision']:+.3f}")
    return "\n".join(lines)


def run_proof(trained_edit_model: str | Path, qwen3_model: str | Path, config: ProofConfig, work_dir: str | Path,
              progress=print) -> tuple[list[dict], dict]:
    """All seeds on the trained tiny edit model; returns (per-seed results, summary)."""
    import json

    from .edit_pipeline import EnhancedQwenImageEdit
    from .tiny_edit_model import REPORT_NAME

    report = Path(trained_edit_model) / REPORT_NAME
    size = json.loads(report.read_text())["config"]["image_size"] if report.exists() else 64
    editor = EnhancedQwenImageEdit(trained_edit_model, qwen3_model, device="cpu", condition_area=size * size)
    results = []
    for seed in config.seeds:
        results.append(run_seed(editor, seed, config, Path(work_dir), size))
        progress(f"seed {seed} done")
    return results, summarize(results, config)
