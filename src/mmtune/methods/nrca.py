"""NRCA — Noise Resilient Confidence Alignment.

Huang et al., "Be Confident: Uncovering Overfitting in MLLM Multi-Task Tuning", ICML 2025.

Why: in a multi-task mix, open-response tasks (captions) overfit to language priors: the model
stays confident about its answer even when the image is replaced by noise. NRCA adds a second,
noised view of each image and penalises, per open-response sample, the relative gap between the
model's confidence under the clean image and under noise:

    L = mean_i ℓ_i + λ · Σ_i sg(ℓ_i) · |sg(c_i) − c̃_i| / sg(c_i) · o_i / Σ_i o_i

(ℓ_i: mean cross-entropy of sample i; c_i, c̃_i: mean probability of its target tokens, clean and
noisy; o_i = 1 for open-response samples). Gradient flows only through the noisy confidence.

Hyperparameters: ``lam`` λ = 2, ``delta`` noise ratio δ = 0.5, ``open_rule`` (``kind``: the record's
declared kind; ``tokens``: more than two target tokens, as the released code), ``noise``
(``gaussian_mix`` as the paper; ablations ``gaussian``: the image replaced by the noise, ``zeros``:
the image replaced by zeros).

Cheaper than the reference, same result: samples with o_i = 0 contribute nothing to the gap term,
so the noisy forward runs only on the open-response rows of the batch (and not at all when a batch
has none). The noise itself is drawn for the whole batch, with the whole batch's mean and std, so the
values are exactly the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.data.collate import KEEP, subset_batch
from mmtune.losses import forward, per_sample_mean, target_log_probs, target_token_counts
from mmtune.methods.base import Method, MethodConfig, register

NOISES = ("gaussian_mix", "gaussian", "zeros")
OPEN_RULES = ("kind", "tokens")


def noisy_view(pixel_values: torch.Tensor, delta: float = 0.5, generator: torch.Generator | None = None,
               noise: str = "gaussian_mix") -> torch.Tensor:
    """``(1 − δ)·X + δ·ε`` with ``ε ~ N(mean(X), std(X))`` over the whole batch tensor (paper Eq. 2)."""
    if noise == "zeros":
        return torch.zeros_like(pixel_values)
    x = pixel_values.float()
    epsilon = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * x.std() + x.mean()
    if noise == "gaussian":
        return epsilon.to(pixel_values.dtype)
    if noise != "gaussian_mix":
        raise ValueError(f"unknown noise {noise!r}; choose one of {NOISES}")
    return ((1 - delta) * x + delta * epsilon).to(pixel_values.dtype)


def token_confidence(logits: torch.Tensor, labels: torch.Tensor,
                     kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: mean cross-entropy over its target tokens and mean probability of those tokens (``kept``: the
    positions the logits cover, ``batch["logits_to_keep"]``, where they don't cover the whole sequence)."""
    log_probs, index = target_log_probs(logits, labels, kept)
    batch = labels.shape[0]
    return per_sample_mean(-log_probs, index, batch), per_sample_mean(log_probs.exp(), index, batch)


def confidence_gap_loss(clean_loss: torch.Tensor, clean_conf: torch.Tensor, noisy_conf: torch.Tensor,
                        open_mask: torch.Tensor) -> torch.Tensor:
    """``Σ sg(ℓ_i)·|sg(c_i) − c̃_i| / sg(c_i)·o_i / Σ o_i`` — zero when no sample is open-response."""
    weight = open_mask.to(noisy_conf.dtype)
    if weight.sum() == 0:
        return noisy_conf.sum() * 0.0
    clean_conf = clean_conf.detach()
    gap = (clean_conf - noisy_conf).abs() / clean_conf.clamp(min=torch.finfo(clean_conf.dtype).tiny)
    return (clean_loss.detach() * gap * weight).sum() / weight.sum()


def open_response_mask(batch: dict, rule: str) -> torch.Tensor:
    if rule == "kind":
        return batch["open_mask"].bool()
    if rule == "tokens":
        return target_token_counts(batch["labels"]) > 2
    raise ValueError(f"unknown open_rule {rule!r}; choose one of {OPEN_RULES}")


@dataclass
class NRCAConfig(MethodConfig):
    lam: float = 2.0
    delta: float = 0.5
    open_rule: str = "kind"
    noise: str = "gaussian_mix"

    ranges: ClassVar[dict[str, str]] = {"delta": "[0, 1]", "lam": "≥ 0"}
    choices: ClassVar[dict[str, tuple]] = {"open_rule": OPEN_RULES, "noise": NOISES}


@register
class NRCA(Method):
    name = "nrca"
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "noise-resilient confidence alignment for open-response tasks (Huang et al., ICML 2025)"
    config_class = NRCAConfig
    extra_forwards = 1  # the noised view of the open-response samples, kept for the gap term's gradient
    null_options = {"lam": 0}

    def extra_losses(self, ctx, batch, outputs, sample_loss):
        if self.config.lam == 0:
            return {}
        if "pixel_values" not in batch:  # a batch of text-only records: no image to noise
            return {"nrca_gap": sample_loss.sum() * 0.0}
        noisy_pixels = noisy_view(batch["pixel_values"], self.config.delta, ctx.generator, self.config.noise)
        open_mask = open_response_mask(batch, self.config.open_rule)
        if "image_mask" in batch:  # o_i also needs an image: noise can't change a text-only sample's confidence
            open_mask = open_mask & batch["image_mask"].to(open_mask.device)
        rows = open_mask.nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            if not ctx.engine.shards_parameters:
                return {"nrca_gap": sample_loss.sum() * 0.0}
            # FSDP / ZeRO-3: every forward and backward gathers the weights over the processes, so every process runs
            # the noised forward, this one on its image rows at weight 0 (else the others would wait for it forever).
            with_image = batch["image_mask"].to(open_mask.device) if "image_mask" in batch else ~open_mask
            idle = subset_batch({**batch, "pixel_values": noisy_pixels}, with_image.nonzero(as_tuple=True)[0])
            return {"nrca_gap": sample_loss.sum() * 0.0 + forward(ctx.model, idle).logits.sum() * 0.0}
        _, clean_conf = token_confidence(outputs.logits[rows], batch["labels"][rows], batch.get(KEEP))
        noisy_batch = subset_batch({**batch, "pixel_values": noisy_pixels}, rows)
        noisy_logits = forward(ctx.model, noisy_batch).logits
        _, noisy_conf = token_confidence(noisy_logits, noisy_batch["labels"], noisy_batch.get(KEEP))
        gap = confidence_gap_loss(sample_loss[rows], clean_conf, noisy_conf, torch.ones_like(noisy_conf))
        return {"nrca_gap": self.config.lam * gap}
