"""uncertainty, famo — loss balancing: weigh each task's loss instead of taking the plain mean over the batch.

Open-response and fixed-choice tasks have very different loss scales (a caption's mean token loss vs one letter),
so the plain mean lets one kind of task set the step. Both methods take ``L_i``, each task's mean loss in the
micro-batch (the mean of its samples' mean token losses), and return the loss that replaces the cross-entropy:

* **Uncertainty weighting** (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
  Scene Geometry and Semantics", CVPR 2018), the classification form: ``Σ_i exp(-s_i)·L_i + s_i/2`` with
  ``s_i = log σ_i²`` learned (at its optimum ``exp(s_i) = 2·L_i``: each task weighs ``1/(2·L_i)``). Kendall et al. train
  ``s`` with the network's optimizer; here it has an Adam of its own (``lr`` = 0.025, FAMO's logit rate), because a
  fine-tuning learning rate (1e-4 to 2e-3) would move it by at most a few tenths in a few hundred steps — equal
  weights with extra steps.
* **FAMO** (Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023): task logits ``ξ``,
  ``z = softmax(ξ)``; the loss ``Σ_i z_i·log L_i / c`` with ``c = Σ_i z_i / L_i`` (detached), so the step decreases
  every task's *log* loss at a rate set by ``z``. After the step the same batch is forwarded again (no gradient) and
  ``ξ`` takes an Adam step (``lr`` 0.025, L2 ``gamma`` 0.01, the released defaults) on
  ``J_softmax(ξ)ᵀ·(log L_before − log L_after)``: weight moves to the tasks whose loss fell least. Cost: one forward
  per step (see docs/benchmarks.md).

Under several processes the balancing state stays the same everywhere: the gradient of ``s`` and FAMO's per-task
losses are averaged over processes before they are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.data.collate import KEEP
from mmtune.files import atomic_write
from mmtune.losses import forward, sample_cross_entropy, task_mean_losses
from mmtune.methods.base import Method, MethodConfig, TrainContext, register


def uncertainty_weighted_loss(losses: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """Kendall et al.'s classification form, ``Σ_i exp(-s_i)·L_i + s_i/2`` (``losses``, ``log_vars``: [T])."""
    return (torch.exp(-log_vars) * losses + 0.5 * log_vars).sum()


def famo_loss(losses: torch.Tensor, logits: torch.Tensor, floor: float = 1e-8) -> torch.Tensor:
    """FAMO's weighted log loss ``Σ_i z_i·log L_i / c``, ``c = Σ_i z_i/L_i`` detached (``losses``, ``logits``: [T]).
    Its gradient is ``Σ_i (z_i / (c·L_i))·∇L_i``: the coefficients sum to 1."""
    z = torch.softmax(logits, -1)
    losses = losses + floor
    c = (z / losses).sum().detach()
    return (z * losses.log()).sum() / c


def famo_logit_gradient(logits: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                        floor: float = 1e-8) -> torch.Tensor:
    """The gradient FAMO's logits step on: ``J_softmax(ξ)ᵀ·δ`` with ``δ_i = log L_i(before) − log L_i(after)``."""
    delta = (before + floor).log() - (after + floor).log()
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(torch.softmax(leaf, -1), leaf, grad_outputs=delta)
    return grad


def present(ctx: TrainContext, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch's task losses as a vector and their indices in ``ctx.tasks``."""
    index = torch.tensor([ctx.tasks.index(t) for t in losses], device=next(iter(losses.values())).device)
    return torch.stack(list(losses.values())), index


def mean_over_processes(ctx: TrainContext, tensor: torch.Tensor) -> torch.Tensor:
    accelerator = ctx.accelerator
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor, "mean")


def write_task_weights(ctx: TrainContext, name: str, weights: torch.Tensor, **extra) -> None:
    """``<run>/<name>_task_weights.json``: where the balancing ended, so a user can see what it did."""
    main = ctx.accelerator is None or ctx.accelerator.is_main_process
    if ctx.output_dir is not None and main:
        row = {"tasks": dict(zip(ctx.tasks, [round(float(w), 6) for w in weights], strict=True)), **extra}
        atomic_write(ctx.output_dir / f"{name}_task_weights.json", json.dumps(row, indent=2) + "\n")


