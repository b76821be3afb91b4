"""l2_reg — pull the fine-tuned weights towards the pre-trained ones with an L2 penalty.

The forgetting baseline of both papers (released-code semantics): ``loss += λ · mean over trainable
tensors of MSE(W, W0)``. Hyperparameter: ``lam`` λ = 1e-3 (λ = 0 is vanilla).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.methods.base import (
    MethodConfig,
    PretrainedSnapshotMethod,
    local_shard,
    register,
    sum_over_shards,
)


def distance_penalty(trainable: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor], power: int) -> torch.Tensor:
    """Mean over tensors of the per-tensor mean ``|W − W0|^power`` (MSE for 2, L1 for 1)."""
    terms = []
    for name, param in trainable.items():  # on FSDP2 shards: each shard's sum, the whole tensor's mean
        local = (local_shard(param) - local_shard(pretrained[name])).abs().pow(power).sum()
        terms.append(sum_over_shards(local, param) / param.numel())
    return torch.stack(terms).mean()


@dataclass
class L2RegConfig(MethodConfig):
    lam: float = 1e-3

    ranges: ClassVar[dict[str, str]] = {"lam": "≥ 0"}


@register
class L2Reg(PretrainedSnapshotMethod):
    name = "l2_reg"
    reads_weights_in_loss = True  # as weight_penalty: under ZeRO-3 its gradient is added on the full masters
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "loss += λ·mean MSE(W, W0) over trainable tensors (papers' baseline)"
    config_class = L2RegConfig
    null_options = {"lam": 0}
    power = 2

    def weight_penalty(self, ctx):
        if self.config.lam == 0:
            return None
        return self.config.lam * distance_penalty(ctx.trainable, self.pretrained, self.power)
