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
from typing import ClassVar

import numpy as np
import torch

from mmtune.methods.base import Method, MethodConfig, register
from mmtune.task_gradients import combine, gram_of  # noqa: F401 — public here too

# Both build the step from the tasks' gradients (``mmtune.step.Step.weigh_task_gradients``): each task's share of the
# loss has a gradient g_i (one flat [T, P] matrix over the tasks present in the step), and both rules return a
# combination Σ_i c_i·g_i whose coefficients depend on the gradients only through their Gram matrix G = [g_i·g_j]. So
# the rules are written on G ([T, T]): on parameters sharded over processes (FSDP2) each process holds a slice of
# every g_i, and one all-reduce of its slice's Gram matrix is all the communication they need. Other methods' loss
# terms are added to the result.


def pcgrad_weights(gram: torch.Tensor, order: list[list[int]]) -> torch.Tensor:
    """PCGrad on the Gram matrix ``gram`` [T, T]: task i's projected gradient stays a combination ``a·g`` of the task
    gradients, whose dot product with g_j is ``a·G[:, j]``; projecting it off a conflicting g_j (dot < 0) subtracts
    ``dot / G[j, j]`` from ``a_j``. Returns the coefficients [T] of the sum of the projected gradients."""
    gram = gram.double().cpu()  # a few numbers: one wait for the device, not one per pair
    tasks = gram.shape[0]
    total = torch.zeros(tasks, dtype=torch.float64)
    for i in range(tasks):
        a = torch.zeros(tasks, dtype=torch.float64)
        a[i] = 1.0
        for j in order[i]:
            dot = a @ gram[:, j]
            if dot < 0:
                a[j] -= dot / gram[j, j].clamp(min=1e-20)
        total += a
    return total


def pcgrad(grads: torch.Tensor, order: list[list[int]]) -> torch.Tensor:
    """``grads`` [T, P] (one flat gradient per task); ``order[i]``: the other tasks, in the order task i is projected
    against them. Returns the sum of the projected gradients, [P]."""
    return combine(grads, pcgrad_weights(gram_of(grads), order))


def cagrad_weights(gram: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    """The released CAGrad update (rescale 1: divided by 1 + c²) on the Gram matrix ``gram`` [T, T]: simplex weights
    ``w`` minimising ``w·G·1/T + c‖g0‖·√(w·G·w)`` (``‖g0‖² = mean(G)``), then ``d = (g0 + λ·g_w) / (1 + c²)`` with
    ``λ = c‖g0‖ / ‖g_w‖``. Returns the coefficients [T] of ``d`` over the task gradients."""
    from scipy.optimize import minimize

    matrix = gram.double().cpu().numpy()
    tasks = matrix.shape[0]
    g0_norm = float(np.sqrt(matrix.mean() + 1e-8))
    start = np.ones(tasks) / tasks
    scale = c * g0_norm + 1e-8

    def objective(w):
        return float(w @ matrix @ start + scale * np.sqrt(w @ matrix @ w + 1e-8))

    result = minimize(objective, start, bounds=[(0, 1)] * tasks,
                      constraints={"type": "eq", "fun": lambda w: 1 - w.sum()})
    weights = result.x
    lam = scale / (float(np.sqrt(max(weights @ matrix @ weights, 0.0))) + 1e-8)
    return torch.as_tensor((start + lam * weights) / (1 + c ** 2), dtype=torch.float64)


def cagrad(grads: torch.Tensor, c: float = 0.5) -> torch.Tensor:
    """The released CAGrad update for ``grads`` [T, P] (rescale 1: divided by 1 + c²)."""
    return combine(grads, cagrad_weights(gram_of(grads), c))


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
    supports_sharding = True  # its rule reads the gradients' Gram matrix only (one all-reduce on shards)
    description = "project away conflicting task-gradient components (Yu et al., NeurIPS 2020)"
    config_class = PCGradConfig

    def build_step(self, step):
        step.weigh_task_gradients(lambda gram: pcgrad_weights(gram, random_order(gram.shape[0], step.ctx.generator)))


@dataclass
class CAGradConfig(MethodConfig):
    c: float = 0.5  # the conflict-averse radius (0: vanilla)

    ranges: ClassVar[dict[str, str]] = {"c": "≥ 0"}


@register
class CAGrad(Method):
    name = "cagrad"
    supports_sharding = True
    description = "conflict-averse gradient descent over the tasks' gradients (Liu et al., NeurIPS 2021)"
    config_class = CAGradConfig
    null_options = {"c": 0}

    def build_step(self, step):
        # On T × the task shares (Gram T² G, coefficients T c): their mean is the vanilla gradient, so c = 0 is
        # vanilla exactly.
        step.weigh_task_gradients(lambda gram: cagrad_weights(gram * gram.shape[0] ** 2, self.config.c)
                                  * gram.shape[0])
