"""half_ft — Half Fine-Tuning: each round, a random half of the trainable tensors is frozen at W0.

Hui et al., "HFT: Half Fine-Tuning for Large Language Models", 2024. At the start of every round
(``round_steps`` optimizer steps) a fresh random ``frozen_fraction`` of the trainable tensors is
chosen; those are reset to their pre-trained values and held there for the round (restored after
each step, so AdamW's momentum cannot move them). Hyperparameters: ``frozen_fraction`` = 0.5
(0 is vanilla), ``round_steps`` = 50.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.methods.base import MethodConfig, PretrainedSnapshotMethod, register


def choose_frozen(names: list[str], fraction: float, generator: torch.Generator) -> set[str]:
    order = torch.randperm(len(names), generator=generator, device=generator.device).tolist()
    return {names[i] for i in order[: round(fraction * len(names))]}


@dataclass
class HalfFTConfig(MethodConfig):
    frozen_fraction: float = 0.5
    round_steps: int = 50

    ranges: ClassVar[dict[str, str]] = {"round_steps": "≥ 1", "frozen_fraction": "[0, 1]"}


@register
class HalfFT(PretrainedSnapshotMethod):
    name = "half_ft"
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "each round, a random half of the trainable tensors is reset to and held at W0 (Hui et al., 2024)"
    config_class = HalfFTConfig
    null_options = {"frozen_fraction": 0}
    persistent = ("pretrained", "frozen")

    def setup(self, ctx):
        super().setup(ctx)
        self.frozen: set[str] = set()
        self._new_round(ctx)

    @torch.no_grad()
    def _new_round(self, ctx):
        self.frozen = choose_frozen(sorted(ctx.trainable), self.config.frozen_fraction, ctx.generator)
        self._restore(ctx)

    @torch.no_grad()
    def _restore(self, ctx):
        for name in self.frozen:
            ctx.trainable[name].copy_(self.pretrained[name])

    def after_optimizer_step(self, ctx):
        self._restore(ctx)
        if ctx.step + 1 < ctx.total_steps and (ctx.step + 1) % self.config.round_steps == 0:
            self._new_round(ctx)

