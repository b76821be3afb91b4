"""Mixed precision with fp32 master weights: what trains is held and updated in fp32, the rest stays as loaded.

Why: with ``model.dtype: bf16`` every parameter is bf16, and an optimizer that updates a bf16 tensor in place loses
every update smaller than half a bf16 step (1/256 of the weight): at the papers' learning rates most of the
projector's updates and all of a LayerNorm's vanish. DeepSpeed's bf16 optimizer and the Hugging Face Trainer (an
fp32 model under autocast) keep fp32 *masters* of what trains; so does mmtune:

- frozen weights stay in ``model.dtype`` (the vision tower and most of the LLM: no extra memory there);
- trainable parameters are upcast to fp32 once, before the optimizer is built, so the optimizer, the gradients and
  every method's state (SPIDER's W0 and G, masks, L2's anchor) follow them in fp32 — 2 extra bytes per trainable
  parameter for the masters, and gradients in fp32 (4 bytes instead of 2);
- the forward and backward run under autocast in ``model.dtype`` (matrix products in bf16), whether or not
  ``train.mixed_precision`` says so: fp32 masters beside bf16 weights need it;
- checkpoints hold the masters (a resume is exact); ``final/`` and ``best/`` are saved in ``model.dtype``, the
  precision the base came in (same size on disk, what other tools expect).

``train.fp32_masters: false`` keeps the old behaviour (everything in ``model.dtype``, updated in place).
Under FSDP2 Accelerate upcasts trainable parameters the same way; under DeepSpeed the engine keeps its own masters.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtune.models.load import DTYPES

LOW_PRECISION = {name: dtype for name, dtype in DTYPES.items() if dtype != torch.float32}


def low_precision_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a low-precision ``model.dtype`` (None for fp32)."""
    return LOW_PRECISION.get(name)


def uses_masters(model_dtype: str, fp32_masters: bool) -> bool:
    return fp32_masters and model_dtype in LOW_PRECISION


def compute_precision(model_dtype: str, mixed_precision: str, fp32_masters: bool) -> str:
    """Accelerate's ``mixed_precision`` for the run: the configured one, or ``model.dtype`` when masters need
    autocast and none was configured."""
    if mixed_precision == "no" and uses_masters(model_dtype, fp32_masters):
        return model_dtype
    return mixed_precision


def keep_fp32_masters(model: nn.Module) -> int:
    """Upcast every trainable low-precision floating-point parameter to fp32 in place (frozen ones are left as they
    are). Returns the bytes this adds."""
    added = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            added += param.numel() * (4 - param.element_size())
            param.data = param.data.float()
    return added


def to_saved_dtype(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A state dict with its floating-point tensors cast to ``dtype`` (None: unchanged) — how ``final/`` is saved."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def describe(model_dtype: str, fp32_masters: bool, mixed_precision: str) -> dict[str, str]:
    """The run's precision, as ``train_summary.json`` records it."""
    masters = uses_masters(model_dtype, fp32_masters)
    return {"weights": model_dtype, "masters": "fp32" if masters else model_dtype,
            "compute": compute_precision(model_dtype, mixed_precision, fp32_masters), "saved": model_dtype}


def saved_dtype(model_dtype: str, fp32_masters: bool) -> torch.dtype | None:
    """What ``final/`` and ``best/`` are saved in when the run trained fp32 masters: ``model.dtype``."""
    return low_precision_dtype(model_dtype) if fp32_masters else None
