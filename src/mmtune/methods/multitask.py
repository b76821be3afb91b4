"""pcgrad, cagrad — multi-task optimisation: combine the gradients of the tasks of a step before stepping.

* **PCGrad** (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020): each task's gradient is projected
  onto the normal plane of every other task's gradient it conflicts with (negative inner product), in a random order;
  the projected gradients are summed.
* **CAGrad** (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021): the update
  ``d = g0 + (c‖g0‖/‖g_w‖)·g_w``, with ``g0`` the average gradient and ``g_w = Σ w_i g_i`` for the simplex weights ``w``
  minimising ``g_w·g0 + c‖g0‖‖g_w‖``; divided by ``1 + c²`` (the released code's default rescale). ``c`` = 0.5.

mmtune's task gradients are those of each task's *share* of the step's loss (its samples' or tokens' part of the
cross-entropy), so they sum to the vanilla gradient: PCGrad without conflicts, and CAGrad with ``c = 0`` (applied to
``T`` times the shares, whose mean is the vanilla gradient), are vanilla exactly. Cost: one backward per task in the
step (see docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmtune.methods.base import Method, MethodConfig, register

# Both build the step from the tasks' gradients (``mmtune.step.Step.combine_task_gradients``): the gradient of
# each task's share of the loss, one flat [T, P] matrix over the tasks present in the step, combined by the rule below;
# other methods' loss terms are added to the result.


def pcgrad(grads: torch.Tensor, order: list[list[int]]) -> torch.Tensor:
    """``grads`` [T, P] (one flat gradient per task); ``order[i]``: the other tasks, in the order task i is projected
    against them. Returns the sum of the projected gradients, [P]."""
    projected = grads.clone()
    for i in range(grads.shape[0]):
        for j in order[i]:
            dot = torch.dot(projected[i], grads[j])
            if dot < 0:
                projected[i] -= dot / grads[j].pow(2).sum().clamp(min=1e-20) * grads[j]
    return projected.sum(0)


def cagrad(grads: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    """The released CAGrad update for ``grads`` [T, P] (rescale 1: divided by 1 + c²)."""
    from scipy.optimize import minimize

    tasks = grads.shape[0]
    gram = (grads.double() @ grads.double().T).cpu().numpy()
    g0_norm = float(np.sqrt(gram.mean() + 1e-8))
    start = np.ones(tasks) / tasks
    scale = c * g0_norm + 1e-8

    def objective(w):
        return float(w @ gram @ start + scale * np.sqrt(w @ gram @ w + 1e-8))

    result = minimize(objective, start, bounds=[(0, 1)] * tasks,
                      constraints={"type": "eq", "fun": lambda w: 1 - w.sum()})
    weights = torch.as_tensor(result.x, dtype=grads.dtype, device=grads.device)
    gw = (weights[:, None] * grads).sum(0)
    lam = scale / (gw.norm() + 1e-8)
    return (grads.mean(0) + lam * gw) / (1 + c ** 2)


def random_order(tasks: int, generator: torch.Generator) -> list[list[int]]:
    """PCGrad's projection order: for each task, the other tasks in a random order (drawn from ``generator``)."""
    order = []
    for i in range(tasks):
        others = [j for j in range(tasks) if j != i]
        perm = torch.randperm(len(others), generator=generator, device=generator.device).tolist()
        order.append([others[k] for k in perm])
    return order


@dataclass
class PCGradConfig(MethodConfig):
    """PCGrad has no hyperparameter; the projection order is random (the run's seed)."""


@register
class PCGrad(Method):
    name = "pcgrad"
    sharding_refusal = (
        "it combines the tasks' gradients as whole flat vectors (dot products over every parameter), which on"
        " shards would need reductions over the processes mmtune does not do yet")
    description = "project away conflicting task-gradient components (Yu et al., NeurIPS 2020)"
    config_class = PCGradConfig
    sets_gradients = True

    def build_step(self, step):
        step.combine_task_gradients(lambda grads, _: pcgrad(grads, random_order(grads.shape[0], step.ctx.generator)))


@dataclass
class CAGradConfig(MethodConfig):
    c: float = 0.5  # the conflict-averse radius (0: vanilla)

    def __post_init__(self):
        if not self.c >= 0:
            raise ValueError(f"method.cagrad.c={self.c} must be ≥ 0")


@register
class CAGrad(Method):
    name = "cagrad"
    sharding_refusal = PCGrad.sharding_refusal
    description = "conflict-averse gradient descent over the tasks' gradients (Liu et al., NeurIPS 2021)"
    config_class = CAGradConfig
    null_options = {"c": 0}
    sets_gradients = True

    def build_step(self, step):
        # On T × the task shares: their mean is the vanilla gradient, so c = 0 is vanilla exactly.
        step.combine_task_gradients(lambda grads, _: cagrad(grads * grads.shape[0], self.config.c))
