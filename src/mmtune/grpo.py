"""GRPO's math (issue 38): group-normalised advantages, the clipped policy objective with a KL to the base model, and
verifiable rewards read from a task's own metric.

Pure functions on tensors and records, each equal to TRL's ``GRPOTrainer`` where TRL defines it
(``tests/test_grpo.py``): a training mode built on them samples G answers per prompt, scores each with
``verifiable_reward``, turns the group's rewards into ``group_advantages`` and steps on ``policy_loss``.

For answers ``o_1 … o_G`` sampled for one prompt with rewards ``r_i``:

    A_i = (r_i − mean(r)) / (std(r) + 1e-4)                       (std over the group, unbiased; "none": no division)
    ρ_t = π(o_t) / π_old(o_t)                                    (1 when the loss is taken where the answers were drawn)
    ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_i) + β · KL_t
    KL_t = π_ref(o_t)/π(o_t) − log(π_ref(o_t)/π(o_t)) − 1        (k3: unbiased, ≥ 0)
    loss = mean over answers of the mean of ℓ_t over the answer's tokens   ("grpo"; "bnpo": mean over all tokens)
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo")
SCALES = ("group", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Each answer's reward against its group's (the G answers to one prompt, consecutive in ``rewards``): minus
    the group's mean, over its standard deviation (``scale="group"``) or not (``"none"``, Dr. GRPO's choice)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: choose one of {', '.join(SCALES)}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not groups of {group_size} answers")
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return advantages
    spread = groups.std(dim=1) if group_size > 1 else torch.zeros(groups.shape[0], dtype=rewards.dtype)
    return advantages / (spread.repeat_interleave(group_size) + 1e-4)


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(π ‖ π_ref) at each sampled token: ``exp(ref − logp) − (ref − logp) − 1`` (≥ 0)."""
    gap = ref_logps - logps
    return torch.exp(gap) - gap - 1


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
                ref_logps: torch.Tensor | None = None, loss_type: str = "grpo") -> dict[str, torch.Tensor]:
    """GRPO's clipped objective over ``[answers, tokens]`` log-probabilities of the sampled tokens (``mask``: the
    answers' tokens). Returns ``loss`` and, detached, what a run logs: ``kl`` (the mean per-token KL, where β > 0)
    and the shares of tokens whose ratio was clipped (``clip_low``, ``clip_high``, ``clip_region``)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if beta and ref_logps is None:
        raise ValueError("a KL coefficient β > 0 needs the base model's log-probabilities (ref_logps)")
    mask = mask.to(logps.dtype)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token, ratio = clipped_objective(logps, old_logps, advantages, epsilon_low, epsilon_high)
    out: dict[str, torch.Tensor] = {}
    if beta:
        kl = per_token_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        out["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1.0)).detach()
    if loss_type == "grpo":
        out["loss"] = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:
        out["loss"] = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    for name, flags in clip_flags(ratio, advantages, epsilon_low, epsilon_high).items():
        flags = flags.to(mask.dtype)
        out[name] = ((flags * mask).sum() / mask.sum().clamp(min=1.0)).detach()
    return out


def clipped_objective(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float = 0.2, epsilon_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sampled token's ``−min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A)`` and its ratio ρ (shapes broadcast). Taken
    where the answers were drawn (``old_logps = logps.detach()``), ρ ≡ 1: the value is −A and the gradient −A·∇log π —
    the clip only binds when the weights moved since the sampling."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def clip_flags(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
               epsilon_high: float) -> dict[str, torch.Tensor]:
    """Where the clip took the gradient away: below 1 − ε_low with A < 0, above 1 + ε_high with A > 0, either."""
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return {"clip_low": low, "clip_high": high, "clip_region": low | high}


@dataclass
class CiderCorpus:
    """What CIDEr-D reads from the whole reference corpus: each n-gram's document frequency (in how many records'
    references it occurs) and the log of the number of records — self-critical sequence training's precomputed
    statistics, so that one answer can be scored on its own."""

    frequency: dict[tuple[str, ...], float]
    log_records: float

    @classmethod
    def of(cls, references: list[list[str]]) -> CiderCorpus:
        """From every training record's references (PTB-tokenized here, as ``mmtune eval`` tokenizes without Java)."""
        from mmtune.metrics import python_ptb_tokenize

        frequency: dict[tuple[str, ...], float] = defaultdict(float)
        for refs in references:
            for gram in {g for ref in refs for g in ngram_counts(python_ptb_tokenize(ref))}:
                frequency[gram] += 1.0
        return cls(dict(frequency), math.log(max(1, len(references))))


