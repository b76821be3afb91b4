"""How the training loop reaches gradients and weights on each engine, so methods are written once.

One process, DDP, FSDP2: ``accelerator.backward`` leaves the (all-reduced) gradient in ``param.grad``,
``optimizer.step()`` moves the parameters, and a hook reads and writes the parameters directly.

DeepSpeed ZeRO is different, and Accelerate's wrapper hides it: ``accelerator.backward`` runs the whole optimizer
step; gradients are reduced into partitioned buffers (``param.grad`` is None); the optimizer updates fp32 *master*
partitions and copies them into the model's weights after every step, so a value a method writes into a parameter is
overwritten one step later. So under DeepSpeed mmtune drives the engine itself:

1. ``engine.backward`` per micro-batch, with the accumulation boundary set by the loop (the loss is already divided
   by ``train.grad_accum``, so DeepSpeed does not divide it again);
2. at the boundary, each trainable tensor's full fp32 gradient and full fp32 master weight are assembled with
   DeepSpeed's public accessors (``deepspeed.utils.safe_get_full_grad`` / ``safe_get_full_fp32_param``);
3. the loop clips that gradient (``train.max_grad_norm``; DeepSpeed's own clipping is switched off so it is not
   applied twice), checks it is finite, and runs the methods' ``before_optimizer_step`` with ``ctx.trainable``
   holding these full fp32 tensors (gradient in ``.grad``);
4. the clipped gradient goes back into DeepSpeed's partitions (``safe_set_full_grad``) and ``engine.step()`` runs;
5. ``after_optimizer_step`` runs on the new masters the same way; what a method writes goes into DeepSpeed's masters
   (``safe_set_full_fp32_param``) and into the model's weights.

Cost: step 2 all-reduces the trainable gradients once per step (on top of DeepSpeed's reduce-scatter), and the
masters when a method has a step hook. Supported here: ZeRO stages 1, 2 and 3, in fp32 and in bf16 (tested against
one process / DDP in the same precision). In bf16 DeepSpeed's bf16 optimizer keeps the fp32 masters and the model's
weights are their bf16 copies; the hooks see the masters. ZeRO-3 also partitions the model's weights (a parameter
holds an empty tensor outside DeepSpeed's gather): there every hook — ``setup`` and ``on_train_end`` included — sees
the full fp32 masters, and what a method writes goes into the masters and into this process's partition of the
weights. A method whose loss term reads the trainable weights in the forward pass (L1/L2, EWC, LoRASculpt's CMR)
would read the empty tensors there (ASFT's forward at W0 goes through DeepSpeed's gather: ``partitioned_base_logits``). A term of the trainable weights alone (L1/L2's and EWC's
distance to W0, LoRASculpt's CMR: ``Method.weight_penalty``) is taken out of the forward pass under ZeRO-3: step 3 adds its gradient on the full fp32
masters once per optimizer step, before clipping — what the loss term's backward adds on the other engines (it is
the same every micro-batch and process) — and logs its value. Steps built from per-task gradients or moved weights
(PCGrad, CAGrad, SAM, task-SAM) work on each process's slices of the engine's partitioned gradients and weights
(``mmtune.step.Step``). A method whose loss term reads the weights otherwise, or that declares a
``partitioned_refusal``, refuses ZeRO-3 (``zero3_refusal``; no built-in method does). fp16
(loss scaling inside the engine) is refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mmtune.engine import (  # noqa: F401 — write_weight, partition_span: also public here, as before
    Engine,
    engine_of,
    is_deepspeed,
    partition_span,
    partitioned,
    release_gathered,
    write_weight,
)
from mmtune.methods.base import Method, TrainContext, refusal


def configure_deepspeed(accelerator, config, methods: list[Method] | None = None) -> None:
    """Check a DeepSpeed launch against what is tested, and set the engine's config so that it agrees with the run's
    (call before ``accelerator.prepare``). Refuses, naming the setting, anything that would silently differ."""
    if not is_deepspeed(accelerator):
        return
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    stage = plugin.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed ZeRO-{stage}: mmtune takes ZeRO stages 1, 2 and 3")
    refused = refusal(methods or [], Engine.of(accelerator))  # the one compatibility rule (mmtune.methods.base)
    if refused:
        raise ValueError(refused)
    if stage == 3:
        # final/ is one Hugging Face folder: the weights are gathered to save it (Accelerate's default is false)
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    precision = str(accelerator.mixed_precision)
    if precision == "fp16" or ds.get("fp16", {}).get("enabled") is True:
        raise ValueError("DeepSpeed with fp16: mmtune is tested under DeepSpeed in fp32 and bf16 (fp16's loss scaling "
                         "inside the engine is not); use bf16")
    if ds.get("optimizer") or ds.get("scheduler"):
        raise ValueError("the DeepSpeed config names an optimizer or scheduler: mmtune builds its own "
                         "(train.optimizer, train.scheduler); remove them from the DeepSpeed config")
    given = ds.get("gradient_accumulation_steps", "auto")
    if given not in ("auto", config.train.grad_accum, 1):
        raise ValueError(f"DeepSpeed config gradient_accumulation_steps={given} but train.grad_accum="
                         f"{config.train.grad_accum}: set one of them (the DeepSpeed value to 'auto')")
    ds["gradient_accumulation_steps"] = config.train.grad_accum
    given = ds.get("gradient_clipping", "auto")
    wanted = config.train.max_grad_norm or 0.0
    if given not in ("auto", None, 0, 0.0) and float(given) != float(wanted):
        raise ValueError(f"DeepSpeed config gradient_clipping={given} but train.max_grad_norm={wanted}: mmtune clips "
                         "(before the methods see the gradient); set the DeepSpeed value to 'auto'")
    ds["gradient_clipping"] = 0.0  # mmtune clips (step 3 above); DeepSpeed must not clip a second time


def skip_cpu_inference_kernels() -> None:
    """DeepSpeed on CPU compiles a shared-memory all-reduce with the machine's C++ compiler when its process group
    starts — 1–2 minutes at the first launch from each environment — which only its inference engine calls
    (``inference_all_reduce``); training's collectives go through torch.distributed. Marked unavailable, it is not
    built. (Where a DeepSpeed release stops reading the mark, it is built as before: nothing else changes.)"""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):  # no DeepSpeed, or one that keeps no such table
        pass


def zero3_refusal(methods: list[Method]) -> str | None:
    """Why ZeRO-3 can't run ``methods``: ``refusal(methods, Engine("zero3"))``, the one rule (kept for callers of 0.x)."""
    return refusal(methods, Engine("zero3"))


