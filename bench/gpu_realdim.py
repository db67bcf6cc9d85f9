"""Real-dimension benchmark: every model at its real width (and, on a GPU, real depth) with random weights.

Measures at 1024^2 (or less with --max-tokens): Qwen2.5-VL and Qwen3-VL extraction (one sample and bulk-edit's
batch), the bridge, one DiT step as the pipeline runs it, true CFG's two branches one after the other and as one
batch (and per attention backend), the top kernels of a step and the host syncs between steps (torch.profiler),
VAE encode and decode, the whole 50-step edit (eager, regionally compiled, whole-DiT compiled, CUDA graphs), the
fast modes against the exact edit on the same seed (step cache, FP8, both: PSNR and max abs difference), a
Lightning-style 8-step edit, images per GPU-hour for bulk-edit at its defaults, model load time from local
safetensors (GB/s), peak memory per stage against the planner's estimate, MFU against the planner's FLOPs, and
the bridge's share of the edit. Qwen-Image-2.1's DiT (class defaults, provisional) gets one row. Models are
built directly on the device in bf16 (`bridgecore/zoo/real_models.py`), one large model at a time (fits an 80 GB
card); the DiT is rebuilt with the same seeded weights for each variant. No download: the processors use the
real image settings and an offline tokenizer.

    python bench/gpu_realdim.py --device cuda --compile --json out.json   # H100/H200, full depth, ~6 min
    python bench/gpu_realdim.py --device cpu --layers 1 --max-tokens 256  # CI smoke run of the same path

Prints a table; --json FILE gets every number (written after each stage, so a killed run keeps its rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

PROMPT = "Change the text 'Hello' to 'Goodbye' and make the red circle blue"
MAX_AREA = 1024 * 1024
QWEN25_TOKEN_PX = 28


# -- measuring -----------------------------------------------------------------------------------------------


class Meter:
    """Wall time (synchronised) and peak memory (CUDA allocator, or the process's peak RSS on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> int:
        """Resets the peak; returns what is in use now (bytes)."""
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        return self._proc_status("VmRSS")

    def peak(self) -> int:
        self.sync()
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._proc_status("VmHWM")

    @staticmethod
    def _proc_status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def time(self, fn, repeats: int, warmup: int):
        """(median seconds, every timing, the last result)."""
        result = None
        for _ in range(warmup):
            result = fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            result = fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), times, result


def matmul_tflops(device: torch.device) -> float:
    """Achieved bf16 matmul rate on random data (on a CPU, in the dtype its real-width work runs in): the practical
    ceiling for MFU."""
    from bridgecore.model.loading import cpu_compute_dtype

    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else cpu_compute_dtype()
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    meter = Meter(device)
    seconds, _, _ = meter.time(lambda: a @ b, repeats=10 if device.type == "cuda" else 3, warmup=3)
    return 2 * n**3 / seconds / 1e12


# the exact edit's configurations (no approximation), by their stage name
EXACT_EDITS = {"denoise_and_decode": "eager", "denoise_and_decode_compiled": "regional torch.compile",
               "denoise_and_decode_whole_compiled": "whole-DiT torch.compile",
               "denoise_and_decode_cuda_graphs": "whole-DiT torch.compile, CUDA graphs"}

# what a host-device synchronisation looks like in torch.profiler's CPU events
HOST_SYNC_EVENTS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def count_step_cache_decisions(transformer) -> dict | None:
    """Counts the steps on which the step cache ran the remaining blocks (its head block's decision, taken outside
    any compiled graph, so compiled blocks are counted too); None when no step cache is on."""
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    registry = getattr(transformer.transformer_blocks[0], "_diffusers_hook", None)
    hook = registry.get_hook(_FBC_LEADER_BLOCK_HOOK) if registry is not None else None
    if hook is None:
        return None
    counted = {"computed": 0}
    decide = type(hook)._should_compute_remaining_blocks

    @torch.compiler.disable
    def counting(residual):
        computed = decide(hook, residual)
        counted["computed"] += bool(computed)
        return computed

    hook._should_compute_remaining_blocks = counting
    return counted


