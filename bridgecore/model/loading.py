"""Model loading: one path for real checkpoints and the tiny zoo, lazy, quantisable, unloadable.

A model is named by a hub id (`Qwen/Qwen3-VL-8B-Instruct`) or a local directory. Hub ids resolve
through the Hugging Face cache (and the hub when reachable); a model that is neither local nor
reachable fails fast with a message saying how to supply it. `trust_remote_code` is never set.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

DEFAULT_QWEN3_MODEL = "Qwen/Qwen3-VL-8B-Instruct"
DEFAULT_EDIT_MODEL = "Qwen/Qwen-Image-Edit"
DEFAULT_EDIT_PLUS_MODEL = "Qwen/Qwen-Image-Edit-2509"
DEFAULT_QWEN_IMAGE_21_MODEL = "Qwen/Qwen-Image-2.1"

# Editor families by the pipeline class in model_index.json.
EDITOR_FAMILIES = {"QwenImageEditPipeline": "qwen-image-edit", "QwenImageEditPlusPipeline": "qwen-image-edit-plus",
                   "QwenImage21Pipeline": "qwen-image-2.1"}
DEFAULT_MODEL_OF_FAMILY = {"qwen-image-edit": DEFAULT_EDIT_MODEL, "qwen-image-edit-plus": DEFAULT_EDIT_PLUS_MODEL,
                           "qwen-image-2.1": DEFAULT_QWEN_IMAGE_21_MODEL}

# What extraction needs from an edit-pipeline repository: not the 40 GB DiT.
EDIT_ENCODER_FILES = ["model_index.json", "text_encoder/*", "processor/*", "tokenizer/*"]


class ModelNotAvailableError(RuntimeError):
    """A model is neither a local directory nor obtainable from the Hugging Face cache or hub."""


CPU_DTYPE_SETTING = "VISION_BRIDGE_CPU_DTYPE"


@functools.cache
def cpu_compute_dtype() -> torch.dtype:
    """The dtype for real-width work on this CPU: bf16 where its bf16 matmuls are at least half as fast as fp32
    (AVX-512 BF16 or AMX), else fp32. Without bf16 hardware torch falls back to a reference bf16 GEMM about 100x
    slower than fp32 (measured on an AVX2-only EPYC: 0.9 vs 108 GFLOP/s). Measured once per process (~50 ms);
    VISION_BRIDGE_CPU_DTYPE=float32|bfloat16 decides instead."""
    import time

    chosen = os.environ.get(CPU_DTYPE_SETTING)
    if chosen:
        if chosen not in ("float32", "bfloat16"):
            raise ValueError(f"{CPU_DTYPE_SETTING} must be float32 or bfloat16; got {chosen!r}")
        return getattr(torch, chosen)

    def seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(192, 192, dtype=dtype), torch.randn(192, 192, dtype=dtype)
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        return time.perf_counter() - start

    return torch.bfloat16 if seconds(torch.bfloat16) <= 2 * seconds(torch.float32) else torch.float32


@dataclass(frozen=True)
class LoadOptions:
    """How to place a model. `dtype="auto"` is bf16 on CUDA and fp32 on CPU."""

    device: str = "auto"
    dtype: str = "auto"
    load_in_8bit: bool = False
    load_in_4bit: bool = False

    def __post_init__(self):
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit are exclusive; got both True")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be 'auto' or a torch dtype name like 'bfloat16'; got {self.dtype!r}")
        return dtype

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype(), "trust_remote_code": False}
        if self.load_in_8bit or self.load_in_4bit:
            import warnings

            from transformers import BitsAndBytesConfig

            # bitsandbytes warns on every int8 matmul with fp32 inputs; once is information, thousands is noise.
            warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=self.load_in_8bit,
                load_in_4bit=self.load_in_4bit,
                bnb_4bit_compute_dtype=self.torch_dtype(),
                llm_int8_skip_modules=["lm_head"],
            )
            kwargs["device_map"] = {"": str(self.torch_device())}
        elif self.torch_device().type == "cuda":
            # Straight from safetensors into GPU memory: no 16 GB staging copy in host RAM.
            kwargs["device_map"] = {"": str(self.torch_device())}
        return kwargs


@dataclass(frozen=True)
class ResolvedModel:
    """A model name together with the local directory holding it and the revision it is at."""

    name: str
    path: Path
    revision: str


def _local_revision(path: Path) -> str:
    """Content fingerprint of a local model directory: configs in full, weights by name and size."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if relative.startswith(".") or "/." in relative:
            continue
        digest.update(relative.encode())
        if file.suffix in (".json", ".txt", ".jinja"):
            digest.update(file.read_bytes())
        else:
            digest.update(str(file.stat().st_size).encode())
    return "local-" + digest.hexdigest()[:16]


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") != 1 or os.sep == "\\" and "\\" in name


