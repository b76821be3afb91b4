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

State and memory: W0 and G, fp32 (two copies of the trainable parameters; the reference keeps three
— I(W0) is recomputed from W0 per tensor here, with the mean/std of |W0| cached as two scalars per
tensor). Both are saved with every checkpoint. The update runs tensor by tensor in three scratch
buffers the size of the largest trainable tensor, with in-place element-wise kernels only: this
is what keeps it near one optimizer step in time (docs/benchmarks.md).

Edge cases the reference leaves undefined: a tensor with constant magnitude (std 0) has importance
0.5 everywhere (no entry matters more than another) instead of NaN; a one-element tensor likewise;
an entry where both importances are 0 does not move.

Not supported: LoRA (W0 of a zero-initialised adapter has no pre-trained importance; SPIDER refuses
with a clear error) and FSDP / ZeRO-3 sharded parameters (mean/std need the whole tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtune.methods.base import Method, MethodConfig, register

Standardisation = tuple[torch.Tensor, torch.Tensor]  # (scale, shift): z = |A|·scale + shift


def standardisation(magnitude: torch.Tensor) -> Standardisation:
    """``(|A| − mean|A|) / std|A|`` (unbiased std, as ``torch.std``) as ``|A|·scale + shift``: two scalars, so
    the big tensor sees only in-place kernels, and SPIDER computes W0's once (W0 never changes).

    A constant magnitude (std 0, or one element) gets z = 0 (importance 0.5); an all-zero tensor z = −inf (0).
    """
    mean = magnitude.mean()
    std = magnitude.std() if magnitude.numel() > 1 else magnitude.new_zeros(())  # one element: no unbiased std
    scale = torch.where(std > 0, std.reciprocal(), 0.0)
    shift = torch.where(mean > 0, -mean * scale, -torch.inf)
    return scale, shift


def importance(tensor: torch.Tensor, *, scale_shift: Standardisation | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``sigmoid((|A| − mean|A|) / std|A|)`` over the tensor (unbiased std); all-zero input gives zeros.

    A constant magnitude (std 0, or a single element) gives 0.5 everywhere.
    ``scale_shift``: precomputed ``standardisation(|A|)``; ``out``: an fp32 buffer of the tensor's shape to
    compute in, instead of allocating one.
    """
    tensor = tensor.detach()
    if out is None:
        magnitude = tensor.float().abs()
    elif tensor.dtype == out.dtype:
        magnitude = torch.abs(tensor, out=out)
    else:
        magnitude = out.copy_(tensor).abs_()
    scale, shift = scale_shift if scale_shift is not None else standardisation(magnitude)
    # (torch.where / masked_fill over a large tensor cost ~10x an in-place arithmetic pass on CPU.)
    return magnitude.mul_(scale).add_(shift).sigmoid_()


def allocation_coefficients(importance_pre: torch.Tensor, importance_ft: torch.Tensor, *,
                            in_place: bool = False, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``C = I_ft/(I_pre + I_ft)`` where ``I_pre < I_ft``, else 0; divided by the mean of its non-zero entries
    (if any); clipped at 1.

    ``in_place=True`` overwrites both inputs (the result lives in ``importance_ft``) and computes the mask in
    ``scratch`` when given: the training update's path, with no allocation per tensor.
    """
    if not in_place:
        importance_pre, importance_ft = importance_pre.clone(), importance_ft.clone()
    # 1.0 where I_pre < I_ft, else 0.0 (the sign of a float difference is exact: no tie is mis-classified).
    moves = torch.sub(importance_ft, importance_pre, out=scratch).sign_().clamp_(min=0.0)
    count = moves.sum()
    ratio = importance_ft.div_(importance_pre.add_(importance_ft))
    coefficients = ratio.mul_(moves).nan_to_num_(0.0)  # 0/0 where both importances are 0: no move
    scale = torch.where(count > 0, count / coefficients.sum(), 0.0)  # 1 / mean of the non-zero entries
    return coefficients.mul_(scale).clamp_(max=1.0)


def allocate(weight: torch.Tensor, pretrained: torch.Tensor, grad_sum: torch.Tensor) -> torch.Tensor:
    """The new value of one tensor: ``(1 − C)·W0 + C·W`` (a new tensor; see ``Spider`` for the in-place update)."""
    c = allocation_coefficients(importance(pretrained), importance(grad_sum), in_place=True)
    return torch.lerp(pretrained.float(), weight.float(), c).to(weight.dtype)


def allocate_(weight: torch.Tensor, pretrained: torch.Tensor, grad_sum: torch.Tensor,
              pretrained_scale_shift: Standardisation, buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """``allocate`` in place on ``weight``, computing in three fp32 ``buffers`` of the tensor's shape."""
    pre, ft, scratch = buffers
    importance(pretrained, scale_shift=pretrained_scale_shift, out=pre)
    importance(grad_sum, out=ft)
    c = allocation_coefficients(pre, ft, in_place=True, scratch=scratch)
    if weight.dtype == torch.float32:
        torch.lerp(pretrained, weight, c, out=weight)
    else:
        weight.copy_(torch.lerp(pretrained, weight.float(), c))


def shards_parameters(accelerator) -> bool:
    if accelerator is None:
        return False
    if str(getattr(accelerator, "distributed_type", "")).endswith("FSDP"):
        return True
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


@dataclass
class SpiderConfig(MethodConfig):
    """SPIDER has no coefficient to tune: the allocation is decided by the importance discrepancy."""


@register
class Spider(Method):
    name = "spider"
    description = "importance-discrepancy weight allocation against forgetting (Huang et al., ICML 2025)"
    config_class = SpiderConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.pretrained: dict[str, torch.Tensor] = {}
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.pretrained_scale_shift: dict[str, Standardisation] = {}  # derived from W0: recomputed on load

    def setup(self, ctx):
        lora = [n for n in ctx.trainable if "lora_" in n]
        if lora:
            raise ValueError("spider cannot run on LoRA adapters: a zero-initialised adapter has no pre-trained "
                             f"importance (e.g. {lora[0]}). Use full tuning of the scope (drop 'lora').")
        if shards_parameters(ctx.accelerator):
            raise ValueError("spider needs whole tensors (per-tensor mean/std), but FSDP / ZeRO-3 shards them; "
                             "use DDP or DeepSpeed ZeRO-2 (the papers' setting)")
        for name, param in ctx.trainable.items():
            self.pretrained[name] = param.detach().float().clone()
            self.grad_sum[name] = torch.zeros_like(self.pretrained[name])
        self.pretrained_scale_shift = {name: standardisation(w.abs()) for name, w in self.pretrained.items()}

    @torch.no_grad()
    def before_optimizer_step(self, ctx):
        for name, param in ctx.trainable.items():
            if param.grad is not None:
                self.grad_sum[name].add_(param.grad.float())

    @torch.no_grad()
    def after_optimizer_step(self, ctx):
        # Scratch for one tensor at a time, held only during the update (not through forward/backward);
        # one per device, for models spread over several.
        largest = max(w.numel() for w in self.pretrained.values())
        scratch: dict[torch.device, torch.Tensor] = {}
        for name, param in ctx.trainable.items():
            if param.device not in scratch:
                scratch[param.device] = torch.empty(3, largest, device=param.device)
            buffers = tuple(b[:param.numel()].view(param.shape) for b in scratch[param.device])
            allocate_(param, self.pretrained[name], self.grad_sum[name], self.pretrained_scale_shift[name], buffers)

    def state_dict(self):
        return {"pretrained": self.pretrained, "grad_sum": self.grad_sum}

    def load_state_dict(self, state):
        if state:
            self.pretrained = {k: v.clone() for k, v in state["pretrained"].items()}
            self.grad_sum = {k: v.clone() for k, v in state["grad_sum"].items()}
            self.pretrained_scale_shift = {name: standardisation(w.abs()) for name, w in self.pretrained.items()}
