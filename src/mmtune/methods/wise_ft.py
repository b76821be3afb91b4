"""wise_ft — weight-space interpolation between the pre-trained and the fine-tuned model.

Wortsman et al., "Robust fine-tuning of zero-shot models" (WiSE-FT), CVPR 2022. After training:
``W = (1 − α)·W0 + α·W`` on the trainable tensors. Hyperparameter: ``alpha`` α = 0.5 (1 is vanilla).
Also usable on any finished run: ``mmtune merge --alpha A RUN``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtune.methods.base import Method, MethodConfig, register, snapshot


def interpolate(pretrained: torch.Tensor, finetuned: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.lerp(pretrained.float(), finetuned.float(), alpha).to(finetuned.dtype)


@dataclass
class WiseFTConfig(MethodConfig):
    alpha: float = 0.5


@register
class WiseFT(Method):
    name = "wise_ft"
    description = "after training, W = (1−α)·W0 + α·W (Wortsman et al., 2022)"
    config_class = WiseFTConfig

    def setup(self, ctx):
        self.pretrained = snapshot(ctx.trainable)

    @torch.no_grad()
    def on_train_end(self, ctx):
        for name, param in ctx.trainable.items():
            param.copy_(interpolate(self.pretrained[name], param, self.config.alpha))

    def state_dict(self):
        return {"pretrained": self.pretrained}

    def load_state_dict(self, state):
        if state:
            self.pretrained = state["pretrained"]
