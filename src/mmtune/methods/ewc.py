"""ewc — Elastic Weight Consolidation: a pull towards W0, weighted by each weight's Fisher information.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017. Requested in every
fine-tuning tracker (TRL #2428, unsloth #2502) and shipped by none. A weight the base's predictions depend on
(large Fisher information) is held near its pre-trained value; one they don't is free to move:

    loss += λ · Σ_i F̂_i (W_i − W0_i)² / n,       F̂ = F / mean(F)   (n: trainable entries)

F is the diagonal empirical Fisher at the base, ``E[(∂ℓ/∂W)²]`` over single records (ℓ: a record's mean token
cross-entropy), estimated once in ``setup`` on the first ``samples`` records of the training mix (the run's
own order). Normalising F to mean 1 puts λ on ``l2_reg``'s scale (with F̂ ≡ 1 the penalty is the mean squared
distance to W0), so the two read side by side; λ = 1e-3 as ``l2_reg``'s default. λ = 0 is vanilla.

Cost: ``samples`` extra forward/backward passes of one record before training; F is stored like W0 (one copy of
the trainable tensors) and saved in checkpoints, so a resumed run keeps the base's Fisher.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mmtune.data.collate import model_inputs, subset_batch
from mmtune.losses import sample_cross_entropy
from mmtune.methods.base import MethodConfig, PretrainedSnapshotMethod, TrainContext, register


def diagonal_fisher(ctx: TrainContext, batches: Iterable[dict], samples: int) -> dict[str, torch.Tensor]:
    """Mean squared gradient of single records' loss per trainable entry, at the current weights (the base), over
    the first ``samples`` records of ``batches`` on each process (averaged over processes)."""
    # The model's own parameters (under DeepSpeed ``ctx.trainable`` may hold its fp32 masters, outside the graph).
    params = {name: param for name, param in ctx.unwrapped.named_parameters() if name in ctx.trainable}
    reached = False
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    seen = 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            if seen >= samples:
                break
            one = subset_batch(batch, torch.tensor([row], device=batch["input_ids"].device))
            with ctx.accelerator.autocast() if ctx.accelerator is not None else contextlib.nullcontext():
                logits = ctx.unwrapped(**model_inputs(one)).logits
            loss = sample_cross_entropy(logits, one["labels"]).sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), grad in zip(params.items(), grads, strict=True):
                if grad is not None:
                    fisher[name] += grad.float().pow(2)
                    reached = True
            seen += 1
        if seen >= samples:
            break
    if seen == 0:
        raise ValueError("ewc: no training record to estimate the Fisher information on")
    if not reached:
        raise RuntimeError("ewc: the loss reached none of the trainable tensors; the Fisher information would be 0")
    fisher = {name: value / seen for name, value in fisher.items()}
    if ctx.accelerator is not None and ctx.accelerator.num_processes > 1:
        fisher = {name: ctx.accelerator.reduce(value, "mean") for name, value in fisher.items()}
    return fisher


def normalized(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """F / mean(F) over every entry of every tensor (all zeros stays all zeros)."""
    total = sum(value.sum() for value in fisher.values())
    count = sum(value.numel() for value in fisher.values())
    mean = float(total) / max(1, count)
    return {name: value / mean if mean > 0 else value for name, value in fisher.items()}


def ewc_penalty(trainable: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_i F_i (W_i − W0_i)² / n`` over every entry of the trainable tensors."""
    total = sum((fisher[name] * (param - pretrained[name]).pow(2)).sum() for name, param in trainable.items())
    return total / sum(param.numel() for param in trainable.values())


@dataclass
class EWCConfig(MethodConfig):
    lam: float = 1e-3  # λ, on l2_reg's scale (F normalised to mean 1)
    samples: int = 64  # training records the Fisher information is estimated on

    def __post_init__(self):
        if not self.lam >= 0:
            raise ValueError(f"method.ewc.lam={self.lam} must be ≥ 0")
        if self.samples < 1:
            raise ValueError(f"method.ewc.samples={self.samples} must be ≥ 1")


@register
class EWC(PretrainedSnapshotMethod):
    name = "ewc"
    reads_weights_in_loss = True  # refused under ZeRO-3 (mmtune.engines.zero3_refusal)
    sharding_refusal = (
        "its Fisher information squares each record's gradient, and FSDP averages every gradient over the "
        "processes before a method sees it (the square of a mean is not the mean of squares)")
    description = "elastic weight consolidation: pull to W0 weighted by the base's Fisher information (Kirkpatrick et al., 2017)"
    config_class = EWCConfig
    persistent = ("pretrained", "fisher")
    null_options = {"lam": 0}

    def setup(self, ctx):
        super().setup(ctx)
        if self.config.lam == 0:
            self.fisher = {}
            return
        if ctx.batches is None:
            raise ValueError("ewc estimates the Fisher information from the training batches, and this host gave "
                             "none (TrainContext.batches): train with mmtune train or a Trainer with a train_dataset")
        self.fisher = normalized(diagonal_fisher(ctx, ctx.batches(), self.config.samples))

    def extra_losses(self, ctx, batch, outputs, sample_loss):
        if self.config.lam == 0:
            return {}
        return {self.name: self.config.lam * ewc_penalty(ctx.trainable, self.pretrained, self.fisher)}
