"""wise_ft — weight-space interpolation between the pre-trained and the fine-tuned model.

Wortsman et al., "Robust fine-tuning of zero-shot models" (WiSE-FT), CVPR 2022. After training:
``W = (1 − α)·W0 + α·W`` on the trainable tensors. Hyperparameter: ``alpha`` α = 0.5 (1 is vanilla).
Also usable on any finished run: ``mmtune merge --alpha A RUN``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.methods.base import MethodConfig, PretrainedSnapshotMethod, register


def interpolate(pretrained: torch.Tensor, finetuned: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.lerp(pretrained.float(), finetuned.float(), alpha).to(finetuned.dtype)


@dataclass
class WiseFTConfig(MethodConfig):
    alpha: float = 0.5

    ranges: ClassVar[dict[str, str]] = {"alpha": "[0, 1]"}


@register
class WiseFT(PretrainedSnapshotMethod):
    name = "wise_ft"
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "after training, W = (1−α)·W0 + α·W (Wortsman et al., 2022)"
    config_class = WiseFTConfig
    null_options = {"alpha": 1}

    def merge(self, pretrained, finetuned, ctx):
        return interpolate(pretrained, finetuned, self.config.alpha)
