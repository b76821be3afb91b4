"""dare — drop-and-rescale the fine-tuning delta.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch" (DARE), ICML 2024, as a post-training step: drop a fraction ``p`` of the delta ``W − W0`` at
random and rescale the rest by ``1/(1 − p)``. Hyperparameter: ``p`` = 0.9 (0 is vanilla). The drop mask
comes from the run's seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.merging import dare
from mmtune.methods.base import MethodConfig, PretrainedSnapshotMethod, register


def drop_and_rescale(pretrained: torch.Tensor, finetuned: torch.Tensor, p: float,
                     generator: torch.Generator) -> torch.Tensor:
    if p == 0:
        return finetuned.clone()
    return pretrained + dare(finetuned - pretrained, p, generator)


@dataclass
class DareConfig(MethodConfig):
    p: float = 0.9

    ranges: ClassVar[dict[str, str]] = {"p": "[0, 1)"}


@register
class Dare(PretrainedSnapshotMethod):
    name = "dare"
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "after training, drop a fraction p of W−W0 at random, rescale the rest by 1/(1−p) (Yu et al., 2024)"
    config_class = DareConfig
    null_options = {"p": 0}

    def merge(self, pretrained, finetuned, ctx):
        return drop_and_rescale(pretrained, finetuned, self.config.p, ctx.generator)
