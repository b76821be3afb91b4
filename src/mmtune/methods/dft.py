"""dft and asft — the loss-level remedies LLaMA-Factory and ms-swift ship (``use_dft_loss``, ``enable_dft_loss``;
``use_asft_loss``).

DFT — Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification"
(arXiv 2508.05629). The SFT gradient is a policy gradient whose implicit reward is ``1 / p`` of the target token:
rare tokens get huge updates. DFT rescales each token's loss by its own (stopped-gradient) probability:

    L_DFT = − Σ_t sg(p_t) · log p_t        (p_t = π_θ(y_t | y_<t, x))

ASFT — Zhu et al., "Anchored Supervised Fine-Tuning" (arXiv 2509.23753, ICLR 2026). DFT drifts away from the base
distribution; ASFT anchors it with the token-level KL divergence from the base model:

    L_ASFT = L_DFT + λ · Σ_t KL(π_base(· | y_<t, x) ‖ π_θ(· | y_<t, x))        λ = 0.1 (the paper's default)

The base distribution comes from a forward pass at the pre-trained values of the trainable tensors (W0, kept by
the method; the frozen rest is shared), not from a second copy of the model: only the tuned tensors are stored
twice. Both terms are reduced over target tokens like the cross-entropy (``train.loss_reduction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.func import functional_call

from mmtune.data.collate import KEEP
from mmtune.engine import release_gathered, write_weight
from mmtune.losses import forward, target_logits
from mmtune.methods.base import (
    Method,
    MethodConfig,
    PretrainedSnapshotMethod,
    local_shard,
    partitioned,
    register,
    sharded,
)


def dft_token_loss(log_probs: torch.Tensor) -> torch.Tensor:
    """``−sg(p)·log p`` per target token."""
    return -log_probs.detach().exp() * log_probs


def base_kl(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """``KL(base ‖ model)`` per row of ``[N, V]`` logits (gradient through ``logits`` only)."""
    log_model = torch.log_softmax(logits.float(), dim=-1)
    log_base = torch.log_softmax(base_logits.detach().float(), dim=-1)
    return (log_base.exp() * (log_base - log_model)).sum(-1)


@torch.no_grad()
def base_logits(ctx, batch: dict, pretrained: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model's logits on ``batch``: one forward of the plain model with W0 in place of the trainable tensors
    (each in its parameter's dtype: under DeepSpeed bf16 the weights are bf16 and W0 is kept from the fp32 masters)."""
    if sharded(ctx.trainable):
        return sharded_base_logits(ctx, batch, pretrained)
    if partitioned(ctx.trainable):
        return partitioned_base_logits(ctx, batch, pretrained)
    dtypes = {name: param.dtype for name, param in ctx.unwrapped.named_parameters() if name in pretrained}
    swapped = {name: value.to(dtypes.get(name, value.dtype)) for name, value in pretrained.items()}
    return forward(ctx.unwrapped, batch,
                   lambda **inputs: functional_call(ctx.unwrapped, swapped, args=(), kwargs=inputs)).logits


@torch.no_grad()
def partitioned_base_logits(ctx, batch: dict, pretrained: dict[str, torch.Tensor]) -> torch.Tensor:
    """``base_logits`` under DeepSpeed ZeRO-3, where a weight is a partition gathered only inside its module's forward
    and backward: each process writes its piece of W0 into its partitions (and W0 whole into a small parameter
    DeepSpeed keeps gathered), one forward gathers W0, then the very same W is copied back — the backward of the
    step's forward gathers W anew from the partitions."""
    current = {name: (param.ds_tensor.detach().clone(), param.data.clone()) for name, param in ctx.trainable.items()}
    try:
        for name, param in ctx.trainable.items():
            write_weight(param, pretrained[name])
        return forward(ctx.unwrapped, batch).logits
    finally:
        # DeepSpeed keeps the weights it gathered for that forward (for their reuse in the backward): release them
        # (without the engine's gc.collect; 1.2e-4 off in 2 processes when they are kept)
        release_gathered(ctx.accelerator)
        for name, param in ctx.trainable.items():
            partition, data = current[name]
            param.ds_tensor.data.copy_(partition)
            if data.numel():
                param.data.copy_(data)


@torch.no_grad()
def sharded_base_logits(ctx, batch: dict, pretrained: dict[str, torch.Tensor]) -> torch.Tensor:
    """``base_logits`` on FSDP2 shards, where a module's parameters can't be swapped (FSDP gathers its own): each
    process writes W0 into its shards, every FSDP module drops its gathered weights (``reshard``: the root keeps
    them between forward and backward), one forward gathers W0, then the shards get the very same W back (copied)
    and the gathered weights are dropped again — the backward of the step's forward gathers W anew, as it does for
    every block."""
    from torch.distributed.fsdp import FSDPModule

    modules = [module for module in ctx.unwrapped.modules() if isinstance(module, FSDPModule)]
    current = {name: local_shard(param).clone() for name, param in ctx.trainable.items()}
    try:
        for name, param in ctx.trainable.items():
            local_shard(param).copy_(local_shard(pretrained[name]))
        for module in modules:
            module.reshard()
        return forward(ctx.unwrapped, batch).logits
    finally:
        for name, param in ctx.trainable.items():
            local_shard(param).copy_(current[name])
        for module in modules:
            module.reshard()


@register
class DFT(Method):
    name = "dft"
    description = "dynamic fine-tuning: each token's loss scaled by its own probability (Wu et al., 2025)"
    supports_sharding = True

    def token_loss(self, ctx, batch, outputs, log_probs, index):
        return dft_token_loss(log_probs)


@dataclass
class ASFTConfig(MethodConfig):
    lam: float = 0.1  # λ, the KL anchor's weight (the paper's and LLaMA-Factory's default)

    ranges: ClassVar[dict[str, str]] = {"lam": "≥ 0"}


@register
class ASFT(PretrainedSnapshotMethod):
    name = "asft"
    # Its loss term reads W0 through a forward pass, which ZeRO-3 gathers (partitioned_base_logits), not the
    # trainable weights themselves.
    supports_sharding = True  # W0 written into the shards for one forward (sharded_base_logits)
    description = "DFT anchored to the base model by a token-level KL divergence (Zhu et al., ICLR 2026)"
    config_class = ASFTConfig

    def token_loss(self, ctx, batch, outputs, log_probs, index):
        loss = dft_token_loss(log_probs)
        if self.config.lam == 0:
            return loss
        kept = batch.get(KEEP)
        anchor = base_kl(target_logits(outputs.logits, batch["labels"], kept),
                         target_logits(base_logits(ctx, batch, self.pretrained), batch["labels"], kept))
        return loss + self.config.lam * anchor
