"""random_mask — a fixed random fraction of each trainable tensor stays at its pre-trained value.

The papers' baseline: the mask is drawn once (per tensor, from the run's seeded generator); after
every optimizer step the masked entries are restored to W0 (zeroing their gradients is not enough:
AdamW's momentum and weight decay would still move them). Hyperparameter: ``ratio`` = 0.5, the
frozen fraction (0 is vanilla).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.methods.base import Method, MethodConfig, laid_out_as, register


def random_frozen_mask(shape: torch.Size, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """True where an entry is frozen: exactly ``round(ratio·n)`` entries, chosen at random."""
    n = int(torch.Size(shape).numel())
    order = torch.randperm(n, generator=generator, device=generator.device)
    mask = torch.zeros(n, dtype=torch.bool, device=generator.device)
    mask[order[: round(ratio * n)]] = True
    return mask.reshape(shape)


def restore_frozen(param: torch.Tensor, pretrained: torch.Tensor, mask: torch.Tensor) -> None:
    param.data.copy_(torch.where(mask, pretrained, param.data))


@dataclass
class MaskConfig(MethodConfig):
    ratio: float = 0.5

    ranges: ClassVar[dict[str, str]] = {"ratio": "[0, 1]"}


@register
class RandomMask(Method):
    name = "random_mask"
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "a fixed random 50% of entries frozen at W0 (papers' baseline)"
    config_class = MaskConfig
    null_options = {"ratio": 0}
    persistent = ("masks", "pretrained")

    def make_mask(self, name: str, param: torch.Tensor, ctx) -> torch.Tensor:
        return random_frozen_mask(param.shape, self.config.ratio, ctx.generator).to(param.device)

    def setup(self, ctx):
        # Drawn over the whole tensor (the same on every process), kept as this process's piece on FSDP2 shards.
        self.masks = {n: laid_out_as(self.make_mask(n, p, ctx), p) for n, p in ctx.trainable.items()}
        # Only the frozen entries' W0 is needed; keeping it dense costs one copy and keeps the code plain.
        self.pretrained = {n: p.detach().clone() for n, p in ctx.trainable.items()}

    @torch.no_grad()
    def after_optimizer_step(self, ctx):
        for name, param in ctx.trainable.items():
            restore_frozen(param, self.pretrained[name], self.masks[name])

