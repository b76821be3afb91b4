"""Per-sample token statistics shared by the training loop and the methods."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch

from mmtune.config import LOSS_REDUCTIONS
from mmtune.data.collate import BLANK_IMAGE, IGNORE_INDEX, KEEP, model_inputs, target_positions
from mmtune.data.padding_free import PADDING_FREE, pack, rope_index_of, unpack
from mmtune.engine import innermost


def forward(model, batch: dict, call=None):
    """The model's outputs on a collated batch, logits in the batch's padded layout — with ``data.padding_free``, from
    one forward over the rows concatenated without padding (``mmtune.data.padding_free``). ``call``: what runs the
    model's forward on its inputs where it is not ``model(**inputs)`` (a functional call with other weights)."""
    call = call or model
    inputs = model_inputs(batch)
    blank = batch.get(BLANK_IMAGE)
    with vision_tower_on(model, blank) if blank is not None else contextlib.nullcontext():
        if not batch.get(PADDING_FREE):
            return call(**inputs)
        packed, packing = pack(inputs, batch["labels"], rope_index_of(model))
        outputs = call(**packed)
    outputs.logits = unpack(outputs.logits, packing)
    return outputs


@contextlib.contextmanager
def vision_tower_on(model, image_inputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """A forward (of a text-only batch) that runs the vision tower and projector on ``image_inputs`` (a blank image)
    right after the token embeddings — where a batch with images runs them — and adds 0 × their output to the
    embeddings: on sharded weights every process then gathers the same modules in the same order, and the projector
    gets its (zero) gradient as on a process with images. The batch's own numbers are unchanged."""
    inner = innermost(model)
    accepted = inspect.signature(inner.get_image_features).parameters
    kwargs = {k: v for k, v in image_inputs.items() if k in accepted}

    def tie(module, args, output):
        features = inner.get_image_features(**kwargs, return_dict=True).pooler_output
        features = features if isinstance(features, list | tuple) else [features]
        return output + sum(f.sum() for f in features).to(output.dtype) * 0.0

    handle = inner.get_input_embeddings().register_forward_hook(tie)
    try:
        yield
    finally:
        handle.remove()


def shifted(logits: torch.Tensor, labels: torch.Tensor,
            kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, labels, mask)`` lined up for the causal shift (logits at t predict labels at t+1). ``logits`` cover
    the whole sequence, or only the positions ``kept`` (``batch["logits_to_keep"]``: ``train.target_logits``; where
    not given, the positions of these labels' targets) — the targets come out in the same order either way."""
    shift_labels = labels[:, 1:]
    if logits.shape[1] == labels.shape[1]:
        return logits[:, :-1], shift_labels, shift_labels != IGNORE_INDEX
    kept = target_positions(labels) if kept is None else kept.to(labels.device)
    if kept.numel() != logits.shape[1]:
        raise ValueError(f"logits at {logits.shape[1]} positions for labels of length {labels.shape[1]} and "
                         f"{kept.numel()} kept positions: pass the batch's logits_to_keep")
    shift_labels = shift_labels[:, kept]
    return logits, shift_labels, shift_labels != IGNORE_INDEX


def target_log_probs(logits: torch.Tensor, labels: torch.Tensor,
                     kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the target tokens (causal shift: logits at t predict labels at t+1).

    Returns ``(log_probs [N], sample_index [N])`` for the N non-ignored target tokens of the batch; the
    softmax runs over those positions only, never over the whole ``[B, L, V]`` tensor. ``kept``: see ``shifted``.
    """
    shift_logits, shift_labels, mask = shifted(logits, labels, kept)
    selected = shift_logits[mask].float()
    log_probs = torch.log_softmax(selected, dim=-1).gather(-1, shift_labels[mask].unsqueeze(-1)).squeeze(-1)
    sample_index = mask.nonzero(as_tuple=True)[0]
    return log_probs, sample_index


def per_sample_mean(values: torch.Tensor, sample_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of ``values`` per sample (samples with no target token get 0)."""
    sums = torch.zeros(batch_size, dtype=values.dtype, device=values.device).index_add(0, sample_index, values)
    counts = torch.zeros(batch_size, dtype=values.dtype, device=values.device).index_add(
        0, sample_index, torch.ones_like(values))
    return sums / counts.clamp(min=1)


def sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample cross-entropy: the mean over that sample's target tokens, shape ``[B]``.

    The training loss is the plain mean of these over samples (as NRCA's reference code computes
    it), so a long caption and a one-letter answer weigh the same.
    """
    log_probs, index = target_log_probs(logits, labels, kept)
    return per_sample_mean(-log_probs, index, labels.shape[0])


def target_token_counts(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def target_logits(logits: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """The logits that predict the target tokens, ``[N, V]`` in ``target_log_probs``' order (for token losses that
    need the whole distribution: an entropy, a KL divergence). ``kept``: see ``shifted``."""
    shift_logits, _, mask = shifted(logits, labels, kept)
    return shift_logits[mask]


def reduce_token_values(values: torch.Tensor, index: torch.Tensor, batch_size: int, reduction: str,
                        tokens: float | torch.Tensor | None) -> torch.Tensor:
    """One number from per-target-token values, reduced as the cross-entropy is (``train.loss_reduction``): the
    mean over samples of each sample's token mean (``sample``), or the sum over ``tokens`` (``token``)."""
    if reduction == "sample":
        return per_sample_mean(values, index, batch_size).mean()
    if reduction == "token":
        return values.sum() / (tokens if tokens is not None else max(1, values.numel()))
    raise ValueError(f"unknown loss reduction {reduction!r}; choose one of {LOSS_REDUCTIONS}")



def task_rows(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """For each task of the batch (sorted), a boolean mask of its rows."""
    tasks = batch["tasks"]
    return {task: torch.tensor([t == task for t in tasks], device=device) for task in sorted(set(tasks))}


def task_shares(batch: dict, log_probs: torch.Tensor, index: torch.Tensor, sample_loss: torch.Tensor,
                reduction: str, tokens: float | torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Each task's share of the batch's cross-entropy (they sum to it): the part of the loss its samples (``sample``)
    or its target tokens (``token``) contribute."""
    shares = {}
    for task, rows in task_rows(batch, sample_loss.device).items():
        if reduction == "sample":
            shares[task] = (sample_loss * rows).sum() / len(rows)
        else:
            shares[task] = -(log_probs * rows[index]).sum() / (tokens if tokens is not None else
                                                                max(1, log_probs.numel()))
    return shares


def task_mean_losses(batch: dict, sample_loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each task's mean loss in the batch: the mean of its samples' mean token losses (what loss-balancing
    methods weigh; a task's loss is then on its own scale, whatever the batch's mix)."""
    return {task: sample_loss[rows].mean() for task, rows in task_rows(batch, sample_loss.device).items()}


def task_loss_totals(batch: dict, sample_loss: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """``[2, T]``: per task of ``tasks``, the sum of its samples' losses in the batch and their count (detached; summed
    over micro-batches and processes, then divided, they give each task's mean training loss: what the step log
    writes as ``loss/<task>``)."""
    totals = torch.zeros(2, len(tasks), device=sample_loss.device, dtype=torch.float64)
    for task, rows in task_rows(batch, sample_loss.device).items():
        if task in tasks:
            column = tasks.index(task)
            totals[0, column] = sample_loss.detach()[rows].double().sum()
            totals[1, column] = rows.sum()
    return totals


def unused_weights_tie(trainable: dict[str, torch.Tensor]) -> torch.Tensor:
    """0, tied to every trainable weight: added to a batch without images (text-only records) on DDP and ZeRO-1/2,
    where the vision tower and projector take no part in its forward. Their gradient from it is 0 — as one process
    gets for those records — but present, so every process reduces the same tensors (DDP stops at a trainable weight
    without a gradient; DeepSpeed's buckets would differ in size). One element of each weight is read."""
    return sum(param.reshape(-1)[0] for param in trainable.values()) * 0.0


def compute_losses(ctx, methods, batch: dict, reduction: str = "sample", tokens: float | torch.Tensor | None = None,
                   shares: dict | None = None, task_totals: list | None = None):
    """Cross-entropy plus every method's named extra terms; returns ``(terms, outputs)`` (terms named, outputs of
    the clean forward).

    ``reduction`` (``train.loss_reduction``): ``token`` — the sum of target-token losses divided by ``tokens``
    (the Hugging Face convention: every token weighs the same; the loop passes the step's token count so
    gradient accumulation and several processes give the batch's exact token mean); ``sample`` — the plain
    mean over samples of each sample's mean token loss (NRCA's released code: a long caption and a one-letter
    answer weigh the same). Methods always receive the per-sample losses. ``shares``: a dict to fill with each task's
    share of the cross-entropy (for multi-task optimisation). ``task_totals``: a list to append the batch's per-task
    loss sums and counts to (``task_loss_totals``, over ``ctx.tasks``: the per-task training loss in the log).

    A method with ``token_loss`` (DFT, EAFT, ASFT) replaces each target token's ``−log p`` with its own loss, reduced
    the same way: its term is ``reduced − ce``, so ``ce`` stays the plain cross-entropy in the log (comparable across
    methods) and the sum of the terms is the method's loss.
    """
    outputs = forward(ctx.model, batch)
    log_probs, index = target_log_probs(outputs.logits, batch["labels"], batch.get(KEEP))
    batch_size = batch["labels"].shape[0]
    sample_loss = per_sample_mean(-log_probs, index, batch_size)
    ce = sample_loss.mean() if reduction == "sample" else \
        reduce_token_values(-log_probs, index, batch_size, reduction, tokens)
    if shares is not None:
        shares.update(task_shares(batch, log_probs, index, sample_loss, reduction, tokens))
    if task_totals is not None and ctx.tasks:
        task_totals.append(task_loss_totals(batch, sample_loss, ctx.tasks))
    engine = getattr(ctx, "engine", None)  # a context of one's own (a test's namespace) may name none: one process
    if "pixel_values" not in batch and engine is not None and engine.processes > 1 and engine.tensors == "whole":
        ce = ce + unused_weights_tie(ctx.trainable)
    terms = {"ce": ce}
    for method in methods:
        if method.replaces_token_loss:
            token_loss = method.token_loss(ctx, batch, outputs, log_probs, index)
            if token_loss is not None:  # None: the plain cross-entropy (the method at its null setting)
                terms[method.name] = reduce_token_values(token_loss, index, batch_size, reduction, tokens) - ce
    for method in methods:
        if method.balances_task_losses:
            # The balanced loss replaces the cross-entropy: ce + (balanced − ce), so ``ce`` stays logged as the
            # plain cross-entropy, comparable across methods, and the method's term is what balancing changes.
            balanced = method.balance_task_losses(ctx, task_mean_losses(batch, sample_loss))
            terms[method.name] = balanced - ce
    for method in methods:
        for key, value in method.extra_losses(ctx, batch, outputs, sample_loss).items():
            if key in terms:
                raise ValueError(f"loss term {key!r} is produced twice; method names must not clash")
            terms[key] = value
    return terms, outputs
