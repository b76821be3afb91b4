"""eaft — Entropy-Adaptive Fine-Tuning (LLaMA-Factory ``use_eaft_loss``).

Diao et al., "Entropy-Adaptive Fine-Tuning: Resolving Confident Conflicts to Mitigate Forgetting"
(arXiv 2601.02151). Forgetting is driven by "confident conflicts": target tokens the model gives a low probability
while being sure of something else (low entropy). EAFT scales each token's cross-entropy by the model's normalised
entropy at that position (stopped gradient): uncertain positions learn fully, confident conflicts barely move it.

    L = − Σ_t (H̃_t)^α · log p_t,    H̃_t = H(top-k softmax of the logits) / ln k

The entropy is taken over the ``k`` largest logits (k = 20, renormalised), as the authors' code does, so it costs
a top-k, not a full-vocabulary softmax; ``ln k`` makes H̃ ∈ [0, 1]. ``alpha`` = 1; at ``alpha`` = 0 it is plain SFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtune.data.collate import KEEP
from mmtune.losses import target_logits
from mmtune.methods.base import Method, MethodConfig, register


@torch.no_grad()
def normalized_topk_entropy(logits: torch.Tensor, k: int = 20) -> torch.Tensor:
    """Entropy of the softmax over each row's ``k`` largest logits, divided by ``ln k`` (rows of ``[N, V]``)."""
    k = min(k, logits.shape[-1])
    if k < 2:
        return torch.ones(logits.shape[0], device=logits.device)
    top = torch.topk(logits.float(), k, dim=-1).values
    log_p = torch.log_softmax(top, dim=-1)
    return -(log_p.exp() * log_p).sum(-1) / math.log(k)


def eaft_token_loss(log_probs: torch.Tensor, entropy: torch.Tensor, alpha: float) -> torch.Tensor:
    """``−H̃^α · log p`` per target token (``entropy`` carries no gradient)."""
    return -entropy.detach().pow(alpha) * log_probs


@dataclass
class EAFTConfig(MethodConfig):
    alpha: float = 1.0  # the entropy weight's exponent (0: plain SFT)
    top_k: int = 20  # logits the entropy is taken over

    ranges: ClassVar[dict[str, str]] = {"alpha": "≥ 0", "top_k": "≥ 2"}


@register
class EAFT(Method):
    name = "eaft"
    description = "entropy-adaptive fine-tuning: each token's loss scaled by the model's entropy there (Diao et al., 2026)"
    config_class = EAFTConfig
    supports_sharding = True
    null_options = {"alpha": 0}

    def token_loss(self, ctx, batch, outputs, log_probs, index):
        if self.config.alpha == 0:
            return None  # plain SFT
        entropy = normalized_topk_entropy(target_logits(outputs.logits, batch["labels"], batch.get(KEEP)), self.config.top_k)
        return eaft_token_loss(log_probs, entropy, self.config.alpha)
