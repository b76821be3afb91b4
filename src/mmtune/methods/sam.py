"""sam — sharpness-aware minimisation: step with the gradient taken at the worst nearby weights.

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021: with ``g`` the
step's gradient, ``ε = ρ·g/‖g‖`` (‖·‖ over all trainable tensors), the gradient is recomputed at ``W + ε`` and the
optimizer steps from ``W`` with it. ``rho`` = 0.05 (0 is vanilla). Cost: a second forward and backward per step.
The task-based variant of issue 16 (per-task perturbations combined by gradient surgery) is not built; plain SAM is
its ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtune.methods.base import Method, MethodConfig, register


def sam_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """``ε = ρ·g/‖g‖`` for the gradients of every trainable tensor (zeros when the gradient is zero)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = rho / norm if norm > 0 else 0.0
    return [(g.float() * scale).to(g.dtype) for g in grads]


@dataclass
class SAMConfig(MethodConfig):
    rho: float = 0.05  # radius of the neighbourhood (0: vanilla)

    def __post_init__(self):
        if not self.rho >= 0:
            raise ValueError(f"method.sam.rho={self.rho} must be ≥ 0")


@register
class SAM(Method):
    name = "sam"
    description = "sharpness-aware minimisation: the gradient at W + ρ·g/‖g‖ (Foret et al., ICLR 2021)"
    config_class = SAMConfig
    second_pass = True

    @torch.no_grad()
    def perturb(self, ctx):
        params = [p for p in ctx.trainable.values() if p.grad is not None]
        self.moved = list(zip(params, sam_perturbation([p.grad for p in params], self.config.rho), strict=True))
        for param, epsilon in self.moved:
            param.add_(epsilon)

    @torch.no_grad()
    def restore(self, ctx):
        for param, epsilon in self.moved:
            param.sub_(epsilon)
        self.moved = []