def ngram_counts(text: str, n: int = 4) -> dict[tuple[str, ...], int]:
    """How often each 1…n-gram occurs in ``text`` (split on spaces)."""
    words, counts = text.split(), defaultdict(int)
    for size in range(1, n + 1):
        for start in range(len(words) - size + 1):
            counts[tuple(words[start:start + size])] += 1
    return counts


def cider_d(answer: str, references: list[str], corpus: CiderCorpus, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D of one answer (×10, pycocoevalcap's scale; ×100 in mmtune's reports is ×10 this): per n-gram size the
    clipped cosine of TF-IDF vectors (IDF from ``corpus``) against each reference, times a Gaussian penalty on the
    length difference, averaged over sizes and references. Equal to pycocoevalcap's per-caption score when ``corpus``
    is the scored set's own references (tests/test_grpo.py)."""
    from mmtune.metrics import python_ptb_tokenize

    def vectors(text: str):
        weights, norms, length = [defaultdict(float) for _ in range(n)], [0.0] * n, 0
        for gram, count in ngram_counts(text, n).items():
            idf = corpus.log_records - math.log(max(1.0, corpus.frequency.get(gram, 0.0)))
            weights[len(gram) - 1][gram] = count * idf
            norms[len(gram) - 1] += (count * idf) ** 2
            length += count if len(gram) == 2 else 0  # pycocoevalcap's length: the number of bigrams
        return weights, [math.sqrt(x) for x in norms], length

    mine, my_norms, my_length = vectors(python_ptb_tokenize(answer))
    total = 0.0
    for reference in references:
        theirs, their_norms, their_length = vectors(python_ptb_tokenize(reference))
        penalty = math.exp(-((my_length - their_length) ** 2) / (2 * sigma ** 2))
        for size in range(n):
            overlap = sum(min(value, theirs[size][gram]) * theirs[size][gram] for gram, value in mine[size].items())
            if my_norms[size] and their_norms[size]:
                overlap /= my_norms[size] * their_norms[size]
            total += overlap * penalty
    return 10.0 * total / n / max(1, len(references))


def verifiable_reward(record, answer: str, metric: str, corpus: CiderCorpus | None = None) -> float:
    """The reward of one sampled ``answer`` to ``record`` by the rule that scores its task (``TaskSpec.metric``, as
    ``mmtune eval`` scores it): ``mc`` — 1 when the letter or option it names is the record's gold one (mmtune's
    letter parsing), ``vqa`` — VQA accuracy against the annotators' answers, ``exact`` — exact match after
    normalisation, ``cider`` — CIDEr-D against the record's references with the document frequencies of the task's
    training references (``corpus``: CIDEr is a corpus statistic, which one record does not hold)."""
    from mmtune.metrics import exact_match, parse_choice, vqa_accuracy

    if metric == "cider":
        if corpus is None:
            raise ValueError(f"record {record.id!r}: a CIDEr reward needs the task's reference corpus (CiderCorpus)")
        return cider_d(answer, record.answers, corpus)

    if metric == "mc":
        if not record.choices:
            raise ValueError(f"record {record.id!r}: an mc reward needs the record's choices")
        picked = parse_choice(answer, record.choices)
        return float(picked is not None and picked == record.answer_index)
    if metric == "vqa":
        return float(vqa_accuracy(answer, record.answers))
    if metric == "exact":
        return float(exact_match(answer, record.answers))
    raise ValueError(f"no per-answer reward for metric {metric!r}: choose mc, vqa, exact or cider")
