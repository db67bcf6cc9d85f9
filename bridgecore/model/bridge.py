"""VisionCacheBridge: Qwen3-VL multi-level features -> the prompt embeddings Qwen-Image-Edit's DiT reads.

Two paths, chosen by `BridgeConfig.mode` ("residual", "tokens" or "both"):

- **tokens** (MetaQuery / Q-Former style): K learned queries cross-attend over Qwen3-VL's fused levels
  (instruction and image) and become K extra conditioning tokens in the space the DiT reads, appended
  with their mask right after the sample's own tokens, before any padding:

      enhanced = [base ; tokens(fuse(project(levels)))]                          # [L25 + K, D25]

  This path can *add* information the DiT's own encoder lacks. Measured on the tiny trained edit model:
  with the colour word only in Qwen3-VL's prompt, a per-token correction of the existing tokens could not
  carry it (edits identical in 128/128 cases when only Qwen3's colour word changed), while an appended
  token could. Where the tokens go matters: the DiT gives text token j the RoPE index
  `max_vid_index + j` of the *padded* tensor, so tokens appended after another sample's padding would
  land elsewhere than in training; packing per sample keeps them at `L_i .. L_i + K - 1` in training and
  at inference, in any batch.

- **residual** (C2C-style gated correction, bounded per token):

      delta      = out(align(fuse(project(levels))), queries = base)              # [L25, D25], unbounded
      u          = delta / rms(base)                                               # per token, in units of the token
      correction = max_ratio * tanh(gate[kind]) * rms(base) * u / sqrt(1 + rms(u)^2)
      enhanced   = base + correction                  # rms(correction_t) < max_ratio * rms(base_t), always

  The DiT RMS-normalises every text-stream token first (`txt_norm`), so what it reads of a token is its
  direction; the bound keeps each enhanced token within arcsin(0.5) = 30 degrees of what Qwen-Image-Edit
  was trained on (an unbounded residual once grew to 27x the base and erased the instruction). One gate
  per stream (text, vision), tanh-bounded and starting at 0: an untrained residual bridge returns
  Qwen-Image-Edit's own embeddings bit for bit.

No bridge at all (no checkpoint) means Qwen-Image-Edit exactly: `identity_bridge` is an untrained
residual bridge. An untrained token path is not a no-op (the DiT attends to any appended token, even a
zero one, through `txt_in`'s bias), so it is never used untrained. Checkpoints record their mode;
format-2 checkpoints (the bounded residual alone) load as "residual".

Alignment (residual path): Qwen3-VL's vision tokens (32 px) are resampled on their 2-D grid to Qwen2.5-VL's
(28 px), image by image; every Qwen2.5 position also cross-attends over the whole Qwen3 sequence. Low
rank keeps the bridge small at the real dimensions (4096 -> 3584, rank 256; `vision-bridge plan` prints
it). With true CFG only the conditional branch is bridged (`negative_prompt_embeds`): the negative prompt
gets neither a correction nor tokens, so CFG amplifies what the bridge adds instead of cancelling it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bridgecore.model.cache_format import LEVEL_NAMES, Qwen3VisionCache, Qwen25VisionCache
from bridgecore.model.edit_prompt import pad_prompt_embeds
from bridgecore.model.loading import one_spelling

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STATISTICS_NAME = "bridge_statistics.json"
BRIDGE_FORMAT = 3  # 3: records `mode`; 2: bounded residual only (loads as "residual"); 1: unbounded (refused)
GATE_STREAMS = ("text", "vision")
MODES = ("residual", "tokens", "both")


@dataclass
class BridgeConfig:
    """Flat bridge config. Dimensions come from the models or caches (`BridgeConfig.from_caches`)."""

    qwen3_hidden_dim: int = 4096
    qwen25_hidden_dim: int = 3584
    mode: str = "both"  # "both" (measured best): correction + appended tokens; "tokens"; "residual" (see README)
    num_tokens: int = 2  # K, the appended tokens of the token path: with token_streams, one reads text, one vision
    rank: int = 256
    levels: tuple[str, ...] = LEVEL_NAMES
    use_deepstack: bool = False  # add the DeepStack visual features as extra levels on vision tokens
    # the token path's queries split between Qwen3's text positions and its vision positions (the first half of the K
    # queries read text, the rest vision): a query over ~20 text tokens finds a colour word that one query over the
    # ~150 positions (most of them image tokens) found only after a plateau, or never (see README, "Mechanism")
    token_streams: bool = True
    # how the token path's K queries start: "random" (each its own draw) or "stream" (the queries of one stream start
    # as its first query, nudged apart by a hundredth of their own draw: with K > 2 they begin as one reader and
    # split as training moves them; for K=2 with streams the two are the same)
    query_init: str = "random"
    # what the token path reads of Qwen3's levels: "shared" (the residual path's per-position fusion), "own" (a fusion
    # of its own) or "levels" (every (position, level) pair, each level tagged by a learned embedding)
    token_fusion: str = "shared"
    reference_images: int = 0  # reference pictures (read by Qwen3-VL only) per sample it was trained with, at most
    num_deepstack: int = 3
    use_attention_fusion: bool = True  # attention over levels; False: an MLP over concatenated levels
    max_correction_ratio: float = 0.5  # bound on rms(correction) / rms(base), per token (< 1: base stays dominant)
    num_heads: int = 4
    gate_init: float = 0.0  # raw gate (text, vision streams) before tanh; 0 = untrained bridge is the baseline
    dropout: float = 0.0
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    # Adam moves a parameter by about lr per step, so at lr 1e-4 a zero-init gate would need ~10k steps to
    # open: the gates (two scalars, no weight decay) learn `gate_learning_rate_scale` times faster.
    gate_learning_rate_scale: float = 100.0
    qwen3_model_id: str = ""
    qwen25_model_id: str = ""
    qwen3_revision: str = ""
    qwen25_revision: str = ""
    extra: dict = field(default_factory=dict)
    bridge_format: int = BRIDGE_FORMAT

    def __post_init__(self):
        self.levels = tuple(self.levels)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        if self.uses_tokens and self.num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1 with mode {self.mode!r}; got {self.num_tokens}")
        if not 0 < self.max_correction_ratio < 1:
            raise ValueError(f"max_correction_ratio must be in (0, 1) so the base stays dominant; got {self.max_correction_ratio}")
        if self.rank < 1 or self.num_heads < 1:
            raise ValueError(f"rank and num_heads must be at least 1; got rank {self.rank}, num_heads {self.num_heads}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0; got {self.learning_rate}")
        if self.query_init not in ("random", "stream"):
            raise ValueError(f"query_init must be 'random' or 'stream'; got {self.query_init!r}")
        if self.token_fusion not in ("shared", "own", "levels"):
            raise ValueError(f"token_fusion must be 'shared', 'own' or 'levels'; got {self.token_fusion!r}")
        if self.rank % self.num_heads:
            raise ValueError(f"rank ({self.rank}) must be divisible by num_heads ({self.num_heads})")
        if not self.levels:
            raise ValueError("levels must name at least one of 'early', 'mid', 'late'")

    @property
    def uses_tokens(self) -> bool:
        return self.mode in ("tokens", "both")

    @property
    def uses_residual(self) -> bool:
        return self.mode in ("residual", "both")

    @property
    def appended_tokens(self) -> int:
        """Tokens the bridge adds to each sample's sequence (0 for the residual path alone)."""
        return self.num_tokens if self.uses_tokens else 0

    @classmethod
    def from_caches(cls, qwen3: Qwen3VisionCache, qwen25: Qwen25VisionCache, **overrides) -> "BridgeConfig":
        values = dict(qwen3_hidden_dim=qwen3.hidden_size, qwen25_hidden_dim=qwen25.hidden_size,
                      num_deepstack=len(qwen3.deepstack), qwen3_model_id=qwen3.model_id,
                      qwen25_model_id=qwen25.model_id, qwen3_revision=qwen3.revision,
                      qwen25_revision=qwen25.revision)
        values.update(overrides)
        return cls(**values)


