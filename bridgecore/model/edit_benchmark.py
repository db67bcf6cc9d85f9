"""Per-stage latency and peak memory of enhanced edits: `EnhancedQwenImageEdit.benchmark(...)`.

Each sample runs the stages in turn and times them: Qwen2.5-VL encode, Qwen3-VL encode, bridge,
denoise (DiT loop, VAE encode of the condition image included) and VAE decode (timed by hooks on the
VAE decoder, so the diffusers pipeline runs unmodified). Writes the edited images, `summary.parquet`
and `summary.json` to the output directory and returns the table as a list of dicts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
import torch

from bridgecore.model.images import load_image

STAGES = ("qwen25_encode", "qwen3_encode", "bridge", "denoise", "decode")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class ModuleTimer:
    """Accumulates wall time spent inside a module's forward, via hooks."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.seconds, self._start, self.device = 0.0, 0.0, device
        self._handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def _enter(self, *args):
        _sync(self.device)
        self._start = time.perf_counter()

    def _exit(self, *args):
        _sync(self.device)
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def benchmark_edits(editor, test_images: list, test_prompts: list[str], output_dir: str | Path,
                    num_inference_steps: int = 50, seed: int = 0, use_qwen3_vision: bool = True) -> list[dict]:
    """Edits each sample with `editor` (an `EnhancedQwenImageEdit`), timing every stage; writes PNGs,
    `summary.parquet`, `summary.json`; prints a table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(test_images) != len(test_prompts):
        raise ValueError(f"got {len(test_images)} test images for {len(test_prompts)} prompts")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = editor.options.torch_device()
    extractor = editor.extractor
    rows = []
    for index, (image, prompt) in enumerate(zip(test_images, test_prompts)):
        sample = [load_image(i) for i in (image if isinstance(image, (list, tuple)) else [image])]
        resized = extractor.prepare_images(sample)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = {}

        def run(stage, fn):
            _sync(device)
            start = time.perf_counter()
            value = fn()
            _sync(device)
            times[stage] = time.perf_counter() - start
            return value

        qwen25 = run("qwen25_encode", lambda: extractor._encode_qwen25([prompt], [resized])[0])
        if use_qwen3_vision:
            qwen3 = run("qwen3_encode", lambda: extractor._encode_qwen3([prompt], [resized])[0])
            bridge = editor.bridge_for(qwen3, qwen25)
            with torch.no_grad():
                output = run("bridge", lambda: bridge(qwen3, qwen25))
            embeds, mask = output.prompt_embeds, output.prompt_embeds_mask
        else:
            times["qwen3_encode"] = times["bridge"] = 0.0
            embeds, mask = qwen25.prompt_embeds[None], qwen25.prompt_embeds_mask[None]
        if editor.one_model_at_a_time:
            extractor.unload()
        pipe = editor.pipe
        decode_timer = ModuleTimer(pipe.vae.decoder, device)
        try:
            edited = run("pipeline", lambda: editor.call_pipeline(
                images=sample if editor.plus else sample[0], prompt_embeds=embeds, prompt_embeds_mask=mask,
                true_cfg_scale=1.0, num_inference_steps=num_inference_steps,
                generator=torch.Generator(device).manual_seed(seed + index)).images[0])
        finally:
            decode_timer.remove()
        times["decode"] = decode_timer.seconds
        times["denoise"] = times.pop("pipeline") - decode_timer.seconds
        path = output_dir / f"{index:05d}.png"
        edited.save(path)
        rows.append({"index": index, "prompt": prompt, "output": str(path), "width": edited.width,
                     "height": edited.height, "steps": num_inference_steps,
                     **{f"{stage}_s": times[stage] for stage in STAGES},
                     "total_s": sum(times[stage] for stage in STAGES),
                     "peak_memory_mib": _peak_memory_mib(device), "device": str(device)})
    pq.write_table(pa.Table.from_pylist(rows), output_dir / "summary.parquet")
    (output_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    print(format_benchmark(rows))
    return rows


def format_benchmark(rows: list[dict]) -> str:
    header = f"{'#':>4} " + " ".join(f"{stage:>14}" for stage in STAGES) + f" {'total':>9} {'peak MiB':>9}"
    lines = [header]
    for row in rows:
        lines.append(f"{row['index']:>4} " + " ".join(f"{row[stage + '_s'] * 1e3:>12.1f}ms" for stage in STAGES)
                     + f" {row['total_s']:>8.2f}s {row['peak_memory_mib']:>9.0f}")
    return "\n".join(lines)
