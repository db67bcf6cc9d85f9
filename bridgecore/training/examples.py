"""One training example of the bridge: a triplet's caches, condition latents and target latents.

The batch side prepares them (`bridgecore.batch.training_data.prepare_examples`); the trainer only reads them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from bridgecore.model.cache_format import SampleCache

logger = logging.getLogger(__name__)


@dataclass
class TrainingExample:
    """One triplet, ready for the loss.

    Args:
        cache: the sample's Qwen3/Qwen2.5 caches.
        condition (`torch.Tensor` of shape `[sum N_i, 4C]`): packed, normalised VAE latents of every
            condition image, concatenated in order, as the edit pipelines feed them to the DiT.
        target (`torch.Tensor` of shape `[N, 4C]`): the same for the target image.
        latent_hw: (h, w) of the target's packed latent grid (2x2 latent patches).
        condition_hw: (h, w) of each condition image's packed grid; empty means one, of `latent_hw`.
    """

    key: str
    cache: SampleCache
    condition: torch.Tensor
    target: torch.Tensor
    latent_hw: tuple[int, int]
    condition_hw: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        self.condition_hw = tuple(tuple(hw) for hw in self.condition_hw) or (tuple(self.latent_hw),)
        if sum(h * w for h, w in self.condition_hw) != self.condition.shape[0]:
            raise ValueError(f"{self.key}: condition latents have {self.condition.shape[0]} tokens but the grids "
                             f"{self.condition_hw} give {sum(h * w for h, w in self.condition_hw)}")
