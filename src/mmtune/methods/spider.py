"""SPIDER — Specialization via Importance Discrepancy Evaluation for Refinement.

Huang et al., "Learn from Downstream and Be Yourself in Multimodal Large Language Models
Fine-Tuning", ICML 2025 (arXiv 2411.10928).

Why: fine-tuning erodes what pre-training taught. SPIDER keeps an update only where the
downstream task needs it: for every trainable tensor, an entry whose downstream importance
(from the accumulated gradient) beats its pre-trained importance (from its magnitude) moves;
the others are pulled back to their pre-trained value.

    I(A)  = sigmoid((|A| − mean|A|) / std|A|)          (per tensor; 0 for an all-zero tensor)
    G    += ∇W                                          (signed sum over optimizer steps)
    C     = I(G) / (I(W0) + I(G))  where I(W0) < I(G), else 0;  C /= mean(C[C > 0]);  C = min(C, 1)
    W     ← (1 − C)·W0 + C·W                            (after every optimizer step)

The gradient is read just before ``optimizer.step()`` (accumulated, all-reduced, clipped); the
released code reads it after the step, which fails under engines that free gradients at the step.

State and memory: W0 (in the parameters' dtype) and G (fp32): two copies of the trainable parameters;
the reference keeps three — I(W0) is recomputed from W0 per tensor here, with the mean/std of |W0|
computed once. Both are saved with every checkpoint. The update runs tensor by tensor in three scratch
buffers the size of the largest trainable tensor, with in-place element-wise kernels and host-side
scalars only: this keeps it below the cost of one AdamW step (docs/benchmarks.md).

Sharded parameters (FSDP2 DTensors): everything runs on the local shard; the statistics that need the
whole tensor (mean/std of |A|, the mean of the non-zero C) come from all-reduced partial sums over the
tensor's shard group — scalars only, no gather.

A tensor of constant magnitude (std 0 — e.g. LayerNorm weights at their initial 1.0 — or one element):
the released code divides by a zero std, its importance is NaN, every comparison with NaN is false and its
coefficient is 0, so the tensor is held at W0 for the whole run. That is the default here
(``constant_magnitude: freeze``); ``neutral`` instead gives such a tensor importance 0.5 everywhere (no entry
matters more than another), so it moves where the gradient's importance beats 0.5. An entry where both
importances are 0 does not move.

Not supported: LoRA (W0 of a zero-initialised adapter has no pre-trained importance; SPIDER refuses
with a clear error) and shards that are not DTensors (FSDP1 flat parameters, DeepSpeed ZeRO-3
partitions), whose tensor layout SPIDER can't see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from mmtune.methods.base import Method, MethodConfig, local_shard, register  # noqa: F401

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

Groups = Sequence["dist.ProcessGroup"]  # the processes holding the other shards of a tensor (none: whole tensor)
Standardisation = tuple[float, float]  # (centre, scale): z = (|A| − centre)·scale
TINY = torch.finfo(torch.float32).tiny


def _global_sums(values: list[torch.Tensor | float], groups: Groups) -> list[float]:
    """Sum a few scalars over the shards of a tensor (one small all-reduce per group) and return them as
    Python floats: the only communication SPIDER needs. Scalars stay on the host so that the big tensors see
    only in-place kernels with scalar operands (a dozen 0-d tensor ops per tensor cost more than the
    element-wise work itself on a small model)."""
    if not groups:
        return [float(v) for v in values]
    device = next(v.device for v in values if isinstance(v, torch.Tensor))
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    for group in groups:
        dist.all_reduce(packed, group=group)
    return packed.tolist()


CONSTANT_MAGNITUDE = ("freeze", "neutral")


def _standardise_(magnitude: torch.Tensor, groups: Groups = (), constant: str = "freeze") -> Standardisation:
    """Centre ``magnitude`` (= |A|, contiguous) in place on mean|A| and return ``(centre, scale)``, with
    ``scale = 1/std|A|`` (unbiased std, as ``torch.std``); mean and std are over the whole tensor, all its
    shards when ``groups`` are given (all-reduces of scalars, no gather).

    Degenerate tensors are folded into the two scalars, so the big tensor sees only in-place arithmetic
    (``torch.where`` / masking over a large tensor cost ~10× an arithmetic pass on CPU): a constant
    magnitude (std 0, or one element) gets scale NaN with ``constant="freeze"`` (the released code's 0/0:
    importance NaN, so no entry moves) or 0 with ``"neutral"`` (z = 0, importance 0.5); an all-zero tensor is
    centred on the smallest normal float with scale inf, hence z = −inf and importance 0.
    """
    total, count = _global_sums([magnitude.sum(), magnitude.numel()], groups)
    mean = total / count if count else 0.0
    centre = mean if mean > 0 else TINY
    centred = magnitude.sub_(centre).view(-1)
    (sum_sq,) = _global_sums([torch.dot(centred, centred)], groups)
    std = math.sqrt(sum_sq / (count - 1)) if count > 1 else 0.0
    if mean <= 0:
        return centre, math.inf
    if std > 0:
        return centre, 1.0 / std
    return centre, math.nan if constant == "freeze" else 0.0


def standardisation(tensor: torch.Tensor, groups: Groups = (), constant: str = "freeze") -> Standardisation:
    """``(centre, scale)`` of ``importance(tensor)``: SPIDER computes W0's once (W0 never changes)."""
    return _standardise_(tensor.detach().float().abs().contiguous(), groups, constant)