def device_events(events, cuda: bool) -> list:
    """On a GPU the kernels (and copies) only: an operator is also credited with the GPU time of the kernels it
    launched, so summing both counts that time twice (torch's own table sums the kernel events alone)."""
    from torch.autograd import DeviceType

    if not cuda:
        return list(events)
    return [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def self_time(event, device: bool) -> float:
    """An event's own time in microseconds: on the GPU's clock (`device`) or the CPU's."""
    return event.self_device_time_total if device else event.self_cpu_time_total


def sample_image(side: int = 1024):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (235, 232, 225))
    draw = ImageDraw.Draw(image)
    draw.rectangle((side // 8, side // 6, side // 2, side // 2), fill=(200, 40, 40))
    draw.ellipse((side // 2, side // 3, side - 40, side - 40), fill=(40, 70, 200))
    draw.text((side // 8, side - 120), "Hello", fill=(0, 0, 0))
    return image


# -- the benchmark -------------------------------------------------------------------------------------------


class RealDimBenchmark:
    def __init__(self, args: argparse.Namespace):
        from bridgecore.planning.job_cost import GPUS, gpu_key_for

        self.args = args
        self.device = torch.device(args.device)
        from bridgecore.model.loading import cpu_compute_dtype

        # bf16 on a GPU; on a CPU without fast bf16 (no AVX-512 BF16 / AMX) fp32: a smoke of the code path, not of
        # the real widths' arithmetic, which torch's reference bf16 GEMM would make ~100x slower
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else cpu_compute_dtype()
        self.meter = Meter(self.device)
        self.repeats = args.repeats or (3 if self.device.type == "cuda" else 1)
        self.warmup = 1 if self.device.type == "cuda" else 0  # CPU kernels need no warm-up; CI time does
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.gpu_key = gpu_key_for(name) if self.device.type == "cuda" else None
        self.peak_flops = GPUS[self.gpu_key].bf16_dense_flops if self.gpu_key else None
        self.area = MAX_AREA if args.max_tokens is None else min(MAX_AREA, args.max_tokens * QWEN25_TOKEN_PX**2)
        self.results: dict = {
            "device": name, "gpu_key": self.gpu_key, "torch": torch.__version__, "layers": args.layers,
            "real_depth": args.layers is None, "vocab_size": args.vocab_size, "steps": args.steps, "dtype": str(self.dtype).removeprefix("torch."),
            "peak_bf16_tflops": self.peak_flops and self.peak_flops / 1e12, "stages": {}, "edit": {}, "errors": {},
        }
        self.caches: dict = {}
        self.start = time.perf_counter()

    def estimates(self) -> tuple[float, float]:
        """(seconds of one exact edit, seconds of one regional compile) as measured so far, or cautious guesses."""
        stages = self.results["stages"]
        edit_s = stages.get("denoise_and_decode", {}).get("seconds", 60.0)
        compile_s = stages.get("dit_step_compiled", {}).get("first_call_s", 60.0)
        return edit_s, compile_s

    def affordable(self, name: str, need_s: float) -> bool:
        """Whether `name` (estimated at `need_s`) fits in --budget-s; if not it is skipped, saying so."""
        if self.time_left() >= need_s:
            return True
        self.results.setdefault("skipped", {})[name] = (f"--budget-s: {self.time_left():.0f} s left, about "
                                                        f"{need_s:.0f} s needed")
        self.save()
        return False

    def time_left(self) -> float:
        """Seconds left of --budget-s (infinite without one): long optional sections are skipped, not cut."""
        if self.args.budget_s is None:
            return float("inf")
        return self.args.budget_s - (time.perf_counter() - self.start)

    # -- bookkeeping

    def save(self) -> None:
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps(self.results, indent=1, default=float))

    def record(self, stage: str, seconds: float, flops: float | None = None, **extra) -> None:
        row = {"seconds": seconds, **extra}
        if flops:
            row["tflop"] = flops / 1e12
            row["achieved_tflops"] = flops / seconds / 1e12
            row["mfu"] = flops / seconds / self.peak_flops if self.peak_flops else None
        self.results["stages"][stage] = row
        self.save()
        print(f"  {stage:<28} {seconds * 1e3:10.1f} ms" + (f"  {row['achieved_tflops']:7.1f} TFLOP/s" if flops else ""),
              flush=True)

    def memory(self, resident: int, planned_activation: int | None = None) -> dict:
        peak = self.meter.peak()
        row = {"peak_gib": peak / 2**30, "resident_gib": resident / 2**30,
               "activation_gib": max(peak - resident, 0) / 2**30}
        if planned_activation is not None:
            row["planner_activation_gib"] = planned_activation / 2**30
        return row

    def stage(self, name: str, fn) -> None:
        """Runs one section; a failure is recorded and the benchmark goes on with the next."""
        from bridgecore.zoo.real_models import release_memory

        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - one broken section must not lose the others
            traceback.print_exc()
            self.results["errors"][name] = f"{type(error).__name__}: {error}"
        release_memory()
        self.results.setdefault("section_seconds", {})[name] = time.perf_counter() - start
        self.save()

    # -- sections

    def setup(self) -> None:
        from bridgecore.model.edit_prompt import condition_size, prepare_condition_images

        self.image = sample_image()
        self.resized = prepare_condition_images([self.image], plus=False, condition_area=self.area)[0]
        width, height = condition_size(self.image, self.area)
        self.condition_hw = (height, width)
        self.results.update(condition_size=[height, width], condition_pixels=height * width,
                            matmul_ceiling_tflops=matmul_tflops(self.device))
        print(f"device {self.results['device']}, condition {height}x{width}, layers "
              f"{self.args.layers or 'real'}, bf16 matmul {self.results['matmul_ceiling_tflops']:.1f} TFLOP/s", flush=True)

    def qwen25(self) -> None:
        from bridgecore.model.edit_prompt import EditPromptEncoder
        from bridgecore.model.extraction import qwen25_caches
        from bridgecore.planning.planner import vlm_activation_bytes, vlm_forward_flops
        from bridgecore.zoo.real_models import build_real_vlm, release_memory

        start = time.perf_counter()
        model, processor = build_real_vlm("qwen25_vl", self.device, self.dtype, self.args.layers,
                                          self.args.vocab_size)
        self.meter.sync()
        build_s = time.perf_counter() - start
        encoder = EditPromptEncoder(model, processor, condition_area=self.area)
        resident = self.meter.reset_peak()
        seconds, times, encoding = self.meter.time(lambda: encoder.encode([PROMPT], [[self.resized]], resized=True),
                                                   self.repeats, self.warmup)
        cache = qwen25_caches(encoding, [[self.resized]])[0]
        self.caches["qwen25"] = cache
        seq = encoding.drop_idx + len(cache.input_ids)
        grid = [tuple(int(v) for v in g) for g in cache.grid_thw.tolist()]
        patches = sum(t * h * w for t, h, w in grid)
        flops = vlm_forward_flops(model, seq, grid)["total"]
        self.record("qwen25_extract", seconds, flops, times=times, build_s=build_s, sequence=seq,
                    vision_tokens=cache.num_vision_tokens, parameters=sum(p.numel() for p in model.parameters()),
                    **self.memory(resident, vlm_activation_bytes(model, seq, patches)))
        # true CFG's negative prompt: encoded with the image, as Qwen-Image-Edit does (never bridged)
        negative = encoder.encode([" "], [[self.resized]], resized=True)
        self.caches["neg_embeds"] = negative.prompt_embeds.to(self.device, self.dtype)
        self.caches["neg_mask"] = negative.prompt_embeds_mask.to(self.device)
        batch = self.args.batch
        if batch > 1:  # bulk-edit encodes a batch of samples per forward
            seconds, times, _ = self.meter.time(
                lambda: encoder.encode([PROMPT] * batch, [[self.resized]] * batch, resized=True), self.repeats,
                self.warmup)
            self.record("qwen25_extract_batch", seconds, batch * flops, times=times, batch=batch,
                        per_sample_s=seconds / batch)
        if self.args.no_load:
            return
        root = Path(tempfile.mkdtemp(prefix="realdim-", dir=self.args.tmp))
        try:
            name, probe = max(model.state_dict().items(), key=lambda item: item[1].numel())
            expected = probe.float().pow(2).sum().item()
            start = time.perf_counter()
            model.save_pretrained(root / "text_encoder")
            processor.save_pretrained(root / "processor")
            save_s = time.perf_counter() - start
            del model, encoder, probe  # one large model at a time: the copy is freed before the load
            release_memory()
            self.load_time(root, name, expected, save_s)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def load_time(self, root: Path, name: str, expected: float, save_s: float) -> None:
        """Loads the saved model back through the library's loader (cold from disk when possible, then warm)."""
        from bridgecore.model.loading import LoadOptions, ResolvedModel, load_edit_text_encoder
        from bridgecore.zoo.real_models import release_memory

        size = sum(f.stat().st_size for f in (root / "text_encoder").glob("*.safetensors"))
        resolved = ResolvedModel("realdim", root, "realdim")
        options = LoadOptions(device=str(self.device), dtype=str(self.dtype).removeprefix("torch."))
        rows = {}
        for kind in ("cold", "warm"):
            if kind == "cold" and not self._drop_page_cache():
                continue
            start = time.perf_counter()
            loaded, _ = load_edit_text_encoder(resolved, options)
            self.meter.sync()
            rows[kind] = time.perf_counter() - start
            same = loaded.state_dict()[name].float().pow(2).sum().item() == expected
            del loaded
            release_memory()
            if not same:
                raise AssertionError(f"{name} differs after save + load")
        warm = rows["warm"]
        self.record("load_qwen25_vl", warm, None, gb=size / 1e9, gb_per_s=size / 1e9 / warm, save_s=save_s,
                    cold_s=rows.get("cold"), cold_gb_per_s=rows.get("cold") and size / 1e9 / rows["cold"],
                    path="LoadOptions -> from_pretrained" + (" (device_map: straight to the GPU)" if self.device.type == "cuda"
                                                             else " (CPU: memory-mapped, read lazily: not a disk rate)"))

    def _drop_page_cache(self) -> bool:
        """Empties the page cache so the next load reads the disk (root on a dedicated machine only)."""
        if self.device.type != "cuda" or not hasattr(os, "geteuid") or os.geteuid() != 0:
            return False
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3")
            return True
        except OSError:
            return False

    def qwen3(self) -> None:
        from bridgecore.model.extraction import default_layer_indices, encode_qwen3_features
        from bridgecore.planning.planner import vlm_activation_bytes, vlm_forward_flops
        from bridgecore.zoo.real_models import build_real_vlm

        start = time.perf_counter()
        model, processor = build_real_vlm("qwen3_vl", self.device, self.dtype, self.args.layers,
                                          self.args.vocab_size)
        self.meter.sync()
        build_s = time.perf_counter() - start
        layers = default_layer_indices(model.config.text_config.num_hidden_layers)
        resident = self.meter.reset_peak()
        seconds, times, caches = self.meter.time(
            lambda: encode_qwen3_features(model, processor, [PROMPT], [[self.resized]], layers), self.repeats, self.warmup)
        cache = self.caches["qwen3"] = caches[0]
        grid = [tuple(int(v) for v in g) for g in cache.grid_thw.tolist()]
        seq = len(cache.input_ids)
        flops = vlm_forward_flops(model, seq, grid)["total"]
        patches = sum(t * h * w for t, h, w in grid)
        self.record("qwen3_extract", seconds, flops, times=times, build_s=build_s, sequence=seq,
                    vision_tokens=cache.num_vision_tokens, parameters=sum(p.numel() for p in model.parameters()),
                    **self.memory(resident, vlm_activation_bytes(model, seq, patches)))
        batch = self.args.batch
        if batch > 1:
            seconds, times, _ = self.meter.time(
                lambda: encode_qwen3_features(model, processor, [PROMPT] * batch, [[self.resized]] * batch, layers),
                self.repeats, self.warmup)
            self.record("qwen3_extract_batch", seconds, batch * flops, times=times, batch=batch,
                        per_sample_s=seconds / batch)

    def bridge(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        from bridgecore.model.bridge import BridgeConfig, VisionCacheBridge

        qwen3, qwen25 = self.caches["qwen3"], self.caches["qwen25"]
        # the default design (correction and appended tokens); an open gate runs the whole computation, as trained
        bridge = VisionCacheBridge(BridgeConfig.from_caches(qwen3, qwen25, mode="both")).to(self.device).eval()
        with torch.no_grad():
            bridge.gate.fill_(0.5)
            resident = self.meter.reset_peak()
            seconds, times, output = self.meter.time(lambda: bridge(qwen3, qwen25), self.repeats, self.warmup)
            with FlopCounterMode(display=False) as counter:
                bridge(qwen3, qwen25)
        self.caches["embeds"] = output.prompt_embeds.to(self.device, self.dtype)  # [1, L, 3584]
        self.caches["mask"] = output.prompt_embeds_mask.to(self.device)
        self.record("bridge", seconds, counter.get_total_flops(), times=times, parameters=bridge.num_parameters(),
                    **self.memory(resident))

    # -- the DiT: the exact path, batched CFG, attention backends, profiles, edits, compile, FP8

    def build_dit(self):
        """A fresh DiT with the same random weights every time (seeded): variants are compared on equal terms."""
        from bridgecore.zoo.real_models import build_real_model, release_memory

        torch._dynamo.reset()  # compiled code of an earlier variant may still hold its DiT's 38 GiB
        release_memory()
        start = time.perf_counter()
        transformer = build_real_model("transformer", self.device, self.dtype, self.args.layers)
        self.meter.sync()
        return transformer, time.perf_counter() - start

    def dit_inputs(self, transformer) -> tuple[dict, dict, float, float]:
        """The DiT's inputs as the pipeline passes them, for the positive and the negative prompt (the same latents
        object, as in the pipeline's loop), and each branch's FLOPs."""
        from bridgecore.planning.planner import dit_step_flops

        height, width = self.condition_hw
        lat_h, lat_w = height // 16, width // 16
        tokens = 2 * lat_h * lat_w  # noisy target + condition latents
        generator = torch.Generator(self.device).manual_seed(0)
        hidden = torch.randn(1, tokens, transformer.config.in_channels, generator=generator, device=self.device,
                             dtype=self.dtype)

        def branch(embeds, mask):
            # diffusers' encode_prompt drops an all-ones mask (another attention path): the DiT gets none
            return dict(hidden_states=hidden, encoder_hidden_states=embeds,
                        encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                        timestep=torch.tensor([0.5], device=self.device, dtype=self.dtype),
                        img_shapes=[[(1, lat_h, lat_w), (1, lat_h, lat_w)]], return_dict=False)

        positive = branch(self.caches["embeds"], self.caches["mask"])
        negative = branch(self.caches["neg_embeds"], self.caches["neg_mask"])
        return (positive, negative, dit_step_flops(transformer, tokens, positive["encoder_hidden_states"].shape[1]),
                dit_step_flops(transformer, tokens, negative["encoder_hidden_states"].shape[1]))

    def dit_and_vae(self) -> None:
        from bridgecore.planning.planner import dit_activation_bytes

        transformer, build_s = self.build_dit()
        positive, negative, flops, neg_flops = self.dit_inputs(transformer)
        tokens, text = positive["hidden_states"].shape[1], positive["encoder_hidden_states"].shape[1]
        self.caches["dit_probe"] = self.weight_probe(transformer)

        def step():
            return transformer(**positive)[0]

        def cfg_step():  # the pipeline's true CFG: the positive and the negative prompt's forwards, one after the other
            return transformer(**positive)[0], transformer(**negative)[0]

        with torch.no_grad():
            resident = self.meter.reset_peak()
            seconds, times, out = self.meter.time(step, self.repeats, self.warmup)
            self.record("dit_step", seconds, flops, times=times, build_s=build_s, image_tokens=tokens,
                        text_tokens=text, finite=bool(torch.isfinite(out).all()),
                        text_mask="none (all ones: dropped, as the pipeline does)"
                        if positive["encoder_hidden_states_mask"] is None else "mixed",
                        parameters=sum(p.numel() for p in transformer.parameters()),
                        **self.memory(resident, dit_activation_bytes(transformer, tokens + text)))
            seconds, times, reference = self.meter.time(cfg_step, self.repeats, self.warmup)
            self.record("dit_step_cfg", seconds, flops + neg_flops, times=times,
                        negative_text_tokens=negative["encoder_hidden_states"].shape[1])
            self.batched_cfg_step(transformer, positive, negative, flops + neg_flops, reference)
            if self.device.type == "cuda":
                self.attention_backends(transformer, step, cfg_step, reference, flops, positive, negative,
                                        flops + neg_flops)
            self.profile_step(step)
        self.vae_and_edit(transformer, flops)
        edit_s, compile_s = self.estimates()
        if self.args.compile and self.affordable("denoise_and_decode_compiled", compile_s + 1.3 * edit_s + 20):
            self.use_best_backend(transformer)
            self.compiled_step(transformer, step, flops)
            self.compiled_edit(transformer, flops)

    def weight_probe(self, transformer) -> float:
        block = transformer.transformer_blocks[0].img_mlp.net[2].weight
        return float(block.float().pow(2).sum())

    def batched_cfg_step(self, transformer, positive: dict, negative: dict, flops: float, reference,
                         label: str = "dit_step_cfg_batched") -> None:
        """True CFG's two branches as one padded batch (`speed.enable_batched_cfg`), called as the pipeline calls
        them; the difference from the sequential branches is kernel rounding (bf16) only."""
        from bridgecore.model.speed import disable_batched_cfg, enable_batched_cfg

        hook = enable_batched_cfg(transformer)

        def pair():
            with transformer.cache_context("cond"):
                cond = transformer(**positive)[0]
            with transformer.cache_context("uncond"):
                uncond = transformer(**negative)[0]
            return cond, uncond

        try:
            pair()  # the first call learns the negative inputs, as the pipeline's first step does
            before = hook.batched_steps
            seconds, times, (cond, uncond) = self.meter.time(pair, self.repeats, self.warmup)
            batched = hook.batched_steps - before
        finally:
            disable_batched_cfg(transformer)

        def relative(a, b):
            return float((a.float() - b.float()).abs().max() / b.float().abs().max())

        self.record(label, seconds, flops, times=times, batched_calls=batched,
                    speedup_vs_sequential=self.results["stages"][label.replace("_batched", "")]["seconds"] / seconds,
                    max_rel_diff_vs_sequential=max(relative(cond, reference[0]), relative(uncond, reference[1])),
                    padded_text_tokens=max(positive["encoder_hidden_states"].shape[1],
                                           negative["encoder_hidden_states"].shape[1]))

    def attention_backends(self, transformer, step, cfg_step, reference, flops: float, positive: dict, negative: dict,
                           cfg_flops: float) -> None:
        """Per backend: the single step (no mask: the pipeline's path), true CFG's two forwards one after the other,
        and as one batch (padded: a mask; a backend that refuses masks makes the hook fall back, batched_calls 0)."""
        from bridgecore.model.speed import set_attention_backend

        for backend in ("_native_cudnn", "_native_efficient", "_native_flash"):
            for name, run in ((f"dit_step[{backend}]", lambda: self.record_step(name, step, flops)),
                              (f"dit_step_cfg[{backend}]", lambda: self.record_step(name, cfg_step, cfg_flops)),
                              (f"dit_step_cfg_batched[{backend}]",
                               lambda: self.batched_cfg_step(transformer, positive, negative, cfg_flops, reference,
                                                             label=name))):
                try:
                    set_attention_backend(transformer, backend)
                    run()
                except Exception as error:  # noqa: BLE001 - a backend may refuse the mask or the card
                    self.results["errors"][name] = f"{type(error).__name__}: {error}"[:500]
                finally:
                    transformer.reset_attention_backend()

    def use_best_backend(self, transformer) -> None:
        """The compiled variants (exact and FP8) run the attention backend that was fastest on the plain step (the
        exact mode is the fastest exact configuration measured, the kernel included)."""
        from bridgecore.model.speed import set_attention_backend

        stages = self.results["stages"]
        timed = {"native": stages["dit_step"]["seconds"]} | {
            name[len("dit_step["):-1]: row["seconds"] for name, row in stages.items() if name.startswith("dit_step[")}
        best = min(timed, key=timed.get)
        self.results["attention_backend"] = best
        if best != "native":
            set_attention_backend(transformer, best)

    def record_step(self, name: str, step, flops: float) -> None:
        seconds, times, _ = self.meter.time(step, self.repeats, self.warmup)
        self.record(name, seconds, flops, times=times)

    def profile_step(self, step) -> None:
        """torch.profiler over one DiT step: the top kernels (GPU) or operators (CPU) by their own time."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])  # GPU: kernels too
        step()
        self.meter.sync()
        with profile(activities=activities) as prof:
            step()
            self.meter.sync()
        rows = []
        events = [e for e in device_events(prof.key_averages(), cuda) if self_time(e, cuda) > 0]
        total = sum(self_time(e, cuda) for e in events) or 1
        for event in sorted(events, key=lambda e: self_time(e, cuda), reverse=True)[:15]:
            rows.append({"name": event.key[:120], "calls": event.count, "self_ms": self_time(event, cuda) / 1e3,
                         "share": self_time(event, cuda) / total})
        self.results["profile_dit_step"] = {"clock": "GPU kernels" if cuda else "CPU operators",
                                            "total_ms": total / 1e3, "top": rows}
        self.save()
        print("  top: " + "; ".join(f"{r['name'][:40]} {r['share']:.0%}" for r in rows[:5]), flush=True)

    def profile_edit(self, pipe, call) -> None:
        """Host work between steps: a 2-step and a 4-step edit (latents out, no decode) under the profiler; the
        difference / 2 is one step's host reads (`.item()`, synchronisations) and, on a GPU, its idle time."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])  # GPU: kernels too
        counts = {}
        for steps in (2, 4):
            call(steps)
            self.meter.sync()
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                call(steps)
                self.meter.sync()
                wall = time.perf_counter() - start
            events = prof.key_averages()
            syncs = sum(e.count for e in events if e.key in HOST_SYNC_EVENTS)
            reads = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")
            busy = sum(self_time(e, True) for e in device_events(events, True)) / 1e6 if cuda else None
            counts[steps] = (syncs, reads, wall, busy)
        (s2, r2, w2, b2), (s4, r4, w4, b4) = counts[2], counts[4]
        row = {"host_syncs_per_step": (s4 - s2) / 2, "host_reads_per_step": (r4 - r2) / 2,
               "wall_s_per_step": (w4 - w2) / 2}
        if cuda:
            row["gpu_idle_fraction_per_step"] = max(0.0, 1 - (b4 - b2) / max(w4 - w2, 1e-9))
        self.results["profile_edit"] = row
        self.save()
        print(f"  per step: {row['host_syncs_per_step']:g} host syncs, {row['host_reads_per_step']:g} .item() reads"
              + (f", GPU idle {row['gpu_idle_fraction_per_step']:.1%}" if cuda else ""), flush=True)

    def edit_pipeline(self, transformer, vae):
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

        from bridgecore.zoo.real_models import REAL_SCHEDULER_CONFIG

        pipe = QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**REAL_SCHEDULER_CONFIG), vae=vae,
                                     text_encoder=None, tokenizer=None, processor=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def edit_call(self, pipe, steps: int | None = None, output_type: str = "np"):
        from bridgecore.model.edit_pipeline import call_with_areas

        def edit():
            result = call_with_areas(pipe, self.area, self.area, image=self.image, prompt_embeds=self.caches["embeds"],
                                     prompt_embeds_mask=self.caches["mask"], true_cfg_scale=1.0,
                                     num_inference_steps=steps or self.args.steps, output_type=output_type,
                                     generator=torch.Generator(self.device).manual_seed(0)).images
            return result[0] if output_type == "np" else result

        return edit

    def vae_and_edit(self, transformer, dit_flops: float) -> None:
        from bridgecore.model.edit_benchmark import ModuleTimer
        from bridgecore.zoo.real_models import build_real_model

        vae = self.caches["vae"] = build_real_model("vae", self.device, self.dtype)
        if self.device.type == "cuda":  # on a CPU the VAE (its slowest part) is timed inside the whole edit only
            self.vae_stages(vae)
        pipe = self.edit_pipeline(transformer, vae)
        edit = self.edit_call(pipe)
        timers = {name: ModuleTimer(getattr(vae, name), self.device) for name in ("encoder", "decoder")}
        try:
            resident = self.meter.reset_peak()
            seconds, times, image = self.meter.time(edit, repeats=1, warmup=0)  # the DiT (and VAE) are already warm
        finally:
            for timer in timers.values():
                timer.remove()
        self.caches["exact_image"] = image
        self.record("denoise_and_decode", seconds, self.args.steps * dit_flops, times=times,
                    vae_encode_s=timers["encoder"].seconds, vae_decode_s=timers["decoder"].seconds,
                    output_shape=list(image.shape), finite=bool(np.isfinite(image).all()), **self.memory(resident))
        self.summarise_edit()
        with torch.no_grad():
            self.profile_edit(pipe, lambda steps: self.edit_call(pipe, steps, output_type="latent")())
        for threshold in self.args.step_cache:
            if len(transformer.transformer_blocks) < 2:  # --layers 1: nothing to skip
                self.results.setdefault("skipped", {})[f"step_cache[{threshold}]"] = (
                    "the step cache needs a DiT with at least two transformer blocks")
                continue
            if self.affordable(f"step_cache[{threshold}]", seconds + 10):
                self.stage(f"step_cache[{threshold}]", lambda: self.approximate_edit(
                    f"step_cache[{threshold}]", pipe, edit, step_cache=threshold))
        if self.args.lightning_steps and self.affordable("lightning_edit", seconds * self.args.lightning_steps
                                                         / self.args.steps + 10):
            self.stage("lightning_edit", lambda: self.lightning_edit(pipe, dit_flops))

    def approximate_edit(self, name: str, pipe, edit, step_cache: float = 0.0, baseline: str = "denoise_and_decode",
                         **extra) -> None:
        """A fast-mode edit on the same seed: its time against `baseline` (the exact edit in the same configuration:
        eager, or compiled with the same attention backend) and how far its decoded image is from the exact edit
        (PSNR, max abs difference; with random weights a numerical check, not a quality claim)."""
        from bridgecore.model.speed import enable_step_cache

        exact = self.caches["exact_image"]
        if step_cache:
            enable_step_cache(pipe.transformer, step_cache)
        decisions = count_step_cache_decisions(pipe.transformer)
        try:
            seconds, times, image = self.meter.time(edit, repeats=1, warmup=0)
        finally:
            if step_cache:
                pipe.transformer.disable_cache()
        mse = float(np.mean((image.astype(np.float64) - exact.astype(np.float64)) ** 2))
        stages = self.results["stages"]
        baseline = baseline if baseline in stages else "denoise_and_decode"
        self.record(name, seconds, None, times=times, step_cache=step_cache or None,
                    steps_computed=self.args.steps if decisions is None else decisions["computed"],
                    steps=self.args.steps, psnr_vs_exact_db=None if mse == 0 else 10 * np.log10(1.0 / mse),
                    max_abs_vs_exact=float(np.abs(image - exact).max()), baseline=baseline,
                    speedup_vs_exact=stages[baseline]["seconds"] / seconds,
                    speedup_vs_fastest_exact=self.fastest_exact_denoise() / seconds, **extra)

    def fastest_exact_denoise(self) -> float:
        stages = self.results["stages"]
        return min(stages[name]["seconds"] for name in EXACT_EDITS if name in stages)

    def lightning_edit(self, pipe, dit_flops: float) -> None:
        """The Lightning LoRA's few-step edit: its scheduler, no CFG (a fused LoRA adds no per-step cost, so the
        random weights time what the distilled model runs)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from bridgecore.model.speed import LIGHTNING_SCHEDULER_OVERRIDES

        default = pipe.scheduler
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**default.config, **LIGHTNING_SCHEDULER_OVERRIDES})
        try:
            steps = self.args.lightning_steps
            seconds, times, image = self.meter.time(self.edit_call(pipe, steps), repeats=1, warmup=0)
        finally:
            pipe.scheduler = default
        self.record("lightning_edit", seconds, steps * dit_flops, times=times, steps=steps,
                    finite=bool(np.isfinite(image).all()))

    def vae_stages(self, vae) -> None:
        from bridgecore.planning.planner import vae_decode_bytes

        height, width = self.condition_hw
        latents = torch.randn(1, vae.config.z_dim, 1, height // 8, width // 8, device=self.device, dtype=self.dtype)
        pixels = torch.rand(1, 3, 1, height, width, device=self.device, dtype=self.dtype) * 2 - 1
        with torch.no_grad():
            resident = self.meter.reset_peak()
            seconds, times, _ = self.meter.time(lambda: vae.decode(latents, return_dict=False)[0], self.repeats,
                                                self.warmup)
            self.record("vae_decode", seconds, None, times=times,
                        **self.memory(resident, vae_decode_bytes(vae, height, width)))
            resident = self.meter.reset_peak()
            seconds, times, _ = self.meter.time(lambda: vae.encode(pixels).latent_dist.mode(), self.repeats, self.warmup)
            self.record("vae_encode", seconds, None, times=times, **self.memory(resident))

    def summarise_edit(self) -> None:
        stages = self.results["stages"]
        parts = {name: stages[name]["seconds"] for name in ("qwen25_extract", "qwen3_extract", "bridge",
                                                            "denoise_and_decode") if name in stages}
        if len(parts) < 4:
            return
        whole = sum(parts.values())
        baseline = parts["qwen25_extract"] + parts["denoise_and_decode"]  # plain Qwen-Image-Edit
        # the isolated DiT step must time what the pipeline runs: steps x step + the VAE vs the whole denoise+decode
        edit = stages["denoise_and_decode"]
        from_steps = (self.args.steps * stages["dit_step"]["seconds"] + (edit.get("vae_encode_s") or 0)
                      + (edit.get("vae_decode_s") or 0))
        self.results["edit"] = {
            "steps": self.args.steps, "enhanced_s": whole, "baseline_s": baseline, "parts_s": parts,
            "bridge_share": parts["bridge"] / whole,
            "qwen3_and_bridge_overhead": (parts["qwen3_extract"] + parts["bridge"]) / baseline,
            "steps_x_dit_step_over_edit": from_steps / edit["seconds"],  # ~1 when the benchmark times the real path
            "note": "models resident in turn (one at a time); model loading excluded",
        }
        self.summarise_exact()
        print(f"  whole edit {whole:.2f} s (baseline {baseline:.2f} s); bridge share {parts['bridge'] / whole:.2e}; "
              f"steps x isolated DiT step + VAE = {from_steps / edit['seconds']:.3f} x the denoise+decode", flush=True)

    def summarise_exact(self) -> None:
        """The headline against vLLM-Omni's 17.78 s: plain Qwen-Image-Edit (Qwen2.5-VL encoding, every DiT step, the
        VAE), bf16, no approximation, in the fastest exact configuration measured; at reduced depth (--layers) a
        smoke number only. Then images per GPU-hour for bulk-edit at its defaults (batched extraction, bridge,
        edit, decode; models resident, loading and storage excluded)."""
        stages = self.results["stages"]
        exact = {name: stages[name]["seconds"] for name in EXACT_EDITS if name in stages}
        if "qwen25_extract" not in stages or not exact:
            return
        best = min(exact, key=exact.get)
        self.results["exact_edit_seconds"] = stages["qwen25_extract"]["seconds"] + exact[best]
        backend = self.results.get("attention_backend", "native")
        self.results["exact_edit_config"] = EXACT_EDITS[best] + (
            f", attention {backend}" if best != "denoise_and_decode" and backend != "native" else "")
        self.results["exact_edit_note"] = (f"{self.args.steps} steps, " + ("real depth" if self.args.layers is None
                                                                             else f"{self.args.layers} DiT layers only"))

        def per_sample(stage: str) -> float:
            batched = stages.get(f"{stage}_batch")
            return batched["per_sample_s"] if batched else stages[stage]["seconds"]

        if {"qwen3_extract", "bridge"} <= set(stages):
            conditioning = per_sample("qwen25_extract") + per_sample("qwen3_extract") + stages["bridge"]["seconds"]
            # bulk-edit at its defaults: no --compile, the default attention, the eager edit
            throughput = {"batch": self.args.batch, "seconds_per_image": conditioning + exact["denoise_and_decode"],
                          "config": "eager (bulk-edit's defaults)", "steps": self.args.steps,
                          "note": "derived from the stage times measured here: extraction at the job's batch size, "
                                  "the DiT at batch 1 (compute-bound: a batch costs the same per image), models "
                                  "resident, loading, storage and CPU decoding excluded"}
            throughput["images_per_gpu_hour"] = 3600 / throughput["seconds_per_image"]
            if best != "denoise_and_decode":  # the fastest exact configuration, and whether bulk-edit can run it
                fastest = conditioning + exact[best]
                flags = ("--compile" + (f" --attention-backend {backend}" if backend != "native" else "")
                         if best == "denoise_and_decode_compiled" else None)
                throughput.update(fastest_config=self.results["exact_edit_config"], fastest_seconds_per_image=fastest,
                                  fastest_images_per_gpu_hour=3600 / fastest,
                                  fastest_flags=flags or "none: compile_transformer(whole=True) in the library only")
            if "lightning_edit" in stages:
                lightning = conditioning + stages["lightning_edit"]["seconds"]
                throughput.update(lightning_steps=stages["lightning_edit"]["steps"], lightning_config="eager",
                                  lightning_seconds_per_image=lightning, lightning_images_per_gpu_hour=3600 / lightning)
            self.results["throughput"] = throughput
        self.save()

    def compiled_step(self, transformer, step, flops: float) -> None:
        from bridgecore.model.speed import compile_transformer

        compile_transformer(transformer)
        with torch.no_grad():
            self.meter.sync()
            start = time.perf_counter()
            step()
            self.meter.sync()
            compile_s = time.perf_counter() - start
            seconds, times, _ = self.meter.time(step, self.repeats, self.warmup)
        self.record("dit_step_compiled", seconds, flops, times=times, first_call_s=compile_s)

    def compiled_edit(self, transformer, flops: float, name: str = "denoise_and_decode_compiled") -> None:
        """The whole edit with the compiled DiT (the exact mode's candidate), after one warm-up edit at 2 steps."""
        pipe = self.edit_pipeline(transformer, self.caches["vae"])
        self.edit_call(pipe, 2)()  # compiles at the job's shapes (guards on step count are none: 2 steps suffice)
        seconds, times, image = self.meter.time(self.edit_call(pipe), repeats=1, warmup=0)
        exact = self.caches["exact_image"]
        self.record(name, seconds, self.args.steps * flops, times=times,
                    max_abs_vs_eager=float(np.abs(image - exact).max()),
                    speedup_vs_eager=self.results["stages"]["denoise_and_decode"]["seconds"] / seconds)
        self.summarise_exact()

    def fp8(self) -> None:
        """The fast mode's FP8 (a fresh DiT with the same weights, converted in place): one step, the whole edit
        against the exact one, and with --compile the regionally compiled FP8 edit, then FP8 + the step cache."""
        from bridgecore.model.speed import compile_transformer, enable_fp8

        mode = self.args.fp8
        transformer, _ = self.build_dit()
        if self.weight_probe(transformer) != self.caches.get("dit_probe"):
            raise AssertionError("the rebuilt DiT's weights differ from the exact run's: no comparison possible")
        positive, _, flops, _ = self.dit_inputs(transformer)
        start = time.perf_counter()
        converted = enable_fp8(transformer, mode)
        self.meter.sync()
        convert_s = time.perf_counter() - start
        with torch.no_grad():
            resident = self.meter.reset_peak()
            seconds, times, _ = self.meter.time(lambda: transformer(**positive)[0], self.repeats, self.warmup)
        self.record(f"dit_step_fp8[{mode}]", seconds, flops, times=times, layers_converted=len(converted),
                    convert_s=convert_s, **self.memory(resident))
        pipe = self.edit_pipeline(transformer, self.caches["vae"])
        self.approximate_edit(f"fp8_edit[{mode}]", pipe, self.edit_call(pipe), fp8=mode)
        edit_s, compile_s = self.estimates()
        if self.args.compile and self.affordable(f"fp8_edit_compiled[{mode}]", compile_s + 1.2 * edit_s + 20):
            self.use_best_backend(transformer)  # as the compiled exact edit it is compared with
            compile_transformer(transformer)
            self.edit_call(pipe, 2)()  # compiles
            self.approximate_edit(f"fp8_edit_compiled[{mode}]", pipe, self.edit_call(pipe), fp8=mode,
                                  baseline="denoise_and_decode_compiled")
            fast = f"fast_mode_edit[{mode}+step_cache]"
            if (self.args.step_cache and len(transformer.transformer_blocks) >= 2
                    and self.affordable(fast, compile_s + edit_s + 20)):
                from bridgecore.model.speed import enable_step_cache

                threshold = self.args.step_cache[0]
                for module in transformer.modules():  # recompiled with the cache's hooks (graph breaks at them)
                    module._compiled_call_impl = None
                enable_step_cache(transformer, threshold)
                compile_transformer(transformer)
                self.edit_call(pipe, 2)()
                self.approximate_edit(fast, pipe, self.edit_call(pipe), fp8=mode, step_cache_threshold=threshold,
                                      baseline="denoise_and_decode_compiled")

    def whole_compile(self) -> None:
        """The whole DiT compiled as one graph (then, on a GPU with time left, replayed as a CUDA graph)."""
        from bridgecore.model.speed import compile_transformer
        from bridgecore.zoo.real_models import release_memory

        for name, options in (("denoise_and_decode_whole_compiled", {}),
                              ("denoise_and_decode_cuda_graphs", {"mode": "reduce-overhead"})):
            if options and self.device.type != "cuda":
                self.results.setdefault("skipped", {})[name] = "CUDA graphs need a GPU"
                continue
            # one graph of 60 blocks: guessed at 8 regional compiles (each block traced and lowered again)
            edit_s, compile_s = self.estimates()
            if not self.affordable(name, 8 * compile_s + 1.3 * edit_s + 30):
                continue
            transformer, _ = self.build_dit()
            self.use_best_backend(transformer)
            compile_transformer(transformer, options, whole=True)
            _, _, flops, _ = self.dit_inputs(transformer)
            start = time.perf_counter()
            self.compiled_edit(transformer, flops, name)
            self.results["stages"][name]["compile_and_edit_s"] = time.perf_counter() - start
            del transformer  # before the next variant is built: two DiTs do not fit an 80 GB card
            release_memory()


    def qwen_image21(self) -> None:
        """Qwen-Image-2.1's DiT at its class defaults (provisional: no released config is shipped here)."""
        from torch.utils.flop_counter import FlopCounterMode

        from bridgecore.zoo.real_models import build_real_model

        transformer = build_real_model("qwen_image21_transformer", self.device, self.dtype, self.args.layers)
        height, width = self.condition_hw
        lat_h, lat_w = height // 16, width // 16  # its VAE compresses 16x, 64 channels, 1x1 patches
        slots = (lat_h // 2) * (lat_w // 2)  # one VLM image slot per 2x2 latent tokens
        prefix, suffix = 14, 20
        text_len = prefix + slots + suffix
        img_mask = torch.zeros(1, text_len + slots, dtype=torch.bool, device=self.device)
        img_mask[0, prefix:prefix + slots] = True
        img_mask[0, text_len:] = True  # the target image's slots come last
        inputs = dict(
            hidden_states=torch.randn(1, 2 * lat_h * lat_w, transformer.config.in_channels, device=self.device,
                                      dtype=self.dtype),
            encoder_hidden_states=torch.randn(1, text_len, transformer.config.context_in_dim, device=self.device,
                                              dtype=self.dtype),
            encoder_hidden_states_mask=torch.ones(1, text_len, dtype=torch.bool, device=self.device),
            timestep=torch.tensor([0.5], device=self.device, dtype=self.dtype),
            img_shapes=[[(1, lat_h, lat_w), (1, lat_h, lat_w)]], img_mask=img_mask, return_dict=False)
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                transformer(**inputs)
            resident = self.meter.reset_peak()
            seconds, times, _ = self.meter.time(lambda: transformer(**inputs)[0], self.repeats, self.warmup)
        self.record("qwen_image21_step", seconds, counter.get_total_flops(), times=times, provisional=True,
                    parameters=sum(p.numel() for p in transformer.parameters()),
                    flop_method="torch.utils.flop_counter", **self.memory(resident))

    def run(self) -> dict:
        start = time.perf_counter()
        self.setup()
        self.stage("qwen25", self.qwen25)
        self.stage("qwen3", self.qwen3)
        self.stage("bridge", self.bridge)
        self.caches.pop("qwen3", None)
        if not self.args.no_qwen21:
            self.stage("qwen_image21", self.qwen_image21)
        self.stage("dit_and_vae", self.dit_and_vae)
        edit_s, _ = self.estimates()
        if self.args.fp8 != "off" and "exact_image" in self.caches and self.affordable("fp8", 1.5 * edit_s + 40):
            self.stage("fp8", self.fp8)
        if self.args.compile and "exact_image" in self.caches:  # last: the longest compile
            self.stage("whole_compile", self.whole_compile)
        self.summarise_exact()  # again: the sections after the exact edit (Lightning, compile) may improve it
        self.results["total_s"] = time.perf_counter() - start
        self.save()
        return self.results


def format_table(results: dict) -> str:
    width = max([28] + [len(name) + 1 for name in results["stages"]])
    lines = [f"{results['device']} | condition {results['condition_size'][0]}x{results['condition_size'][1]} | "
             f"layers {results['layers'] or 'real'} | bf16 matmul ceiling {results['matmul_ceiling_tflops']:.1f} TFLOP/s"
             + (f" (datasheet {results['peak_bf16_tflops']:.0f})" if results["peak_bf16_tflops"] else ""),
             f"{'stage':<{width}}{'ms':>10}{'TFLOP':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'act GiB':>9}{'plan act':>9}"]
    for name, row in results["stages"].items():
        def cell(key, fmt):
            value = row.get(key)
            width = fmt.lstrip(">").split(".")[0]
            return format(value, fmt) if isinstance(value, (int, float)) else format("-", f">{width}")

        lines.append(f"{name:<{width}}{row['seconds'] * 1e3:>10.1f}{cell('tflop', '>9.2f')}{cell('achieved_tflops', '>9.1f')}"
                     f"{cell('mfu', '>7.2f')}{cell('peak_gib', '>10.2f')}{cell('activation_gib', '>9.2f')}"
                     f"{cell('planner_activation_gib', '>9.2f')}")
    load = results["stages"].get("load_qwen25_vl")
    if load:
        lines.append(f"load Qwen2.5-VL from local safetensors: {load['gb']:.1f} GB, warm {load['gb_per_s']:.2f} GB/s"
                     + (f", cold {load['cold_gb_per_s']:.2f} GB/s" if load.get("cold_gb_per_s") else ""))
    edit = results.get("edit")
    if edit:
        lines.append(f"whole edit ({edit['steps']} steps): enhanced {edit['enhanced_s']:.2f} s, baseline "
                     f"{edit['baseline_s']:.2f} s, bridge share {edit['bridge_share']:.2e}, Qwen3-VL + bridge "
                     f"overhead {edit['qwen3_and_bridge_overhead']:.1%}")
    if results.get("exact_edit_seconds"):
        lines.append(f"exact edit ({results['exact_edit_note']}): {results['exact_edit_seconds']:.2f} s, "
                     f"{results['exact_edit_config']} (vLLM-Omni on one H200: 17.78 s)")
    throughput = results.get("throughput")
    if throughput:
        per = "GPU-hour" if results["gpu_key"] or results["device"] != "cpu" else "hour of this CPU"
        lines.append(f"bulk-edit at its defaults: {throughput['images_per_gpu_hour']:.0f} images per {per}"
                     + (f"; fastest exact ({throughput['fastest_config']}; flags: {throughput['fastest_flags']}): "
                        f"{throughput['fastest_images_per_gpu_hour']:.0f}" if "fastest_config" in throughput else "")
                     + (f"; with Lightning ({throughput['lightning_steps']} steps): "
                        f"{throughput['lightning_images_per_gpu_hour']:.0f}" if "lightning_steps" in throughput else ""))
    for name, row in results["stages"].items():
        if "psnr_vs_exact_db" in row:
            psnr = row["psnr_vs_exact_db"]
            lines.append(f"{name}: x{row['speedup_vs_exact']:.2f} vs exact, PSNR "
                         + ("identical" if psnr is None else f"{psnr:.1f} dB") + f", max abs {row['max_abs_vs_exact']:.3f}")
    profile = results.get("profile_edit")
    if profile:
        lines.append(f"per step: {profile['host_syncs_per_step']:g} host syncs, {profile['host_reads_per_step']:g} "
                     ".item() reads" + (f", GPU idle {profile['gpu_idle_fraction_per_step']:.1%}"
                                        if "gpu_idle_fraction_per_step" in profile else ""))
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"skipped {name}: {reason}")
    for name, error in results["errors"].items():
        lines.append(f"error in {name}: {error[:200]}")
    lines.append(f"total {results['total_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--layers", type=int, default=None, help="depth of every VLM, vision tower and DiT "
                        "(default: the real depth); widths stay real")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap Qwen2.5-VL vision tokens by shrinking "
                        "the image area (default: 1024^2, 1369 tokens)")
    parser.add_argument("--steps", type=int, default=None, help="steps of the whole edit (default 50 on cuda, 2 on cpu; "
                        "at least 2: one step with the scheduler's terminal shift is NaN in diffusers)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per stage (default 3 cuda, 1 cpu)")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--compile", action="store_true", help="also time the regionally compiled DiT (step and edit), "
                        "the whole-DiT compile and, on a GPU with time left, CUDA graphs")
    parser.add_argument("--fp8", choices=["off", "dynamic", "weights"], default=None,
                        help="FP8 mode to time against the exact edit (default: dynamic on an FP8-capable GPU, else "
                             "weights; off: skip)")
    parser.add_argument("--batch", type=int, default=None, help="extraction batch size (default: bulk-edit's "
                        "JobSettings.batch_size)")
    parser.add_argument("--lightning-steps", type=int, default=8, help="steps of the Lightning-style few-step edit "
                        "(0: skip)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds this run may take: the FP8 and CUDA-graph "
                        "sections are skipped (and said so) when too little is left")
    parser.add_argument("--step-cache", type=float, nargs="*", default=[0.08, 0.2],
                        help="First Block Cache thresholds to time against the exact edit (fast mode; none: skip)")
    parser.add_argument("--vocab-size", type=int, default=None, help="VLM vocabulary override for CPU smoke runs "
                        "(only the embedding tables shrink; default: the real vocabularies)")
    parser.add_argument("--no-load", action="store_true", help="skip the save + load timing")
    parser.add_argument("--no-qwen21", action="store_true", help="skip Qwen-Image-2.1's DiT")
    parser.add_argument("--tmp", default=None, help="folder for the load-time checkpoint (default: the temp dir)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    args.steps = args.steps or (50 if args.device.startswith("cuda") else 2)
    if args.batch is None:
        from bridgecore.batch.settings import JOB_DEFAULTS

        args.batch = JOB_DEFAULTS["batch_size"]
    if args.fp8 is None:
        capable = args.device.startswith("cuda") and torch.cuda.get_device_capability() >= (8, 9)
        args.fp8 = "dynamic" if capable else "weights"
    if args.batch < 1 or args.lightning_steps < 0:
        parser.error("--batch must be >= 1 and --lightning-steps >= 0")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (Qwen-Image-Edit's scheduler divides by zero at one step)")
    torch.manual_seed(0)
    results = RealDimBenchmark(args).run()
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
