"""grafting — keep only the largest entries of the fine-tuning update, reset the rest to W0.

Panigrahi et al., "Task-Specific Skill Localization in Fine-tuned Language Models", ICML 2023
(model grafting), as a post-training step: per tensor, the top ``keep_ratio`` of entries by
``|W − W0|`` keep their fine-tuned value; all others return to W0. Hyperparameter:
``keep_ratio`` = 0.1 (1 is vanilla).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.merging import top_magnitude
from mmtune.methods.base import MethodConfig, PretrainedSnapshotMethod, register


def graft(pretrained: torch.Tensor, finetuned: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """The ``keep_ratio`` largest-magnitude entries of the update keep their fine-tuned value; the rest go back."""
    return torch.where(top_magnitude(finetuned - pretrained, keep_ratio), finetuned, pretrained)


@dataclass
class GraftingConfig(MethodConfig):
    keep_ratio: float = 0.1

    ranges: ClassVar[dict[str, str]] = {"keep_ratio": "[0, 1]"}


@register
class Grafting(PretrainedSnapshotMethod):
    name = "grafting"
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "after training, keep the top-k% |W−W0| update entries, reset the rest (Panigrahi et al., 2023)"
    config_class = GraftingConfig
    null_options = {"keep_ratio": 1}

    def merge(self, pretrained, finetuned, ctx):
        return graft(pretrained, finetuned, self.config.keep_ratio)
