"""lora_sculpt — LoRA with sparse updates and a penalty where the base's knowledge is (SPIDER's LoRA counterpart).

Liang et al., "LoRASculpt: Sculpting LoRA for Harmonizing General and Specialized Knowledge in Multimodal Large
Language Models", CVPR 2025 (the NRCA / SPIDER authors' group). Two parts, as in the authors' released trainer:

1. **Sculpting.** LoRA's update is redundant: after ``sculpt_step`` optimizer steps, each adapter matrix (A and B)
   keeps only its ``keep_ratio`` largest-magnitude entries; the others are zeroed and stay zero to the end (re-zeroed
   after every optimizer step: AdamW's momentum would move them again).
2. **Conflict Mitigation Regularization (CMR).** The update ``B·A`` of a module is penalised where the base weight
   W carries knowledge, measured from W's normalised magnitude:

       M = tanh(ω · |1 / log(|W| / ‖W‖_F + ε)|),     loss += λ · mean over modules ‖M ⊙ (B·A)‖_F

   (larger |W| → log closer to 0 → larger M). On the modules named in ``cmr_modules`` (q, k, v projections, as
   the authors; their projector also carries LoRA, mmtune's projector trains fully as in ``lora``, so CMR is on
   the LLM's adapters only).

Defaults from the authors' training script: ``r`` 32, ``alpha`` 64, ``keep_ratio`` 0.1, ``sculpt_step`` 100,
``cmr_lam`` 1e-3, ``omega`` 1. Everything else (targets, merge at the end, ``<run>/adapter``) is ``lora``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mmtune.merging import top_magnitude
from mmtune.methods.base import laid_out_as, register, whole
from mmtune.methods.lora import Lora, LoraMethodConfig, lora_layers


def conflict_weights(weight: torch.Tensor, omega: float, eps: float = 1e-15) -> torch.Tensor:
    """CMR's ``M = tanh(ω·|1 / log(|W| / ‖W‖_F + ε)|)``, from a frozen base weight (no gradient)."""
    w = weight.detach().float()
    return torch.tanh(omega * (1.0 / torch.log(w.abs() / torch.linalg.norm(w) + eps)).abs())


def conflict_penalty(pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over ``(A, B, M)`` of ``‖M ⊙ (B·A)‖_F``."""
    return torch.stack([torch.linalg.norm(m * (b.float() @ a.float())) for a, b, m in pairs]).mean()


def adapter_names(trainable) -> list[str]:
    return [name for name in trainable if ".lora_A." in name or ".lora_B." in name]


@dataclass
class LoraSculptConfig(LoraMethodConfig):
    r: int = 32
    alpha: float = 64.0
    keep_ratio: float = 0.1  # share of each adapter matrix's entries kept after sculpting
    sculpt_step: int = 100  # optimizer steps before sculpting
    cmr_lam: float = 1e-3  # λ of the conflict mitigation regularization (0: none)
    omega: float = 1.0  # ω, the steepness of M
    cmr_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])

    ranges: ClassVar[dict[str, str]] = {**LoraMethodConfig.ranges, "keep_ratio": "(0, 1]", "sculpt_step": "≥ 0", "cmr_lam": "≥ 0", "omega": "> 0"}


@register
class LoraSculpt(Lora):
    name = "lora_sculpt"
    reads_weights_in_loss = True  # as weight_penalty: under ZeRO-3 its gradient is added on the full masters
    # On FSDP2 shards: the masks are selected over each whole adapter matrix (gathered one at a time) and kept per
    # shard, as magnitude_mask's; the CMR term is computed on the whole factors, the same on every process, so each
    # shard's gradient is its slice of the whole one (tests/methods/test_methods_sharded.py).
    supports_sharding = True
    description = "LoRA sculpted to its largest entries + a penalty where the base's weights are large (Liang et al., CVPR 2025)"
    config_class = LoraSculptConfig
    persistent = ("masks",)
    weight_penalty_term = "cmr"

    def setup(self, ctx):
        self.masks: dict[str, torch.Tensor] = {}
        # (A's name, B's name, M) per adapter of a module named in cmr_modules, by the names of ``ctx.trainable`` (so
        # the term reads DeepSpeed's fp32 masters under ZeRO-3); M from the whole frozen base weight, computed once.
        self.modules = []
        for name, module, adapters in lora_layers(ctx.unwrapped):
            if name.rsplit(".", 1)[-1] not in self.config.cmr_modules:
                continue
            conflict = base_conflict_weights(module, self.config.omega)
            self.modules += [(f"{name}.lora_A.{a}.weight", f"{name}.lora_B.{a}.weight", conflict) for a in adapters]
        if self.config.cmr_lam and not self.modules:
            raise ValueError(f"lora_sculpt: no adapted module is named in cmr_modules={self.config.cmr_modules}")

    def weight_penalty(self, ctx):
        if self.config.cmr_lam == 0:
            return None
        pairs = [(whole(ctx.trainable[a]), whole(ctx.trainable[b]), conflict) for a, b, conflict in self.modules]
        return self.config.cmr_lam * conflict_penalty(pairs)

    @torch.no_grad()
    def after_optimizer_step(self, ctx):
        if not self.masks and ctx.step + 1 >= self.config.sculpt_step:  # ctx.step: steps done before this one
            self.masks = {name: laid_out_as(top_magnitude(whole(ctx.trainable[name]), self.config.keep_ratio),
                                            ctx.trainable[name])
                          for name in adapter_names(ctx.trainable)}
        for name, mask in self.masks.items():
            ctx.trainable[name].mul_(mask)


def base_conflict_weights(module, omega: float) -> torch.Tensor:
    """CMR's M for a LoRA layer, from its whole frozen base weight: gathered from FSDP2 shards, or from DeepSpeed
    ZeRO-3's partitions (read only, one layer at a time)."""
    weight = module.get_base_layer().weight
    if not hasattr(weight, "ds_tensor"):
        return conflict_weights(whole(weight), omega)
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight]):
        return conflict_weights(weight, omega)