class LearnedTaskVector(Method):
    """What both balancers share: one learned number per task (``self.values``: UW's log-variances, FAMO's logits)
    with an Adam of its own, saved with every checkpoint."""

    persistent = ("values", "optimizer")
    weight_decay: float = 0.0

    def setup(self, ctx):
        device = next(iter(ctx.trainable.values())).device
        self.values = torch.zeros(len(ctx.tasks), device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.values], lr=self.config.lr, weight_decay=self.weight_decay)

    def on_train_end(self, ctx):
        """Check that every process ended with the same weights (they are kept equal by averaging what updates
        them; a divergence would mean each process trained with its own balance), then write them."""
        accelerator = ctx.accelerator
        if accelerator is not None and accelerator.num_processes > 1:
            every = accelerator.gather(self.values.detach()[None])
            if not bool((every == every[0]).all()):
                raise RuntimeError(f"{self.name}: the processes ended with different task weights {every.tolist()}; "
                                   "the run's balancing was not the same everywhere")
        self.write_weights(ctx)

    def write_weights(self, ctx) -> None:
        raise NotImplementedError



@dataclass
class UncertaintyConfig(MethodConfig):
    lr: float = 0.025  # learning rate of the log-variances' own Adam

    ranges: ClassVar[dict[str, str]] = {"lr": "≥ 0"}


@register
class UncertaintyWeighting(LearnedTaskVector):
    """``self.values``: the log-variances ``s_i``, learned through the loss's own gradient."""

    name = "uncertainty"
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "uncertainty weighting of the tasks' losses, Σ exp(-s_i)·L_i + s_i/2 (Kendall et al., CVPR 2018)"
    config_class = UncertaintyConfig

    def balance_task_losses(self, ctx, losses):
        values, index = present(ctx, losses)
        return uncertainty_weighted_loss(values, self.values[index])

    def after_optimizer_step(self, ctx):
        if self.values.grad is not None:
            self.values.grad = mean_over_processes(ctx, self.values.grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def write_weights(self, ctx):
        write_task_weights(ctx, self.name, torch.exp(-self.values.detach()),
                           log_variances=dict(zip(ctx.tasks, self.values.tolist(), strict=True)))


@dataclass
class FAMOConfig(MethodConfig):
    lr: float = 0.025  # learning rate of the task logits (released default)
    gamma: float = 0.01  # L2 regularisation of the logits (released default)

    ranges: ClassVar[dict[str, str]] = {"lr": "≥ 0", "gamma": "≥ 0"}


@register
class FAMO(LearnedTaskVector):
    """``self.values``: the task logits ``ξ``, learned from how each task's loss moved over a step."""

    name = "famo"
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "fast adaptive multitask optimisation: balanced decrease of the tasks' log losses (Liu et al., 2023)"
    config_class = FAMOConfig

    def setup(self, ctx):
        self.weight_decay = self.config.gamma
        super().setup(ctx)
        self.reset_step(self.values.device)

    def build_step(self, step):
        """The plain step; its micro-batches are kept to measure each task's loss again after the update."""
        self.batches = step.micro
        step.backward()

    def reset_step(self, device):
        # The step's per-task losses, summed over its micro-batches (and how many micro-batches had each task).
        self.loss_sums = torch.zeros(len(self.values), device=device)
        self.loss_counts = torch.zeros(len(self.values), device=device)

    def balance_task_losses(self, ctx, losses):
        values, index = present(ctx, losses)
        self.loss_sums[index] += values.detach()  # L_before, compared after the step
        self.loss_counts[index] += 1
        return famo_loss(values, self.values[index])

    @torch.no_grad()
    def step_losses(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-task losses of the step's micro-batches at the weights just updated (sums and counts)."""
        sums, counts = torch.zeros_like(self.loss_sums), torch.zeros_like(self.loss_counts)
        for batch in self.batches:
            with ctx.accelerator.autocast():  # only mmtune's loop runs FAMO (the Trainer integration refuses it)
                outputs = forward(ctx.model, batch)
            values, index = present(ctx, task_mean_losses(batch, sample_cross_entropy(outputs.logits, batch["labels"], batch.get(KEEP))))
            sums[index] += values.float()
            counts[index] += 1
        return sums, counts

    def after_optimizer_step(self, ctx):
        after_sums, after_counts = self.step_losses(ctx)
        stacked = mean_over_processes(ctx, torch.stack([self.loss_sums, self.loss_counts, after_sums, after_counts]))
        seen = stacked[1] > 0  # tasks in this step, on some process
        before = torch.where(seen, stacked[0] / stacked[1].clamp(min=1), 1.0)
        after = torch.where(seen, stacked[2] / stacked[3].clamp(min=1), 1.0)  # unseen tasks: δ = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.values.grad = famo_logit_gradient(self.values, before, after)
        self.optimizer.step()
        self.reset_step(self.values.device)
        self.batches = []  # not kept beyond the step

    def write_weights(self, ctx):
        write_task_weights(ctx, self.name, torch.softmax(self.values.detach(), -1))
