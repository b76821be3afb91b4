"""magnitude_mask — the largest-magnitude pre-trained entries stay at their pre-trained values.

The papers' baseline: per tensor, the top ``ratio`` (0.5) of entries by ``|W0|`` are frozen and
restored after every optimizer step (0 is vanilla).
"""

from __future__ import annotations

import torch

from mmtune.merging import top_magnitude
from mmtune.methods.base import register, whole
from mmtune.methods.random_mask import RandomMask


def magnitude_frozen_mask(pretrained: torch.Tensor, ratio: float) -> torch.Tensor:
    """True for the ``round(ratio·n)`` entries with the largest ``|W0|``."""
    return top_magnitude(pretrained, ratio)


@register
class MagnitudeMask(RandomMask):
    name = "magnitude_mask"
    description = "the top-50% |W0| entries frozen at W0 (papers' baseline)"

    def make_mask(self, name, param, ctx):
        return magnitude_frozen_mask(whole(param), self.config.ratio)
