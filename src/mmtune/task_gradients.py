"""The two operations every step built from per-task gradients shares (PCGrad, CAGrad, task-based SAM, and
``mmtune.step.Step`` which runs them on whole vectors or on each process's slices): the tasks' Gram matrix and a
weighted sum of the tasks' gradients. Below both the methods and the step, so each imports it."""

from __future__ import annotations

import torch


def gram_of(grads: torch.Tensor) -> torch.Tensor:
    """``[g_i·g_j]`` of ``grads`` [T, P], in float64."""
    grads = grads.double()
    return grads @ grads.T


def combine(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i weights_i · grads_i`` in the gradients' dtype and device."""
    return weights.to(grads.device, grads.dtype) @ grads
