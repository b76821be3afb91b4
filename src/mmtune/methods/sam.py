"""sam — sharpness-aware minimisation: step with the gradient taken at the worst nearby weights.

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021: with ``g`` the
step's gradient, ``ε = ρ·g/‖g‖`` (‖·‖ over all trainable tensors), the gradient is recomputed at ``W + ε`` and the
optimizer steps from ``W`` with it. ``rho`` = 0.05 (0 is vanilla). Cost: a second forward and backward per step.

``task_sam`` — task-based flat regions (Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat
Regions", 2022; their released F-PCGrad / F-CAGrad): each task ``i`` gets its own perturbation
``ε_i = ρ·g_i/‖g_i‖`` from its own gradient ``g_i``; its gradient is recomputed at ``W + ε_i`` (``g_i^SAM``) and split
into the loss part ``g_i`` and the flatness part ``h_i = g_i^SAM − g_i``; a gradient-surgery rule combines each part
over the tasks separately, and the step uses ``rule({g_i}) + rule({h_i})`` (all of mmtune's trainable parameters are
shared by the tasks, so there is no task-specific head to treat apart). ``combine`` = ``pcgrad`` (default),
``cagrad`` (c = 0.5) or ``sum`` (per-task SAM without surgery; with ``rho`` = 0 it is vanilla). The ``g_i`` are the
tasks' shares of the loss, as for ``pcgrad``. Other methods' extra loss terms keep their gradient at ``W``. Cost:
one backward per task, then a forward and a backward per task at its perturbed weights (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.methods.base import Method, MethodConfig, register
from mmtune.methods.multitask import cagrad_weights, pcgrad_weights, random_order
from mmtune.task_gradients import combine, gram_of


def sam_perturbation(grads: list[torch.Tensor], rho: float, norm: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``ε = ρ·g/‖g‖`` for the gradients of every trainable tensor (zeros when the gradient is zero); ‖g‖ over the
    whole tensors, also when they are sharded DTensors, summed in float64 so that one gradient gives the same ε
    however it is split (whole, or over processes in another summation order). ``norm``: ‖g‖ when ``grads`` are
    this process's slices of the gradient (taken over every process's)."""
    if norm is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
    scale = (rho / norm).float() if norm > 0 else 0.0
    return [(g.float() * scale).to(g.dtype) for g in grads]


@dataclass
class SAMConfig(MethodConfig):
    rho: float = 0.05  # radius of the neighbourhood (0: vanilla)

    ranges: ClassVar[dict[str, str]] = {"rho": "≥ 0"}


@register
class SAM(Method):
    name = "sam"
    # On FSDP2's shards and ZeRO-3's partitions each process moves its slice of the weights by its slice of ε, with
    # ‖g‖ from the all-reduced squared norms of the slices (``Step.gram``).
    supports_sharding = True
    description = "sharpness-aware minimisation: the gradient at W + ρ·g/‖g‖ (Foret et al., ICLR 2021)"
    config_class = SAMConfig
    null_options = {"rho": 0}

    def build_step(self, step):
        """The step's gradient at W (the logged loss), then again at W + ε; the optimizer steps from W with the
        second one. ε from this process's slice of the gradient (all of it but on FSDP2 shards and ZeRO-3 partitions)
        with ‖g‖ over all processes. Under DeepSpeed ZeRO-1/2, whose engine keeps the gradient in buffers the step
        can't read, the same on flat autograd gradients, the second handed to the engine's step."""
        if step.deepspeed and not step.partitioned:
            grad = step.gradient()
            with step.moved_by(sam_perturbation([grad], self.config.rho)[0]):
                step.set_gradient(step.gradient(log=False))
            return
        step.backward()
        grad = step.local_gradient()
        with step.moved_by(sam_perturbation([grad], self.config.rho, norm=step.gram(grad[None])[0, 0].sqrt())[0]):
            step.zero_grad()
            step.backward(log=False)


def flatness_parts(grads: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """``h_i = g_i^SAM − g_i``: what each task's gradient gains at its perturbed weights ([T, P] each)."""
    return perturbed - grads


TASK_SAM_RULES = ("pcgrad", "cagrad", "sum")


@dataclass
class TaskSAMConfig(MethodConfig):
    rho: float = 0.05  # radius of each task's neighbourhood
    combine: str = "pcgrad"  # the gradient-surgery rule applied to the loss parts and the flatness parts
    c: float = 0.5  # CAGrad's radius, with combine=cagrad

    ranges: ClassVar[dict[str, str]] = {"rho": "≥ 0", "c": "≥ 0"}
    choices: ClassVar[dict[str, tuple]] = {"combine": TASK_SAM_RULES}


@register
class TaskSAM(Method):
    name = "task_sam"
    # Written on the tasks' Gram matrices (the perturbation's norm is √G_ii, the surgery rules read G only), so on
    # FSDP2's shards each process moves and weighs its slices after all-reducing [T, T] matrices.
    supports_sharding = True
    description = "task-based SAM: a perturbation per task, loss and flatness parts combined by surgery (Phan et al.)"
    config_class = TaskSAMConfig
    null_options = {"rho": 0, "combine": "sum"}
    # Its step is built from Step's task gradients and moves: autograd's flat vectors handed to DeepSpeed's step under
    # ZeRO-1/2, each process's slices (Gram matrices all-reduced) on FSDP2 shards and ZeRO-3 partitions.

    def build_step(self, step):
        """``g_i`` and their Gram matrix; each present task's gradient again at ``W + ρ·g_i/‖g_i‖``; the step's
        gradient ``rule(g) + rule(h)`` with ``h_i = g_i^SAM − g_i``, each rule's coefficients from its own Gram
        matrix; plus the other loss terms' gradient at ``W``."""
        grads, extra = step.local_task_gradients()
        gram = step.gram(grads)
        present = (gram.diagonal() > 0).nonzero().flatten().tolist()
        if not present:
            step.set_gradient(extra)
            return
        perturbed = torch.zeros_like(grads)
        for index in present:
            with step.moved_by(grads[index] * (self.config.rho / float(gram[index, index].sqrt()))):
                perturbed[index] = step.local_task_gradients(only=step.ctx.tasks[index])[0][index]
        loss_part, flatness = grads[present], flatness_parts(grads[present], perturbed[present])
        update = combine(loss_part, self.surgery_weights(step.ctx, gram[present][:, present])) + \
            combine(flatness, self.surgery_weights(step.ctx, step.gram(flatness)))
        step.set_gradient(extra + update)

    def surgery_weights(self, ctx, gram: torch.Tensor) -> torch.Tensor:
        """The coefficients of the rule's combination of the vectors whose Gram matrix is ``gram``."""
        tasks = gram.shape[0]
        if self.config.combine == "pcgrad":
            return pcgrad_weights(gram, random_order(tasks, ctx.generator))
        if self.config.combine == "cagrad":  # on T × the shares, as the cagrad method
            return cagrad_weights(gram * tasks ** 2, self.config.c) * tasks
        return torch.ones(tasks, dtype=torch.float64)

    def surgery(self, ctx, grads: torch.Tensor) -> torch.Tensor:
        return combine(grads, self.surgery_weights(ctx, gram_of(grads)))

    def combine_task_gradients(self, ctx, grads, perturbed=None):
        """The step's rule on whole ``[T, P]`` gradients and their perturbed counterparts (what ``build_step``
        computes from Gram matrices, written on the vectors)."""
        if perturbed is None:
            raise ValueError("task_sam needs the tasks' gradients at their perturbed weights")
        return self.surgery(ctx, grads) + self.surgery(ctx, flatness_parts(grads, perturbed))
