"""l1_reg — an L1 pull towards the pre-trained weights.

The papers' baseline (released-code semantics): ``loss += λ · mean over trainable tensors of
L1(W, W0)``. Hyperparameter: ``lam`` λ = 1e-6 (λ = 0 is vanilla).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtune.methods.base import MethodConfig, register
from mmtune.methods.l2_reg import L2Reg


@dataclass
class L1RegConfig(MethodConfig):
    lam: float = 1e-6

    ranges: ClassVar[dict[str, str]] = {"lam": "≥ 0"}


@register
class L1Reg(L2Reg):
    name = "l1_reg"
    description = "loss += λ·mean L1(W, W0) over trainable tensors (papers' baseline)"
    config_class = L1RegConfig
    null_options = {"lam": 0}
    power = 1
