"""ewc — Elastic Weight Consolidation: a pull towards W0, weighted by each weight's Fisher information.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017. Requested in every
fine-tuning tracker (TRL #2428, unsloth #2502) and shipped by none. A weight the base's predictions depend on
(large Fisher information) is held near its pre-trained value; one they don't is free to move:

    loss += λ · Σ_i F̂_i (W_i − W0_i)² / n,       F̂ = F / mean(F)   (n: trainable entries)

F is the diagonal empirical Fisher at the base, ``E[(∂ℓ/∂W)²]`` over single records (ℓ: a record's mean token
cross-entropy), estimated once in ``setup`` on the first ``samples`` records of the training mix (the run's
own order). Normalising F to mean 1 puts λ on ``l2_reg``'s scale (with F̂ ≡ 1 the penalty is the mean squared
distance to W0), so the two read side by side; λ = 1e-3 as ``l2_reg``'s default. λ = 0 is vanilla.

Cost: ``samples`` extra forward/backward passes of one record before training (× the number of processes on FSDP2
shards: ``_sharded_fisher``); F is stored like W0 (one copy of the trainable tensors) and saved in checkpoints, so a
resumed run keeps the base's Fisher. Under DeepSpeed ZeRO-3 the penalty, a function of the weights alone, is
``weight_penalty``: its gradient is added on the full fp32 masters once per step (``mmtune.engines``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.data.collate import KEEP, subset_batch
from mmtune.losses import forward, sample_cross_entropy
from mmtune.methods.base import (
    MethodConfig,
    PretrainedSnapshotMethod,
    TrainContext,
    local_shard,
    register,
    sharded,
    sum_over_shards,
)


def diagonal_fisher(ctx: TrainContext, batches: Iterable[dict], samples: int) -> dict[str, torch.Tensor]:
    """Mean squared gradient of single records' loss per trainable entry, at the current weights (the base), over
    the first ``samples`` records of ``batches`` on each process (averaged over processes)."""
    # The model's own parameters (under DeepSpeed ``ctx.trainable`` may hold its fp32 masters, outside the graph;
    # under ZeRO-3 they are partitions whose full gradient autograd still returns, the engine gathering each
    # module's weights for its forward and backward).
    params = {name: param for name, param in ctx.unwrapped.named_parameters() if name in ctx.trainable}
    records = _single_records(batches, samples)
    if sharded(params):
        return _sharded_fisher(ctx, params, records)
    # (a ZeRO-3 partition's full shape is ``ds_shape``: its own tensor is empty)
    fisher = {name: torch.zeros(getattr(p, "ds_shape", p.shape), dtype=torch.float32, device=p.device)
              for name, p in params.items()}
    reached = False
    for one in records:
        grads = torch.autograd.grad(_record_loss(ctx, one), list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads, strict=True):
            if grad is not None:
                fisher[name] += grad.float().pow(2)
                reached = True
    if not reached:
        raise RuntimeError("ewc: the loss reached none of the trainable tensors; the Fisher information would be 0")
    fisher = {name: value / len(records) for name, value in fisher.items()}
    if ctx.accelerator is not None and ctx.accelerator.num_processes > 1:
        fisher = {name: ctx.accelerator.reduce(value, "mean") for name, value in fisher.items()}
    return fisher


def _single_records(batches: Iterable[dict], samples: int) -> list[dict]:
    """The first ``samples`` records of ``batches``, one batch each."""
    records: list[dict] = []
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            if len(records) == samples:
                return records
            records.append(subset_batch(batch, torch.tensor([row], device=batch["input_ids"].device)))
    if not records:
        raise ValueError("ewc: no training record to estimate the Fisher information on")
    return records


def _record_loss(ctx: TrainContext, one: dict) -> torch.Tensor:
    with ctx.accelerator.autocast() if ctx.accelerator is not None else contextlib.nullcontext():
        logits = forward(ctx.unwrapped, one).logits
    return sample_cross_entropy(logits, one["labels"], one.get(KEEP)).sum()


def _sharded_fisher(ctx: TrainContext, params: dict[str, torch.Tensor], records: list[dict]) -> dict[str, torch.Tensor]:
    """The Fisher information on FSDP2 shards, equal to the unsharded one. FSDP hands a method only the gradient
    averaged over processes, and the square of a mean is not the mean of squares; so each record's gradient is taken
    alone: in turn, one process's loss counts ×P and every other's ×0, and the averaged gradient is that record's
    (each process then squares its shard of it). P backward passes per record instead of one; each process ends with
    its shard of the mean over every process's records — what DDP's all-reduced Fisher is."""
    import torch.distributed as dist

    processes, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([len(records)])
    dist.all_reduce(count, op=dist.ReduceOp.MIN)  # every process runs the same number of backward passes
    records = records[:int(count)]
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for one in records:
        for source in range(processes):
            for param in params.values():
                param.grad = None
            (_record_loss(ctx, one) * (processes if rank == source else 0.0)).backward()
            for name, param in params.items():
                if param.grad is not None:
                    local_shard(fisher[name]).add_(local_shard(param.grad).float().pow(2))
    for param in params.values():
        param.grad = None
    total = sum(float(sum_over_shards(local_shard(value).sum(), value)) for value in fisher.values())
    if total == 0:
        raise RuntimeError("ewc: the loss reached none of the trainable tensors; the Fisher information would be 0")
    return {name: value / (len(records) * processes) for name, value in fisher.items()}


def normalized(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """F / mean(F) over every entry of every tensor (all zeros stays all zeros; on FSDP2 shards, the whole mean)."""
    total = sum(sum_over_shards(local_shard(value).sum(), value) for value in fisher.values())
    count = sum(value.numel() for value in fisher.values())
    mean = float(total) / max(1, count)
    return {name: value / mean if mean > 0 else value for name, value in fisher.items()}


def ewc_penalty(trainable: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_i F_i (W_i − W0_i)² / n`` over every entry of the trainable tensors (on FSDP2 shards: each shard's sum, the
    whole tensors' total)."""
    total = sum(sum_over_shards((local_shard(fisher[name]) * (local_shard(param) - local_shard(pretrained[name])).pow(2))
                                .sum(), param) for name, param in trainable.items())
    return total / sum(param.numel() for param in trainable.values())


@dataclass
class EWCConfig(MethodConfig):
    lam: float = 1e-3  # λ, on l2_reg's scale (F normalised to mean 1)
    samples: int = 64  # training records the Fisher information is estimated on

    ranges: ClassVar[dict[str, str]] = {"lam": "≥ 0", "samples": "≥ 1"}


@register
class EWC(PretrainedSnapshotMethod):
    name = "ewc"
    reads_weights_in_loss = True  # as weight_penalty: under ZeRO-3 its gradient is added on the full masters
    supports_sharding = True  # the Fisher one record at a time through FSDP (_sharded_fisher); tested on FSDP2 shards
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

    def weight_penalty(self, ctx):
        if self.config.lam == 0:
            return None
        return self.config.lam * ewc_penalty(ctx.trainable, self.pretrained, self.fisher)