def backward(accelerator, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch (``last``: the optimizer step's final one). Under DeepSpeed this does not step."""
    if is_deepspeed(accelerator):
        engine = engine_of(accelerator)
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


@contextlib.contextmanager
def _full_tensors(ctx: TrainContext, with_masters: bool, with_grads: bool,
                  built: dict[str, torch.Tensor] | None = None) -> Iterator[dict[str, nn.Parameter]]:
    """``ctx.trainable`` swapped for full fp32 tensors holding DeepSpeed's master weights (when ``with_masters``;
    else the model's weights), with the full gradient in ``.grad`` when ``with_grads`` (DeepSpeed frees it at the step;
    ``built``: a step's gradient a method built itself, ``Step.set_gradient``, in its place); restored on exit."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    params = ctx.trainable
    full: dict[str, nn.Parameter] = {}
    for name, param in params.items():
        weight = safe_get_full_fp32_param(param) if with_masters else None
        weight = param.detach() if weight is None else weight  # ZeRO-0 keeps no separate master
        view = nn.Parameter(weight.detach().float(), requires_grad=True)
        grad = (built[name] if built is not None else safe_get_full_grad(param)) if with_grads else None
        view.grad = None if grad is None else grad.detach().float().clone()
        full[name] = view
    ctx.trainable = full
    try:
        yield full
    finally:
        ctx.trainable = params


def _write_back_masters(params: dict[str, nn.Parameter], full: dict[str, nn.Parameter]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in params.items():
        safe_set_full_fp32_param(param, full[name].detach())
        write_weight(param, full[name].detach())


def _low_precision(params: dict[str, nn.Parameter]) -> bool:
    """Whether the model's trainable weights are not DeepSpeed's fp32 masters themselves: a low-precision copy (bf16
    runs), or ZeRO-3's partitions (a parameter's own tensor is empty outside DeepSpeed's gather)."""
    return partitioned(params) or any(p.dtype != torch.float32 for p in params.values())


@contextlib.contextmanager
def on_masters(ctx: TrainContext, write_back: bool) -> Iterator[None]:
    """Run what is inside (the methods' ``setup``, ``on_train_end``) on the fp32 masters: under DeepSpeed with
    low-precision or partitioned (ZeRO-3) weights ``ctx.trainable`` holds DeepSpeed's full fp32 masters there
    (written back into the masters and the weights on exit when ``write_back``), so W0 snapshots and post-training surgery (DARE's 1/(1 − p)
    rescaling of W − W0) never see bf16 rounding. Elsewhere ``ctx.trainable`` already is the masters."""
    params = ctx.trainable
    if not is_deepspeed(ctx.accelerator) or not _low_precision(params):
        yield
        return
    with _full_tensors(ctx, with_masters=True, with_grads=False) as full:
        yield
        if write_back:
            with torch.no_grad():
                _write_back_masters(params, full)


def add_weight_penalties(ctx: TrainContext, methods: list[Method]) -> dict[str, torch.Tensor]:
    """Add the gradient of each method's ``weight_penalty`` (at ``ctx.trainable``: full fp32 masters with their full
    gradient in ``.grad``) to ``.grad``; returns the penalties' values by method name (for the step's log)."""
    penalties = {m.weight_penalty_term: value for m in methods if (value := m.weight_penalty(ctx)) is not None}
    if penalties:
        params = list(ctx.trainable.values())
        grads = torch.autograd.grad(sum(penalties.values()), params, allow_unused=True)
        for param, grad in zip(params, grads, strict=True):
            if grad is not None:
                param.grad = grad.detach() if param.grad is None else param.grad + grad.detach()
    return {name: value.detach() for name, value in penalties.items()}


def deepspeed_step(ctx: TrainContext, methods: list[Method], max_grad_norm: float,
                   check: Callable[..., float], built: dict[str, torch.Tensor] | None = None) -> float:
    """One optimizer step under DeepSpeed ZeRO-1/2/3 (see the module docstring); returns the gradient norm."""
    from deepspeed.utils import safe_set_full_grad

    engine = engine_of(ctx.accelerator)
    params = ctx.trainable
    # Before the step, fp32 model weights are the masters (DeepSpeed copied them in after the last step); bf16 ones
    # are their rounding and ZeRO-3's are partitions, so the hooks are given DeepSpeed's full fp32 masters instead.
    with _full_tensors(ctx, with_masters=_low_precision(params), with_grads=True, built=built) as full:
        penalties = add_weight_penalties(ctx, methods) if partitioned(params) else {}
        grads = [p for p in full.values() if p.grad is not None]
        grad_norm = check(torch.nn.utils.clip_grad_norm_(grads, max_grad_norm), penalties)
        for method in methods:
            method.before_optimizer_step(ctx)
        for name, param in params.items():
            if full[name].grad is not None:
                safe_set_full_grad(param, full[name].grad)
    engine.step()
    if any(m.overrides("after_optimizer_step") for m in methods):
        with _full_tensors(ctx, with_masters=True, with_grads=False) as full:
            for method in methods:
                method.after_optimizer_step(ctx)
            with torch.no_grad():
                _write_back_masters(params, full)
    return grad_norm


def optimizer_step(ctx: TrainContext, methods: list[Method], optimizer, max_grad_norm: float | None,
                   check: Callable[[torch.Tensor], float], built: dict[str, torch.Tensor] | None = None) -> float:
    """Clip, check (``check(grad_norm)`` raises to stop before the step, else returns the norm as a number: the one
    place the step waits for the device), run the methods' step hooks around the
    optimizer step, zero the gradients; returns the gradient norm (measured before clipping)."""
    limit = max_grad_norm or math.inf  # without clipping, an infinite threshold still measures the norm
    if is_deepspeed(ctx.accelerator):
        return deepspeed_step(ctx, methods, limit, check, built)
    grad_norm = check(ctx.accelerator.clip_grad_norm_(list(ctx.trainable.values()), limit))
    for method in methods:
        method.before_optimizer_step(ctx)
    optimizer.step()
    for method in methods:
        method.after_optimizer_step(ctx)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