def importance(tensor: torch.Tensor, *, standardised: Standardisation | None = None,
               out: torch.Tensor | None = None, groups: Groups = (), constant: str = "freeze") -> torch.Tensor:
    """``sigmoid((|A| − mean|A|) / std|A|)`` over the tensor (unbiased std); all-zero input gives zeros.

    A constant magnitude (std 0, or a single element) gives NaN everywhere (``constant="freeze"``, the released
    code) or 0.5 everywhere (``"neutral"``).
    ``standardised``: precomputed ``standardisation(tensor)``; ``out``: a contiguous fp32 buffer of the
    tensor's shape to compute in, instead of allocating one; ``groups``: ``tensor`` is one shard of a tensor
    split over these process groups (mean and std are then over the whole tensor).
    """
    tensor = tensor.detach()
    if out is None:
        magnitude = tensor.float().abs().contiguous()
    elif tensor.dtype == out.dtype:
        magnitude = torch.abs(tensor, out=out)
    else:
        magnitude = out.copy_(tensor).abs_()
    if standardised is None:
        centre, scale = _standardise_(magnitude, groups, constant)
    else:
        centre, scale = standardised
        magnitude.sub_(centre)
    return magnitude.mul_(scale).sigmoid_()


def allocation_coefficients(importance_pre: torch.Tensor, importance_ft: torch.Tensor, *, in_place: bool = False,
                            scratch: torch.Tensor | None = None, groups: Groups = ()) -> torch.Tensor:
    """``C = I_ft/(I_pre + I_ft)`` where ``I_pre < I_ft``, else 0; divided by the mean of its non-zero entries
    (if any); clipped at 1.

    ``in_place=True`` overwrites both inputs (the result lives in ``importance_ft``) and computes the mask in
    ``scratch`` when given: the training update's path, with no allocation per tensor. ``groups``: the inputs
    are shards of a tensor split over these process groups (the mean is then over the whole tensor).
    """
    if not in_place:
        importance_pre, importance_ft = importance_pre.clone(), importance_ft.clone()
    # 1.0 where I_pre < I_ft, else 0.0: the comparison itself, written into a float buffer (no bool temporary).
    moves = torch.lt(importance_pre, importance_ft, out=scratch) if scratch is not None \
        else torch.lt(importance_pre, importance_ft).float()
    ratio = importance_ft.div_(importance_pre.add_(importance_ft))
    coefficients = ratio.mul_(moves).nan_to_num_(0.0)  # 0/0 (both importances 0) or NaN importance: no move
    count, total = _global_sums([moves.sum(), coefficients.sum()], groups)
    return coefficients.mul_(count / total if count > 0 else 0.0).clamp_(max=1.0)  # ÷ mean of the non-zero C


def allocate(weight: torch.Tensor, pretrained: torch.Tensor, grad_sum: torch.Tensor,
             constant: str = "freeze") -> torch.Tensor:
    """The new value of one tensor: ``(1 − C)·W0 + C·W`` (a new tensor; see ``allocate_`` for the in-place update)."""
    c = allocation_coefficients(importance(pretrained, constant=constant), importance(grad_sum, constant=constant),
                                in_place=True)
    return torch.lerp(pretrained.float(), weight.float(), c).to(weight.dtype)