def resolve_model(name: str | Path, revision: str | None = None, allow_patterns: list[str] | None = None,
                  local_only: bool = False) -> ResolvedModel:
    """Finds `name` locally, in the Hugging Face cache, or (unless `local_only`) on the hub; fails fast with
    advice otherwise."""
    name = str(name)
    local = Path(name).expanduser()
    if local.is_dir():
        return ResolvedModel(name, local.resolve(), _local_revision(local))
    if local.exists() or _looks_like_path(name):
        raise ModelNotAvailableError(f"model {name!r}: no such model directory")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name, revision=revision, allow_patterns=allow_patterns,
                                          local_files_only=local_only))
    except Exception as error:  # the hub client raises many types; all mean "not obtainable"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise ModelNotAvailableError(
            f"model {name!r} is not available: it is not a local directory, not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}), and "
            + ("HF_HUB_OFFLINE is set" if offline else "only local files were searched" if local_only
               else "the hub could not be reached")
            + f" ({type(error).__name__}). Supply it as a local directory (e.g. --qwen3 /models/Qwen3-VL-8B-Instruct), "
            f"pre-download it with `hf download {name}` on a machine with network, or point HF_HOME at a cache "
            "that holds it. For an offline smoke test use the tiny zoo: `vision-bridge tiny-models DIR`."
        ) from None
    return ResolvedModel(name, snapshot, snapshot.name if len(snapshot.name) == 40 else _local_revision(snapshot))


@functools.lru_cache(maxsize=64)
def model_revision(name: str) -> str:
    """The revision of a model from its config files only: a hub id fetches `config.json` /
    `model_index.json` (never weights), a local directory is fingerprinted in place."""
    return resolve_model(name, allow_patterns=["config.json", "model_index.json"]).revision


def pipeline_class_name(resolved: ResolvedModel) -> str:
    """`QwenImageEditPipeline` or `QwenImageEditPlusPipeline`, read from `model_index.json`."""
    index = resolved.path / "model_index.json"
    if not index.exists():
        raise ModelNotAvailableError(f"model {resolved.name!r}: {index} is missing; is this a diffusers pipeline?")
    return json.loads(index.read_text())["_class_name"]


def editor_family(name: str) -> str:
    """'qwen-image-edit', 'qwen-image-edit-plus' or 'qwen-image-2.1', from the pipeline's model_index.json only."""
    resolved = resolve_model(name, allow_patterns=["model_index.json"])
    class_name = pipeline_class_name(resolved)
    if class_name not in EDITOR_FAMILIES:
        raise ValueError(f"edit model {name!r} is a {class_name}; supported: {', '.join(EDITOR_FAMILIES)}")
    return EDITOR_FAMILIES[class_name]


def _return_freed_memory_to_os() -> None:
    """glibc keeps freed heap pages; `malloc_trim` hands them back so RSS reflects an unload on CPU."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


class LazyModel:
    """Holds a loader; loads on first `get()`; `unload()` drops every reference and frees memory."""

    def __init__(self, load: Callable[[], Any], description: str):
        self._load = load
        self._value: Any = None
        self.description = description
        self.load_count = 0
        self.attempts = 0  # loads started, failed ones included

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> Any:
        if self._value is None:
            logger.info("loading %s", self.description)
            self.attempts += 1
            self._value = self._load()
            self.load_count += 1
        return self._value

    def unload(self) -> None:
        if self._value is None:
            return
        logger.info("unloading %s", self.description)
        self._value = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _return_freed_memory_to_os()


def _place(model, options: LoadOptions):
    if not (options.load_in_8bit or options.load_in_4bit):
        model = model.to(options.torch_device())
    return model.eval().requires_grad_(False)


def load_qwen3_vl(resolved: ResolvedModel, options: LoadOptions = LoadOptions()):
    """(model, processor) of a Qwen3-VL checkpoint."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(resolved.path, **options.from_pretrained_kwargs())
    processor = AutoProcessor.from_pretrained(resolved.path, trust_remote_code=False)
    return _place(model, options), processor


def load_edit_text_encoder(resolved: ResolvedModel, options: LoadOptions = LoadOptions()):
    """(text_encoder, processor) of a Qwen-Image-Edit(-Plus) pipeline: the Qwen2.5-VL its DiT was trained with."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        resolved.path, subfolder="text_encoder", **options.from_pretrained_kwargs()
    )
    processor = AutoProcessor.from_pretrained(resolved.path, subfolder="processor", trust_remote_code=False)
    return _place(model, options), processor


def load_edit_pipeline(resolved: ResolvedModel, options: LoadOptions = LoadOptions(), **components):
    """The diffusers edit pipeline; pass `text_encoder=...` to reuse an already loaded encoder."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        resolved.path, dtype=options.torch_dtype(), trust_remote_code=False, **components
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(options.torch_device())


def one_spelling(model: str) -> str:
    """A local model folder as one absolute, normalised path: `zoo/m`, `zoo/m/`, `./zoo/../zoo/m` and `/abs/zoo/m`
    are the same model, and must give the same fingerprints (each spelling recomputed the whole job). Hub ids and
    URLs are left as they are."""
    if "://" in model or not os.path.isdir(os.path.expanduser(model)):
        return model
    return os.path.abspath(os.path.expanduser(model))
