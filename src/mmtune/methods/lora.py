"""lora — low-rank adapters (PEFT) on the scope's LLM blocks instead of tuning them fully.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, through Hugging Face
``peft``. The adapters go on the linear layers of the last ``scope.last_n_blocks`` LLM blocks whose
names end in one of ``target_modules``; the projector stays fully trainable, as in the other methods.
At the end the adapters are merged, so ``final/`` is a plain model any tool loads.
Hyperparameters: ``r`` = 8, ``alpha`` = 16, ``dropout`` = 0.0, ``target_modules``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, get_peft_model

from mmtune.methods.base import Method, MethodConfig, register
from mmtune.models.scope import part_of


@dataclass
class LoraMethodConfig(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r={self.r} must be ≥ 1")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("target_modules is empty: name the modules that get adapters")


@register
class Lora(Method):
    name = "lora"
    description = "LoRA adapters (peft) on the scope's LLM blocks, merged at the end (Hu et al., 2022)"
    config_class = LoraMethodConfig

    def prepare_model(self, model, layout):
        blocks = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters()
                         if p.requires_grad and part_of(n, layout) == "llm_blocks"})
        targets = [m for m in blocks if m.rsplit(".", 1)[-1] in self.config.target_modules]
        if not targets:
            raise ValueError(f"lora: no module of the trainable LLM blocks ends in {self.config.target_modules}")
        projector = {n for n, p in model.named_parameters() if p.requires_grad and part_of(n, layout) == "projector"}
        peft_config = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                                 target_modules=targets)
        wrapped = get_peft_model(model, peft_config)
        for name, param in wrapped.named_parameters():  # peft freezes everything else; keep the projector
            if any(name.endswith(p) for p in projector):
                param.requires_grad_(True)
        return wrapped

    def on_train_end(self, ctx):
        ctx.final_model = ctx.final_model.merge_and_unload()
