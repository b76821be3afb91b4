"""Per-sample token statistics shared by the training loop and the methods."""

from __future__ import annotations

import torch

from mmtune.config import LOSS_REDUCTIONS
from mmtune.data.collate import IGNORE_INDEX, model_inputs


def target_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the target tokens (causal shift: logits at t predict labels at t+1).

    Returns ``(log_probs [N], sample_index [N])`` for the N non-ignored target tokens of the batch; the
    softmax runs over those positions only, never over the whole ``[B, L, V]`` tensor.
    """
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
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


def sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy: the mean over that sample's target tokens, shape ``[B]``.

    The training loss is the plain mean of these over samples (as NRCA's reference code computes
    it), so a long caption and a one-letter answer weigh the same.
    """
    log_probs, index = target_log_probs(logits, labels)
    return per_sample_mean(-log_probs, index, labels.shape[0])


def target_token_counts(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)




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


def compute_losses(ctx, methods, batch: dict, reduction: str = "sample", tokens: float | torch.Tensor | None = None,
                   shares: dict | None = None):
    """Cross-entropy plus every method's named extra terms; returns ``(terms, outputs)`` (terms named, outputs of
    the clean forward).

    ``reduction`` (``train.loss_reduction``): ``token`` — the sum of target-token losses divided by ``tokens``
    (the Hugging Face convention: every token weighs the same; the loop passes the step's token count so
    gradient accumulation and several processes give the batch's exact token mean); ``sample`` — the plain
    mean over samples of each sample's mean token loss (NRCA's released code: a long caption and a one-letter
    answer weigh the same). Methods always receive the per-sample losses. ``shares``: a dict to fill with each task's
    share of the cross-entropy (for multi-task optimisation).
    """
    outputs = ctx.model(**model_inputs(batch))
    log_probs, index = target_log_probs(outputs.logits, batch["labels"])
    sample_loss = per_sample_mean(-log_probs, index, batch["labels"].shape[0])
    if reduction == "sample":
        ce = sample_loss.mean()
    elif reduction == "token":
        ce = -log_probs.sum() / (tokens if tokens is not None else max(1, log_probs.numel()))
    else:
        raise ValueError(f"unknown loss reduction {reduction!r}; choose one of {LOSS_REDUCTIONS}")
    if shares is not None:
        shares.update(task_shares(batch, log_probs, index, sample_loss, reduction, tokens))
    terms = {"ce": ce}
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