class DeepStackProjector(nn.Module):
    """Normalises and projects each level independently to the bridge width: [L3, D3] -> [L3, rank]."""

    def __init__(self, config: BridgeConfig, num_levels: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(config.qwen3_hidden_dim, eps=1e-6) for _ in range(num_levels))
        self.projections = nn.ModuleList(nn.Linear(config.qwen3_hidden_dim, config.rank) for _ in range(num_levels))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        projected = [proj(norm(x)) for x, norm, proj in zip(levels, self.norms, self.projections)]
        return torch.stack(projected, dim=-2)  # [L3, n_levels, rank]


class MultiLevelFusion(nn.Module):
    """Fuses the projected levels of each token, by attention over levels or by an MLP."""

    def __init__(self, config: BridgeConfig, num_levels: int):
        super().__init__()
        self.use_attention = config.use_attention_fusion
        if self.use_attention:
            self.score = nn.Linear(config.rank, 1)
        else:
            self.mlp = nn.Sequential(nn.Linear(num_levels * config.rank, config.rank), nn.GELU(),
                                     nn.Linear(config.rank, config.rank))

    def forward(self, stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # stacked: [L3, n_levels, rank]
        if self.use_attention:
            weights = self.score(torch.tanh(stacked)).squeeze(-1).softmax(dim=-1)  # [L3, n_levels]
            return (weights.unsqueeze(-1) * stacked).sum(dim=-2), weights
        return self.mlp(stacked.flatten(-2)), None


def query_streams(num_tokens: int) -> tuple[list[int], list[int]]:
    """The token path's streams: (queries reading Qwen3's text positions, queries reading its vision positions)."""
    split = (num_tokens + 1) // 2
    return list(range(split)), list(range(split, num_tokens))


class ConditioningTokens(nn.Module):
    """The token path: K learned queries cross-attend over Qwen3-VL's fused sequence (its instruction and its
    image tokens, every level) and become K tokens in the space the DiT reads: `[L3, rank] -> [K, D25]`."""

    def __init__(self, config: BridgeConfig):
        super().__init__()
        self.heads, self.width = config.num_heads, config.rank // config.num_heads
        queries = torch.randn(config.num_tokens, config.rank)
        if config.query_init == "stream" and config.token_streams:
            for members in filter(lambda members: len(members) > 1, query_streams(config.num_tokens)):
                queries[members[1:]] = queries[members[0]] + 0.01 * queries[members[1:]]
        self.queries = nn.Parameter(queries)
        self.memory_norm = nn.RMSNorm(config.rank, eps=1e-6)
        self.query = nn.Linear(config.rank, config.rank)
        self.key_value = nn.Linear(config.rank, 2 * config.rank)
        self.mlp = nn.Sequential(nn.RMSNorm(config.rank, eps=1e-6), nn.Linear(config.rank, 2 * config.rank), nn.GELU(),
                                 nn.Linear(2 * config.rank, config.rank))
        self.out = nn.Linear(config.rank, config.qwen25_hidden_dim)

    def forward(self, memory: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """memory `[L3, rank]` -> (tokens `[K, D25]`, attention `[K, L3]`, averaged over heads); `allowed` `[K, L3]`
        (bool) limits each query to some positions (its stream)."""
        heads, width = self.heads, self.width
        query = self.query(self.queries).view(-1, heads, width).transpose(0, 1)  # [H, K, w]
        key, value = self.key_value(self.memory_norm(memory)).view(-1, 2, heads, width).permute(1, 2, 0, 3)
        scores = query @ key.transpose(-1, -2) / width**0.5
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        attention = scores.softmax(dim=-1)  # [H, K, L3]
        read = (attention @ value).transpose(0, 1).reshape(-1, heads * width)  # [K, rank]
        read = read + self.mlp(read)
        return self.out(read), attention.mean(0)


def resample_vision_tokens(features: torch.Tensor, grid3: torch.Tensor, grid25: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """Brings per-image Qwen3 vision tokens onto the Qwen2.5 token grids by bilinear resampling.

    Args:
        features (`torch.Tensor` of shape `[N3, C]`): Qwen3 vision tokens, images in order, row-major.
        grid3, grid25 (`torch.Tensor` of shape `[n_images, 3]`): (t, h, w) patch grids before merging.
    Returns:
        `torch.Tensor` of shape `[N25, C]`.
    """
    if grid3.shape[0] != grid25.shape[0]:
        raise ValueError(f"caches disagree on the number of images: Qwen3 {grid3.shape[0]}, Qwen2.5 {grid25.shape[0]}")
    out, start = [], 0
    for (t3, h3, w3), (t25, h25, w25) in zip(grid3.tolist(), grid25.tolist()):
        h3, w3, h25, w25 = h3 // merge, w3 // merge, h25 // merge, w25 // merge
        count = t3 * h3 * w3
        image = features[start:start + count].reshape(t3, h3, w3, -1).permute(0, 3, 1, 2)  # [t, C, h3, w3]
        resized = F.interpolate(image, size=(h25, w25), mode="bilinear", align_corners=False)
        out.append(resized.permute(0, 2, 3, 1).reshape(-1, features.shape[-1])[: t25 * h25 * w25])
        start += count
    if start != features.shape[0]:
        raise ValueError(f"Qwen3 grid covers {start} vision tokens but the cache holds {features.shape[0]}")
    return torch.cat(out) if out else features[:0]


def _as_lists(qwen3_cache, qwen25_cache) -> tuple[list, list]:
    single = not isinstance(qwen3_cache, (list, tuple))
    qwen3s = [qwen3_cache] if single else list(qwen3_cache)
    qwen25s = [qwen25_cache] if single else list(qwen25_cache)
    if len(qwen3s) != len(qwen25s):
        raise ValueError(f"got {len(qwen3s)} Qwen3 caches for {len(qwen25s)} Qwen2.5 caches")
    return qwen3s, qwen25s


def bounded_correction(delta: torch.Tensor, base: torch.Tensor, gate: torch.Tensor, max_ratio: float,
                       eps: float = 1e-6) -> torch.Tensor:
    """Scales each token's raw correction so that its RMS stays below `max_ratio` times the token's own RMS.

    Args:
        delta (`[L, D]`): the raw correction. base (`[L, D]`): the embeddings it corrects.
        gate (`[L, 1]`): tanh of the token's stream gate, in (-1, 1).
    Returns:
        `[L, D]` float32: `gate * max_ratio * rms(base) * u / sqrt(1 + rms(u)^2)`, `u = delta / rms(base)`:
        about `gate * max_ratio * delta` while small, saturating smoothly at the bound.
    """
    scale = base.float().pow(2).mean(-1, keepdim=True).add(eps).sqrt()  # [L, 1]
    relative = delta.float() / scale
    squashed = relative * torch.rsqrt(1 + relative.pow(2).mean(-1, keepdim=True))  # rms < 1
    return gate.float() * max_ratio * scale * squashed


def mean_token_cosine(embeds: torch.Tensor) -> float:
    """Mean cosine similarity between distinct tokens of one sample (`[L, D]`): 1 means one repeated vector."""
    if embeds.shape[0] < 2:
        return float("nan")
    unit = F.normalize(embeds.float(), dim=-1)
    gram = unit @ unit.T  # [L, L]
    count = embeds.shape[0]
    return float((gram.sum() - gram.diagonal().sum()) / (count * (count - 1)))


@dataclass
class BridgeOutput:
    """prompt_embeds `[B, L, D25]`, prompt_embeds_mask `[B, L]`; attention maps per sample on request."""

    prompt_embeds: torch.Tensor
    prompt_embeds_mask: torch.Tensor
    attention_weights: list[dict[str, torch.Tensor]] | None = None


def negative_prompt_embeds(qwen25_caches) -> BridgeOutput:
    """The true-CFG negative branch: Qwen-Image-Edit's own embeddings of the negative prompt, never bridged.

    The bridge is trained on conditional branches only; the DiT was trained with its own unconditional
    embeddings. Keeping the negative as it is makes CFG amplify exactly what the bridge adds
    (`cond_bridged - neg = (cond - neg) + correction`) and needs no Qwen3-VL pass for the negative prompt.
    """
    caches = qwen25_caches if isinstance(qwen25_caches, (list, tuple)) else [qwen25_caches]
    return BridgeOutput(*pad_prompt_embeds([cache.prompt_embeds for cache in caches]))


class VisionCacheBridge(nn.Module):
    """Qwen3-VL caches + Qwen2.5-VL caches -> prompt embeddings for the edit DiT (see the module docstring)."""

    def __init__(self, config: BridgeConfig | None = None):
        super().__init__()
        self.config = config = config or BridgeConfig()
        num_levels = len(config.levels)
        self.projector = DeepStackProjector(config, num_levels)
        self.fusion = MultiLevelFusion(config, num_levels)
        self.deepstack_projector = DeepStackProjector(config, config.num_deepstack) if config.use_deepstack else None
        if config.uses_residual:
            self.query_norm = nn.RMSNorm(config.qwen25_hidden_dim, eps=1e-6)
            self.query = nn.Linear(config.qwen25_hidden_dim, config.rank)
            self.key_value = nn.Linear(config.rank, 2 * config.rank)
            self.dropout = nn.Dropout(config.dropout)
            self.out = nn.Linear(config.rank, config.qwen25_hidden_dim)
            self.gate = nn.Parameter(torch.full((len(GATE_STREAMS),), float(config.gate_init)))  # text, vision
        self.tokens = ConditioningTokens(config) if config.uses_tokens else None
        if config.uses_tokens and config.token_fusion == "own":
            self.token_level_fusion = MultiLevelFusion(config, num_levels)
        if config.uses_tokens and config.token_fusion == "levels":
            self.level_embedding = nn.Parameter(0.02 * torch.randn(num_levels, config.rank))
        self.is_identity = False  # see `identity_bridge`

    def parameter_groups(self, learning_rate: float, weight_decay: float) -> list[dict]:
        """Optimizer groups: everything at `learning_rate`; the residual gates faster and without weight decay."""
        others = [p for name, p in self.named_parameters() if name != "gate"]
        groups = [{"params": others, "lr": learning_rate, "weight_decay": weight_decay}]
        if self.config.uses_residual:
            groups.append({"params": [self.gate], "lr": learning_rate * self.config.gate_learning_rate_scale,
                           "weight_decay": 0.0})
        return groups

    def gate_values(self) -> dict[str, float]:
        """Effective residual gates in (-max_ratio, max_ratio): the largest correction/base RMS ratio per stream
        (empty without the residual path)."""
        if not self.config.uses_residual:
            return {}
        values = self.config.max_correction_ratio * torch.tanh(self.gate.detach().float())
        return {name: float(v) for name, v in zip(GATE_STREAMS, values)}

    @property
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = self.projector.projections[0].weight
        return weight.device, weight.dtype

    # -- checks ------------------------------------------------------------------------------------------

    def check_caches(self, qwen3: Qwen3VisionCache, qwen25: Qwen25VisionCache) -> None:
        """Refuses caches that do not belong together or do not fit this bridge, saying what differs."""
        cfg = self.config
        problems = []
        if qwen3.hidden_size != cfg.qwen3_hidden_dim:
            problems.append(f"Qwen3 hidden size {qwen3.hidden_size} != bridge {cfg.qwen3_hidden_dim}")
        if qwen25.hidden_size != cfg.qwen25_hidden_dim:
            problems.append(f"Qwen2.5 hidden size {qwen25.hidden_size} != bridge {cfg.qwen25_hidden_dim}")
        if qwen3.condition_images != qwen25.grid_thw.shape[0]:
            problems.append(f"different numbers of condition images ({qwen3.condition_images} vs {qwen25.grid_thw.shape[0]})")
        if qwen3.reference_images > cfg.reference_images:
            problems.append(f"{qwen3.reference_images} reference picture(s), but this bridge was trained with "
                            + (f"at most {cfg.reference_images}" if cfg.reference_images else "none: it cannot carry them "
                               "into the edit (train one on samples with reference pictures)"))
        missing = [name for name in cfg.levels if name not in qwen3.levels]
        if missing:
            problems.append(f"Qwen3 cache lacks levels {missing}")
        if cfg.use_deepstack and len(qwen3.deepstack) != cfg.num_deepstack:
            problems.append(f"the bridge reads {cfg.num_deepstack} DeepStack taps; the Qwen3 cache keeps "
                            f"{len(qwen3.deepstack)} (extract with cache_deepstack)")
        if qwen3.image_digest and qwen25.image_digest and qwen3.image_digest != qwen25.image_digest:
            problems.append("the two caches were extracted from different images")
        if cfg.qwen3_revision and qwen3.revision != cfg.qwen3_revision:
            problems.append(f"Qwen3 revision {qwen3.revision!r} != bridge's {cfg.qwen3_revision!r}")
        if cfg.qwen25_revision and qwen25.revision != cfg.qwen25_revision:
            problems.append(f"Qwen2.5 revision {qwen25.revision!r} != bridge's {cfg.qwen25_revision!r}")
        # the model by its name only where a revision cannot say it: the same folder is spelled many ways
        # (relative, absolute, a trailing slash), and a revision (a commit, or a local folder's file digest) is exact
        if (cfg.qwen3_model_id and not (cfg.qwen3_revision and qwen3.revision)
                and one_spelling(qwen3.model_id) != one_spelling(cfg.qwen3_model_id)):
            problems.append(f"Qwen3 model {qwen3.model_id!r} != bridge's {cfg.qwen3_model_id!r}")
        if (cfg.qwen25_model_id and not (cfg.qwen25_revision and qwen25.revision)
                and one_spelling(qwen25.model_id) != one_spelling(cfg.qwen25_model_id)):
            problems.append(f"Qwen2.5 model {qwen25.model_id!r} != bridge's {cfg.qwen25_model_id!r}")
        for name, tensor in (("qwen25.prompt_embeds", qwen25.prompt_embeds), *((f"qwen3.{n}", qwen3.levels[n])
                             for n in cfg.levels if n in qwen3.levels)):
            if not torch.isfinite(tensor).all():
                problems.append(f"{name} contains NaN or Inf")
        if problems:
            raise ValueError("caches do not fit the bridge: " + "; ".join(problems))

    # -- forward -----------------------------------------------------------------------------------------

    def _fuse(self, qwen3: Qwen3VisionCache) -> tuple[torch.Tensor, ...]:
        """(fused levels `[L3, rank]`, level weights `[L3, n]` or None, projected DeepStack `[N3, rank]` or None, the
        projected levels `[L3, n, rank]` for the token path)."""
        device, dtype = self._device_dtype  # caches may live on another device
        projected = self.projector([qwen3.levels[n].to(device, dtype) for n in self.config.levels])
        fused, level_weights = self.fusion(projected)
        deepstack = None
        if self.deepstack_projector is not None:
            deepstack = self.deepstack_projector([t.to(device, dtype) for t in qwen3.deepstack.values()]).sum(dim=-2)
        return fused, level_weights, deepstack, projected

    def _correction(self, fused: torch.Tensor, deepstack: torch.Tensor | None, qwen3: Qwen3VisionCache,
                    qwen25: Qwen25VisionCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual path's raw correction `[L25, D25]` and its cross-attention `[L25, L3]`."""
        cfg = self.config
        device, dtype = self._device_dtype
        base = qwen25.prompt_embeds.to(device, dtype)  # [L25, D25]
        # Every Qwen2.5 position attends over the Qwen3 sequence (instruction and image).
        heads, width = cfg.num_heads, cfg.rank // cfg.num_heads
        query = self.query(self.query_norm(base)).view(-1, heads, width).transpose(0, 1)  # [H, L25, w]
        key, value = self.key_value(fused).view(-1, 2, heads, width).permute(1, 2, 0, 3)  # 2 x [H, L3, w]
        scores = query @ key.transpose(-1, -2) / width**0.5  # [H, L25, L3]
        attention = self.dropout(scores.softmax(dim=-1))
        attended = (attention @ value).transpose(0, 1).reshape(-1, cfg.rank)  # [L25, rank]
        # Vision positions also get the Qwen3 image features resampled onto the Qwen2.5 grid.
        vision = fused[qwen3.vision_positions.to(fused.device)]
        if deepstack is not None:
            vision = vision + deepstack
        if qwen3.reference_images:  # reference pictures have no place on the DiT's grid: attention reads them
            grid = qwen3.grid_thw[: qwen3.condition_images]
            vision = vision[: int((grid.prod(-1) // 4).sum())]
        resampled = resample_vision_tokens(vision, qwen3.grid_thw[: qwen3.condition_images], qwen25.grid_thw)
        positions = qwen25.vision_positions.to(base.device)
        if resampled.shape[0] != positions.numel():
            raise ValueError(f"Qwen2.5 cache has {positions.numel()} vision tokens but its grid gives {resampled.shape[0]}")
        attended = attended.index_add(0, positions, resampled)
        return self.out(attended), attention.mean(0)

    def _appended(self, fused: torch.Tensor, deepstack: torch.Tensor | None, qwen3: Qwen3VisionCache,
                  projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token path: (tokens `[K, D25]`, their attention over the Qwen3 sequence `[K, L3]`)."""
        how = self.config.token_fusion
        memory = fused if how == "shared" else (
            self.token_level_fusion(projected)[0] if how == "own" else projected + self.level_embedding)
        positions = qwen3.vision_positions.to(fused.device)
        if deepstack is not None:  # DeepStack's visual features join the image tokens they belong to
            memory = memory.index_add(0, positions, deepstack if memory.dim() == 2 else
                                      deepstack.unsqueeze(1).expand(-1, memory.shape[1], -1))
        allowed = None
        if self.config.token_streams and self.config.num_tokens > 1:
            vision = torch.zeros(fused.shape[0], dtype=torch.bool, device=fused.device)
            vision[positions] = True
            k = self.config.num_tokens
            reads_vision = torch.zeros(k, dtype=torch.bool, device=fused.device)
            reads_vision[query_streams(k)[1]] = True  # K=2: query 0 text, query 1 vision
            allowed = vision.unsqueeze(0) == reads_vision.unsqueeze(1)  # [K, L3]
        if memory.dim() == 3:  # every (position, level) pair is a memory slot
            levels = memory.shape[1]
            memory = memory.reshape(-1, memory.shape[-1])
            allowed = None if allowed is None else allowed.repeat_interleave(levels, dim=1)
        return self.tokens(memory, allowed)

    def forward(self, qwen3_cache, qwen25_cache, return_attention_weights: bool = False):
        """Enhanced embeddings for one sample or a list of samples, right-padded like the pipeline.

        Each sample is `[L_i (+ K), D25]` before padding: its own tokens (corrected by the residual path) and
        then the token path's K tokens, so the appended tokens sit at the same RoPE positions whatever the
        batch. Returns `BridgeOutput(prompt_embeds [B, L, D25], prompt_embeds_mask [B, L])`, plus per-sample
        attention maps when `return_attention_weights` (`levels [L3, n]`, `cross_attention [L25, L3]`,
        `tokens [K, L3]`).
        """
        qwen3s, qwen25s = _as_lists(qwen3_cache, qwen25_cache)
        embeds, maps = [], []
        device, _ = self._device_dtype
        for qwen3, qwen25 in zip(qwen3s, qwen25s):
            self.check_caches(qwen3, qwen25)
            base = qwen25.prompt_embeds.to(device)
            if self.is_identity:
                embeds.append(base)
                maps.append({})
                continue
            fused, level_weights, deepstack, projected = self._fuse(qwen3)
            enhanced, sample_maps = base, {"levels": level_weights}
            if self.config.uses_residual:
                delta, sample_maps["cross_attention"] = self._correction(fused, deepstack, qwen3, qwen25)
                enhanced = base + self._bounded(delta, base, qwen25.vision_positions).to(base.dtype)
            if self.tokens is not None:
                tokens, sample_maps["tokens"] = self._appended(fused, deepstack, qwen3, projected)
                enhanced = torch.cat([enhanced, tokens.to(base.dtype)])
            embeds.append(enhanced)
            maps.append(sample_maps)
        prompt_embeds, mask = pad_prompt_embeds(embeds)
        return BridgeOutput(prompt_embeds, mask, maps if return_attention_weights else None)

    def _bounded(self, delta: torch.Tensor, base: torch.Tensor, vision_positions: torch.Tensor) -> torch.Tensor:
        stream = torch.zeros(base.shape[0], dtype=torch.long, device=base.device)  # 0: text, 1: vision
        stream[vision_positions.to(base.device)] = 1
        gate = torch.tanh(self.gate.float())[stream].unsqueeze(-1)  # [L25, 1]
        return bounded_correction(delta, base, gate, self.config.max_correction_ratio)

    @torch.no_grad()
    def correction_statistics(self, qwen3_caches, qwen25_caches) -> dict[str, float]:
        """What the bridge does to the embeddings, over samples: on the sample's own tokens, correction/base RMS
        ratio (mean over samples, and the largest single-token ratio) and mean within-sample token cosine before
        and after; the residual gates; with the token path, the appended tokens' count, their RMS relative to
        the base tokens' and their mean cosine with the base tokens. Recorded at every evaluation and in every
        checkpoint."""
        ratios, token_max, before, after, appended_rms, appended_cosine = [], [], [], [], [], []
        for qwen3, qwen25 in zip(*_as_lists(qwen3_caches, qwen25_caches)):
            base = qwen25.prompt_embeds.to(self._device_dtype[0]).float()
            enhanced = self(qwen3, qwen25).prompt_embeds[0].float()
            own, appended = enhanced[: base.shape[0]], enhanced[base.shape[0]:]
            correction = own - base
            base_rms = base.pow(2).mean().sqrt().clamp_min(1e-12)
            ratios.append(float(correction.pow(2).mean().sqrt() / base_rms))
            token_ratio = correction.pow(2).mean(-1).sqrt() / base.pow(2).mean(-1).sqrt().clamp_min(1e-12)
            token_max.append(float(token_ratio.max()))
            before.append(mean_token_cosine(base))
            after.append(mean_token_cosine(own))
            if appended.shape[0]:
                appended_rms.append(float(appended.pow(2).mean().sqrt() / base_rms))
                appended_cosine.append(float((F.normalize(appended, dim=-1) @ F.normalize(base, dim=-1).T).mean()))
        statistics = {"correction_rms_ratio": float(np.mean(ratios)), "correction_rms_ratio_token_max": float(np.max(token_max)),
                      "token_cosine_base": float(np.nanmean(before)), "token_cosine_enhanced": float(np.nanmean(after)),
                      "appended_tokens": self.config.appended_tokens,
                      **{f"gate_{name}": value for name, value in self.gate_values().items()}}
        if appended_rms:
            statistics.update(appended_rms_ratio=float(np.mean(appended_rms)),
                              appended_base_cosine=float(np.mean(appended_cosine)))
        return statistics

    # -- persistence -------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """`config.json` + `model.safetensors` (no pickle) to a local directory or an fsspec URL (`s3://...`)."""
        from safetensors.torch import save

        from bridgecore.storage import Storage

        storage = Storage(str(directory))
        storage.write_bytes(json.dumps(asdict(self.config), indent=2).encode(), CONFIG_NAME)
        storage.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}), WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, expect: BridgeConfig | None = None) -> "VisionCacheBridge":
        """Loads a saved bridge from a local directory or an fsspec URL; with `expect`, refuses one whose dimensions
        do not match the models."""
        from safetensors.torch import load

        from bridgecore.storage import Storage

        storage = Storage(str(directory))
        if not storage.exists(CONFIG_NAME):
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; is this a bridge checkpoint?")
        values = json.loads(storage.read_bytes(CONFIG_NAME))
        version = values.get("bridge_format", 1)
        if version == 2:  # the bounded residual, before modes existed
            values.update(mode="residual", bridge_format=BRIDGE_FORMAT)
        elif version != BRIDGE_FORMAT:
            raise ValueError(f"bridge checkpoint {directory} has format {version} ("
                             f"{'the unbounded gated residual' if version == 1 else 'unknown to this code'}); this code "
                             f"reads formats 2 and {BRIDGE_FORMAT}: retrain it with `vision-bridge train`")
        values.setdefault("token_streams", False)  # saved before the token path's streams: one query read everything
        config = BridgeConfig(**values)
        if expect is not None:
            compared = ("qwen3_hidden_dim", "qwen25_hidden_dim") + (("num_deepstack",) if config.use_deepstack else ())
            mismatched = [f"{name}: checkpoint {getattr(config, name)} vs models {getattr(expect, name)}"
                          for name in compared if getattr(config, name) != getattr(expect, name)]
            if mismatched:
                raise ValueError(f"bridge checkpoint {directory} does not match the models: " + "; ".join(mismatched))
        bridge = cls(config)
        bridge.load_state_dict(load(storage.read_bytes(WEIGHTS_NAME)))
        return bridge

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def create_default_bridge(qwen3_cache: Qwen3VisionCache | None = None, qwen25_cache: Qwen25VisionCache | None = None,
                          **overrides) -> VisionCacheBridge:
    """An untrained bridge of the default design (`BridgeConfig`), sized from caches when given, else real dims.
    It must be trained before use: see `identity_bridge` for what "no bridge" means."""
    if qwen3_cache is not None and qwen25_cache is not None:
        return VisionCacheBridge(BridgeConfig.from_caches(qwen3_cache, qwen25_cache, **overrides))
    return VisionCacheBridge(BridgeConfig(**overrides))


def identity_bridge(config: BridgeConfig) -> VisionCacheBridge:
    """No bridge: Qwen-Image-Edit's own embeddings, exactly (the baseline every trained bridge is compared with,
    and what runs when no checkpoint is given). An untrained residual bridge whose forward returns the base
    without computing a correction, so nothing (not even a non-finite feature) can touch it."""
    from dataclasses import replace

    bridge = VisionCacheBridge(replace(config, mode="residual", gate_init=0.0))
    bridge.is_identity = True
    return bridge