def allocate_(weight: torch.Tensor, pretrained: torch.Tensor, grad_sum: torch.Tensor,
              pretrained_standardised: Standardisation, buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
              groups: Groups = (), constant: str = "freeze") -> None:
    """``allocate`` in place on ``weight`` (or on a shard of it, with ``groups``), computing in three
    contiguous fp32 ``buffers`` of its shape."""
    pre, ft, scratch = buffers
    importance(pretrained, standardised=pretrained_standardised, out=pre)
    importance(grad_sum, out=ft, groups=groups, constant=constant)
    c = allocation_coefficients(pre, ft, in_place=True, scratch=scratch, groups=groups)
    if weight.dtype == pretrained.dtype == torch.float32:
        torch.lerp(pretrained, weight, c, out=weight)
    else:
        weight.copy_(torch.lerp(pretrained.float(), weight.float(), c))


def shard_groups(tensor: torch.Tensor) -> tuple:
    """The process groups a DTensor is sharded over (its replicated mesh dimensions hold equal copies)."""
    if not isinstance(tensor, DTensor):
        return ()
    return tuple(tensor.device_mesh.get_group(dim) for dim, placement in enumerate(tensor.placements)
                 if placement.is_shard())


@dataclass
class SpiderConfig(MethodConfig):
    """SPIDER has no coefficient to tune: the allocation is decided by the importance discrepancy.

    ``constant_magnitude``: what a tensor of constant magnitude does — ``freeze`` (released code: held at W0)
    or ``neutral`` (importance 0.5: it moves where the gradient's importance beats that)."""

    constant_magnitude: str = "freeze"

    choices: ClassVar[dict[str, tuple]] = {"constant_magnitude": CONSTANT_MAGNITUDE}


@register
class Spider(Method):
    name = "spider"
    description = "importance-discrepancy weight allocation against forgetting (Huang et al., ICML 2025)"
    supports_sharding = True
    config_class = SpiderConfig
    persistent = ("pretrained", "grad_sum")

    def __init__(self, config=None):
        super().__init__(config)
        # Per trainable tensor (its local shard under FSDP2): W0 in the parameter's dtype, G in fp32.
        self.pretrained: dict[str, torch.Tensor] = {}
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.standardised: dict[str, Standardisation] = {}  # of W0, derived: recomputed on load
        self.groups: dict[str, tuple] = {}

    def setup(self, ctx):
        lora = [n for n in ctx.trainable if "lora_" in n]
        if lora:
            raise ValueError("spider cannot run on LoRA adapters: a zero-initialised adapter has no pre-trained "
                             f"importance (e.g. {lora[0]}). Use full tuning of the scope (drop 'lora').")
        # Under DeepSpeed (ZeRO-3 included) the hooks see whole fp32 tensors (mmtune.engines); under FSDP the shards
        # must be DTensors (FSDP2) for the per-tensor statistics.
        if ctx.engine.fsdp and not all(isinstance(p, DTensor) for p in ctx.trainable.values()):
            raise ValueError("spider needs each tensor's shards as DTensors to compute its mean/std across them; "
                             "FSDP1 flat parameters hide them. Use FSDP2 (accelerate launch --use_fsdp "
                             "--fsdp_version 2), DDP, or DeepSpeed ZeRO-2 / ZeRO-3.")
        self.groups = {name: shard_groups(param) for name, param in ctx.trainable.items()}
        for name, param in ctx.trainable.items():
            self.pretrained[name] = local_shard(param).detach().clone()
            self.grad_sum[name] = torch.zeros_like(self.pretrained[name], dtype=torch.float32)
        self._standardise_pretrained()

    def _standardise_pretrained(self) -> None:
        constant = self.config.constant_magnitude
        self.standardised = {name: standardisation(w0, self.groups.get(name, ()), constant)
                             for name, w0 in self.pretrained.items()}

    @torch.no_grad()
    def before_optimizer_step(self, ctx):
        for name, param in ctx.trainable.items():
            if param.grad is not None:
                self.grad_sum[name].add_(local_shard(param.grad))

    @torch.no_grad()
    def after_optimizer_step(self, ctx):
        # Scratch for one tensor at a time, held only during the update (not through forward/backward);
        # one per device, for models spread over several.
        largest = max(w.numel() for w in self.pretrained.values())
        scratch: dict[torch.device, torch.Tensor] = {}
        for name, param in ctx.trainable.items():
            weight = local_shard(param)
            if weight.device not in scratch:
                scratch[weight.device] = torch.empty(3, largest, device=weight.device)
            buffers = tuple(b[:weight.numel()].view(weight.shape) for b in scratch[weight.device])
            allocate_(weight, self.pretrained[name], self.grad_sum[name], self.standardised[name], buffers,
                      self.groups[name], self.config.constant_magnitude)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state:
            self._standardise_pretrained()
