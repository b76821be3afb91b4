"""One optimizer step, in one function: ``train_step``. Read it to know what happens between two updates.

1. the step's target-token count (``loss_reduction=token``: the loss divides by it, so accumulation and several
   processes give the exact token mean);
2. the gradient: ``step.backward()`` — cross-entropy + every method's named loss terms, one backward per
   micro-batch — or, for the one method that builds its own step (``Method.build_step``: per-task gradients, a
   second gradient at moved weights, loss balancing that revisits the batches), what that method does with ``Step``;
3. clip, check finiteness (a NaN stops the run before the update), ``before_optimizer_step``, the optimizer step,
   ``after_optimizer_step`` (``mmtune.engines.optimizer_step``: the same on one process, DDP, FSDP2 and DeepSpeed);
4. the learning-rate schedule and the step counter.

``Step`` is what a step-building method gets: the micro-batches, and the gradient building blocks (the plain
backward, per-task gradients as flat ``[T, P]`` vectors — or weighed by coefficients computed from their Gram matrix,
which works on shards too —, setting the gradient, moving the weights) so that a method writes only its rule (see ``mmtune.methods.multitask``, ``mmtune.methods.sam``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mmtune.data.collate import BLANK_IMAGE, IGNORE_INDEX
from mmtune.engine import (
    DTensor,
    engine_of,
    local_shard,
    local_slice,
    partition_span,
    partitioned,
    release_gathered,
    sharded,
)
from mmtune.engines import backward, optimizer_step
from mmtune.errors import NonFiniteError
from mmtune.losses import compute_losses
from mmtune.methods.base import Method, TrainContext
from mmtune.task_gradients import combine, gram_of


@dataclass
class Step:
    """One optimizer step's micro-batches, and the ways to turn them into the step's gradient."""

    ctx: TrainContext
    methods: list[Method]  # every method of the run: their loss terms count in each gradient below
    micro: list[dict]  # the step's micro-batches (``train.grad_accum`` of them)
    loss_reduction: str = "token"
    tokens: torch.Tensor | None = None  # target tokens per micro-batch (token reduction), over all processes
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # each loss term's step mean, detached (logged)
    task_totals: list[torch.Tensor] = field(default_factory=list)  # per micro-batch: per-task loss sums, counts [2, T]
    # Under DeepSpeed ZeRO-1/2, the gradient a method built (``set_gradient``: full fp32 tensors by name), handed to
    # the engine's step in place of the one in its buffers (``mmtune.engines.optimizer_step``).
    built: dict[str, torch.Tensor] | None = None
    _primed: bool = False  # under DeepSpeed: the engine holds this step's gradient buffers (``_prime_engine``)
    # What a method measured in this step beside its loss (GRPO's rewards, KL, answer lengths): per key the totals
    # ``[Σx, Σx², n]`` over the step's values, written to the log as the mean (and ``<key>/std``), never summed into
    # the loss. Every process must note the same keys (the log reduces them together).
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)

    def use_batches(self, micro: list[dict]) -> None:
        """The step's micro-batches replaced by ones a method built (GRPO's rollouts): the token count follows."""
        self.micro = micro
        if self.tokens is not None:
            self.tokens = step_tokens(self.ctx.accelerator, micro) / len(micro)

    def note(self, key: str, values: torch.Tensor) -> None:
        """Add ``values`` (any shape; none allowed) to the step's diagnostic ``key``."""
        values = values.detach().double().flatten()
        totals = torch.stack([values.sum(), (values ** 2).sum(), torch.tensor(float(values.numel()),
                                                                               dtype=torch.float64)]).cpu()
        self.diagnostics[key] = self.diagnostics.get(key, torch.zeros(3, dtype=torch.float64)) + totals

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.ctx.trainable.values())

    def _log(self, terms: dict[str, torch.Tensor]) -> None:
        accum = len(self.micro)
        for key, value in terms.items():
            self.terms[key] = self.terms.get(key, 0.0) + value.detach().double() / accum

    def backward(self, log: bool = True) -> None:
        """The plain step: cross-entropy + the methods' loss terms, one backward per micro-batch, gradients
        accumulated into ``param.grad`` (all-reduced across processes on the last micro-batch)."""
        accelerator, accum = self.ctx.accelerator, len(self.micro)
        for index, piece in enumerate(self.micro):
            last = index == accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.ctx.model):
                with accelerator.autocast():
                    terms, _ = compute_losses(self.ctx, self.methods, piece, self.loss_reduction, self.tokens,
                                              task_totals=self.task_totals if log else None)
                backward(accelerator, sum(terms.values()) / accum, last)
            if log:
                self._log(terms)

    def zero_grad(self) -> None:
        """Forget the gradient accumulated so far: ``param.grad``, or under ZeRO-3 the engine's partitioned buffers
        (the next backward then writes into them instead of adding)."""
        if self.partitioned:
            from deepspeed.utils import safe_set_local_grad

            engine_of(self.ctx.accelerator).optimizer.zero_grad()
            for param in self.params:
                safe_set_local_grad(param, torch.zeros_like(param.ds_tensor, dtype=torch.float32))
            return
        self._needs_gradients("zero the gradient")
        for param in self.params:
            param.grad = None

    def local_gradient(self) -> torch.Tensor:
        """The gradient the last ``backward`` left, flat in float32 and laid out as ``sharded_task_gradients`` lays
        them out: this process's slices on FSDP2 shards (``param.grad``'s local shards) and on ZeRO-3 partitions
        (the engine's reduced fp32 partitions, padding zeroed), else the whole ``param.grad``."""
        device, pieces = self.ctx.accelerator.device, []
        if self.partitioned:
            from deepspeed.utils import safe_get_local_grad

            for param in self.params:
                grad = safe_get_local_grad(param)
                piece = torch.zeros(param.ds_tensor.numel()) if grad is None else grad.detach().float().flatten().clone()
                piece[partition_span(param)[1]:] = 0.0
                pieces.append(piece.to(device))
        else:
            for param in self.params:
                pieces.append(local_shard(param.grad).detach().float().flatten().to(device) if param.grad is not None
                              else torch.zeros(local_slice(param).numel(), device=device))
        return torch.cat(pieces)

    def task_gradients(self, only: str | None = None, log: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient of each task's *share* of the step's loss (the shares sum to the cross-entropy), one backward
        per task on one forward per micro-batch, all-reduced across processes by hand, as ``[T, P]`` flat vectors
        (rows in ``ctx.tasks`` order), and the gradient of the methods' other loss terms ``[P]``. ``only``: that
        task's share alone (no other terms)."""
        ctx, accelerator, accum = self._graph_ctx, self.ctx.accelerator, len(self.micro)
        size = sum(p.numel() for p in self.params)
        task_grads = torch.zeros(len(ctx.tasks), size, device=accelerator.device)
        extra_grad = torch.zeros(size, device=accelerator.device)
        for index, piece in enumerate(self.micro):
            with accelerator.no_sync(ctx.model), accelerator.autocast():  # DDP's own all-reduce is not used here
                shares: dict[str, torch.Tensor] = {}
                terms, _ = compute_losses(ctx, self.methods, piece, self.loss_reduction, self.tokens, shares,
                                          self.task_totals if log else None)
            if only is not None:
                shares = {only: shares[only]} if only in shares else {}
            extra = [v for k, v in terms.items() if k != "ce" and v.requires_grad] if only is None else []
            primes = self._primes(index)
            for number, (task, share) in enumerate(shares.items()):
                last = number == len(shares) - 1 and not extra and not primes
                task_grads[ctx.tasks.index(task)] += self._flat(share / accum, retain=not last)
            if extra:
                extra_grad += self._flat(sum(extra) / accum, retain=primes)
            if primes:
                self._prime_engine(terms)
            if log:
                self._log(terms)
        if accelerator.num_processes > 1:
            task_grads = accelerator.reduce(task_grads, "mean")
            extra_grad = accelerator.reduce(extra_grad, "mean")
        return task_grads, extra_grad

    def gradient(self, log: bool = True) -> torch.Tensor:
        """The step's whole gradient — cross-entropy and every method's terms — as one flat vector ``[P]`` laid out as
        ``task_gradients``'s, by autograd (one backward per micro-batch), all-reduced across processes by hand: what
        a step built under DeepSpeed reads instead of ``param.grad`` (SAM's)."""
        ctx, accelerator, accum = self._graph_ctx, self.ctx.accelerator, len(self.micro)
        total = torch.zeros(sum(p.numel() for p in self.params), device=accelerator.device)
        for index, piece in enumerate(self.micro):
            with accelerator.no_sync(ctx.model), accelerator.autocast():
                terms, _ = compute_losses(ctx, self.methods, piece, self.loss_reduction, self.tokens,
                                          task_totals=self.task_totals if log else None)
            primes = self._primes(index)
            total += self._flat(sum(terms.values()) / accum, retain=primes)
            if primes:
                self._prime_engine(terms)
            if log:
                self._log(terms)
        return accelerator.reduce(total, "mean") if accelerator.num_processes > 1 else total

    @property
    def _graph_ctx(self) -> TrainContext:
        """The context the autograd blocks run the forward with: under DeepSpeed (ZeRO-1/2) on the model itself,
        outside the engine, so that autograd's gradients stay out of the engine's backward bookkeeping."""
        return dataclasses.replace(self.ctx, model=self.ctx.unwrapped) if self.deepspeed else self.ctx

    def _flat(self, loss: torch.Tensor, retain: bool) -> torch.Tensor:
        params = self.params
        grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                          for g, p in zip(grads, params, strict=True)])

    def _primes(self, index: int) -> bool:
        """Whether micro-batch ``index``'s graph gives the engine its buffers: under DeepSpeed, the last micro-batch
        of the step's first autograd pass."""
        return self.deepspeed and not self._primed and index == len(self.micro) - 1

    def _prime_engine(self, terms: dict[str, torch.Tensor]) -> None:
        """One zero backward through DeepSpeed's engine (at the accumulation boundary): the engine then holds the
        gradient buffers the built gradient is written into (``set_gradient``, ``engines.deepspeed_step``)."""
        backward(self.ctx.accelerator, terms["ce"] * 0.0, last=True)
        self._primed = True

    def sharded_task_gradients(self, only: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``task_gradients`` on parameters sharded over processes (FSDP2's shards, DeepSpeed ZeRO-3's partitions):
        this process's slice of each task's gradient ``[T, P_local]`` and of the other terms' ``[P_local]`` (``only``:
        that task's alone, the others and the other terms left zero). Autograd reaches shards only through the
        engine's own backward (weights gathered for the forward, gradients reduce-scattered into this process's
        slices), so each task's share gets a forward and backward of its own per micro-batch — on every process, with
        a zero loss where a process has none of that task (the collectives need every process) — and the methods'
        terms one more, where their hooks run once per micro-batch as in ``backward``. Cost: T + 1 forwards per
        micro-batch instead of 1; memory: T slices of 1/N of the trainable parameters (N processes)."""
        ctx, accelerator, accum, params = self.ctx, self.ctx.accelerator, len(self.micro), self.params
        task_grads = torch.zeros(len(ctx.tasks), sum(local_slice(p).numel() for p in params),
                                 device=accelerator.device)
        for row, task in enumerate(ctx.tasks):
            if only is not None and task != only:
                continue
            self.zero_grad()
            for piece in self.micro:
                shares: dict[str, torch.Tensor] = {}
                with accelerator.autocast():
                    terms, _ = compute_losses(ctx, [], piece, self.loss_reduction, self.tokens, shares)
                backward(accelerator, (shares[task] if task in shares else terms["ce"] * 0.0) / accum, True)
            task_grads[row] = self.local_gradient()
        if only is not None:
            return task_grads, torch.zeros_like(task_grads[0])
        self.zero_grad()
        for piece in self.micro:
            with accelerator.autocast():
                terms, _ = compute_losses(ctx, self.methods, piece, self.loss_reduction, self.tokens,
                                          task_totals=self.task_totals)
            extra = [v for k, v in terms.items() if k != "ce" and v.requires_grad]
            backward(accelerator, (sum(extra) if extra else terms["ce"] * 0.0) / accum, True)
            self._log(terms)
        return task_grads, self.local_gradient()

    @property
    def deepspeed(self) -> bool:
        """Whether DeepSpeed drives the step: its gradients live in the engine's buffers, so a built gradient is handed
        to the engine's step (``set_gradient``) rather than written into ``param.grad``."""
        return self.ctx.engine.deepspeed

    @property
    def sharded(self) -> bool:
        """Whether the trainable parameters are FSDP2 shards (DTensors): gradients are then this process's slices."""
        return sharded(self.ctx.trainable)

    @property
    def partitioned(self) -> bool:
        """Whether the trainable parameters are DeepSpeed ZeRO-3 partitions: the gradient lives in the engine's
        partitioned buffers, the weights in each process's partition."""
        return partitioned(self.ctx.trainable)

    @property
    def sliced(self) -> bool:
        """Whether each process holds a slice of every trainable tensor (FSDP2 shards, ZeRO-3 partitions): gradients
        and moves are then this process's slices, and their dot products are all-reduced."""
        return self.sharded or self.partitioned

    def local_task_gradients(self, only: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``task_gradients`` (logged unless ``only``), on shards or partitions ``sharded_task_gradients``: whole
        vectors, or this process's slices of them."""
        if self.sliced:
            return self.sharded_task_gradients(only)
        return self.task_gradients(only=only, log=only is None)

    def gram(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[v_i·v_j]`` of ``vectors`` ``[T, P]`` in float64 — over the whole vectors on shards and partitions too
        (each process's slices' Gram matrix, all-reduced)."""
        gram = gram_of(vectors)
        if self.sliced and self.ctx.accelerator.num_processes > 1:
            gram = self.ctx.accelerator.reduce(gram, "sum")
        return gram

    @contextlib.contextmanager
    def moved_by(self, offset: torch.Tensor):
        """The weights at ``W + offset`` inside (a flat offset laid out as the gradients; on shards this process's
        slices), then back to the very same ``W`` (copied back, not ``W + ε − ε``, which rounds)."""
        params = self.params
        original = [local_slice(p).detach().clone() for p in params]
        self.move(offset)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(params, original, strict=True):
                    local_slice(param).copy_(value)
            if self.partitioned:
                release_gathered(self.ctx.accelerator)

    def weigh_task_gradients(self, weights: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``param.grad`` = ``Σ_i c_i·g_i`` over the tasks present in the step + the other loss terms' gradient, with
        the coefficients ``c = weights(G)`` computed from the tasks' Gram matrix ``G = [g_i·g_j]`` alone (PCGrad,
        CAGrad): on shards each process weighs its slice of the gradients after one all-reduce of ``G``."""
        task_grads, extra_grad = self.local_task_gradients()
        gram = self.gram(task_grads)
        present = (gram.diagonal() > 0).nonzero().flatten().tolist()
        combined = extra_grad
        if present:
            combined = combined + combine(task_grads[present], weights(gram[present][:, present]))
        self.set_gradient(combined)

    def combine_task_gradients(self, combine: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                               perturbation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``param.grad`` = ``combine`` of the gradients of the tasks present in the step (on any process) + the other
        loss terms' gradient. With ``perturbation`` (task-based SAM), each task's gradient is also taken again at the
        weights moved by ``perturbation(g_i)`` — every process runs the same forwards — and handed over second.
        Whole vectors only: on shards, write the rule on the Gram matrix (``weigh_task_gradients``, ``gram``)."""
        if self.sliced:
            raise RuntimeError("combine_task_gradients combines whole gradient vectors, which FSDP2's shards and "
                               "ZeRO-3's partitions don't hold; write the rule on their Gram matrix "
                               "(Step.weigh_task_gradients, Step.gram)")
        task_grads, extra_grad = self.task_gradients(log=True)
        present = (task_grads.abs().sum(1) > 0).nonzero().flatten().tolist()
        if not present:
            combined = torch.zeros_like(extra_grad)
        elif perturbation is None:
            combined = combine(task_grads[present], None)
        else:
            moved = torch.zeros_like(task_grads)
            for index in present:
                with self.moved_by(perturbation(task_grads[index])):
                    moved[index] = self.task_gradients(only=self.ctx.tasks[index])[0][index]
            combined = combine(task_grads[present], moved[present])
        self.set_gradient(combined + extra_grad)

    def set_gradient(self, flat: torch.Tensor) -> None:
        """``param.grad`` from one flat vector laid out as ``task_gradients`` lays them out (on shards: this process's
        slices, as ``sharded_task_gradients`` lays them out). Under DeepSpeed ZeRO-1/2, for the engine's step
(``Step.built``, an argument of ``optimizer_step``), which clips it and writes it into the engine's buffers; under ZeRO-3 (this
        process's slices) straight into the engine's partitioned buffers, where its step reads the gradient."""
        if self.partitioned:
            from deepspeed.utils import safe_set_local_grad

            for param, grad in self._per_param(flat):
                safe_set_local_grad(param, grad.float())
            return
        if self.deepspeed:  # whole tensors (ZeRO-1/2 leave the weights whole): local_slice is the parameter
            self.built = {name: grad.view(param.shape).float() for name, (param, grad) in zip(
                self.ctx.trainable, self._per_param(flat), strict=True)}
            return
        for param, grad in self._per_param(flat):
            if isinstance(param, DTensor):
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                local_shard(param.grad).copy_(grad.view_as(local_shard(param.grad)))
            else:
                param.grad = grad.view_as(param).to(param.dtype)

    @torch.no_grad()
    def move(self, offset: torch.Tensor) -> None:
        """``params += offset`` for a flat ``offset`` laid out as ``task_gradients`` lays gradients out (on shards and
        ZeRO-3 partitions: this process's slices; ZeRO-3 then gathers the moved weights at the next forward)."""
        for param, piece in self._per_param(offset):
            weight = local_slice(param)
            weight.add_(piece.view_as(weight).to(weight.dtype))
        if self.partitioned:
            release_gathered(self.ctx.accelerator)

    def _per_param(self, flat: torch.Tensor) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """Each trainable parameter with its piece of ``flat`` (laid out as ``local_gradient``: this process's slices)."""
        params = self.params
        return list(zip(params, torch.split(flat, [local_slice(p).numel() for p in params]), strict=True))

    def _needs_gradients(self, what: str) -> None:
        if self.ctx.engine.deepspeed:  # refused up front (Method.sets_gradients); this is the backstop
            raise RuntimeError(f"can't {what} under DeepSpeed: its engine keeps the gradients in its own buffers")


def vision_tower_everywhere(ctx: TrainContext, micro: list[dict]) -> None:
    """On sharded weights (FSDP2, ZeRO-3) with several processes every module's forward gathers its weights from all
    of them, so the vision tower must run on every process's micro-batch or on none: a micro-batch of text-only records
    beside one with images would leave the other processes waiting for its gathers forever. Such a micro-batch gets a
    blank image for its forwards to run the vision tower on (``BLANK_IMAGE``: ``mmtune.losses.vision_tower_on``,
    0 × its output added) — or, where the host has no collator to make one, the run stops with the reason on every
    process at once. One all-reduce of a flag per micro-batch."""
    engine = ctx.engine
    if not engine.shards_parameters or engine.processes <= 1:
        return
    pictured = torch.tensor([float("pixel_values" in batch) for batch in micro], device=ctx.accelerator.device)
    counts = ctx.accelerator.reduce(pictured, "sum").tolist()
    blank = getattr(ctx.collator, "blank_image_inputs", None)  # the same host, so the same answer, everywhere
    for index, (count, batch) in enumerate(zip(counts, micro, strict=True)):
        if not 0 < count < engine.processes:
            continue
        if blank is None:  # every process stops here, those with images too
            tasks = sorted(set(batch.get("tasks") or []))
            mine = "has images" if "pixel_values" in batch else "holds only text-only records"
            raise ValueError(f"step {ctx.step + 1}, micro-batch {index + 1}: on {engine} the vision tower must run "
                             f"on every process or on none, and this process's micro-batch {mine} (tasks: "
                             f"{', '.join(tasks) or '?'}) while {int(count)} of {engine.processes} have images; with "
                             "no collator to make a blank image for the others, run such records on DDP or ZeRO-1/2")
        if "pixel_values" not in batch:
            batch[BLANK_IMAGE] = {k: v.to(ctx.accelerator.device) for k, v in blank().items()}


def step_tokens(accelerator, micro: list[dict]) -> torch.Tensor:
    """Target tokens of one optimizer step, per process on average (all processes' micro-batches counted): the
    token-mean loss divides by it, so accumulation and DDP's gradient averaging give the exact token mean. A tensor
    on the device: counting does not wait for it."""
    count = torch.stack([(b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro]).sum().float()
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, "sum") / accelerator.num_processes
    return count.clamp(min=1.0)


def check_finite(step: int, terms: dict[str, float], grad_norm: float, scaled: bool = False) -> None:
    """Stop before the optimizer step when a loss term or the gradient is NaN / inf (all processes agree:
    a non-finite loss anywhere makes the all-reduced gradient norm non-finite everywhere). With fp16 loss
    scaling (``scaled``) an overflowing gradient is expected now and then: the scaler skips that step and
    lowers the scale, so only the loss is checked."""
    bad = [f"{k}={v}" for k, v in terms.items() if not math.isfinite(v)]
    if bad or not (scaled or math.isfinite(grad_norm)):
        what = f"loss term {', '.join(bad)}" if bad else f"gradient norm {grad_norm}"
        raise NonFiniteError(f"step {step}: {what} is not finite. The run stops before the optimizer step; "
                             "nothing after the last checkpoint is saved. Lower the learning rate or the method's "
                             "coefficients, or check the data.")


def step_builder(methods: list[Method]) -> Method | None:
    """The run's method that builds its own step (at most one: ``check_method_combination``), if any."""
    return next((m for m in methods if m.builds_step), None)


@dataclass
class StepResult:
    """What one optimizer step returns: each loss term's step mean, the gradient norm before clipping, and the step's
    per-task loss sums and counts ``[2, T]`` (None without per-task totals). Unpacks as ``terms, grad_norm``."""

    terms: dict[str, float]
    grad_norm: float
    task_losses: torch.Tensor | None = None
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)  # ``Step.diagnostics``: key → [Σx, Σx², n]

    def __iter__(self):  # ``terms, grad_norm = train_step(...)``, as before StepResult
        return iter((self.terms, self.grad_norm))


def train_step(ctx: TrainContext, methods: list[Method], micro: list[dict], optimizer, scheduler,
               train) -> StepResult:
    """One optimizer step over ``micro`` (``train``: the run's ``train`` config section); returns each loss term's
    step mean (one host sync for all of them), the gradient norm before clipping and the per-task losses."""
    accelerator = ctx.accelerator
    vision_tower_everywhere(ctx, micro)
    tokens = step_tokens(accelerator, micro) / len(micro) if train.loss_reduction == "token" else None
    step = Step(ctx, methods, micro, train.loss_reduction, tokens)
    builder = step_builder(methods)
    if builder is None:
        step.backward()
    else:
        builder.build_step(step)
    terms: dict[str, float] = {}

    def check(grad_norm: torch.Tensor, more_terms: dict[str, torch.Tensor] | None = None) -> float:
        """The step's one wait for the device: its loss terms (with ``more_terms``: penalties the engine added to the
        gradient itself, ZeRO-3's weight penalties) and gradient norm as numbers, checked finite."""
        step.terms.update({k: v.double() for k, v in (more_terms or {}).items()})
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        numbers = torch.stack([*step.terms.values(), grad_norm.detach().to(torch.float64)]).tolist()
        terms.update(zip(step.terms, numbers[:-1], strict=True))
        check_finite(ctx.step + 1, terms, numbers[-1], scaled=accelerator.mixed_precision == "fp16")
        return numbers[-1]

    grad_norm = optimizer_step(ctx, methods, optimizer, train.max_grad_norm, check, built=step.built)
    with warnings.catch_warnings():  # under DeepSpeed the step is the engine's, which torch can't see
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
        scheduler.step()
    ctx.step += 1
    return StepResult(terms, grad_norm, torch.stack(step.task_totals).sum(0) if step.task_totals else None,
                      step.diagnostics)
