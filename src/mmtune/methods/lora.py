"""lora — low-rank adapters (PEFT) on the scope's LLM blocks instead of tuning them fully.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, through Hugging Face
``peft``. The adapters go on the linear layers of the last ``scope.last_n_blocks`` LLM blocks whose
names end in one of ``target_modules``; the projector stays fully trainable, as in the other methods.
At the end the adapters are merged, so ``final/`` is a plain model any tool loads; with ``merge=false`` the
unmerged adapter (and the trained projector, saved as PEFT ``modules_to_save``) is also written to ``<run>/adapter``,
loadable with ``peft.PeftModel.from_pretrained(base_model, "<run>/adapter")``.
Hyperparameters: ``r`` = 8, ``alpha`` = 16, ``dropout`` = 0.0, ``target_modules``, ``merge`` = true.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer

from mmtune.methods.base import Method, MethodConfig, is_fsdp, laid_out_as, register, whole
from mmtune.models.scope import part_of


@dataclass
class LoraMethodConfig(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge: bool = True  # false: also keep the unmerged adapter in <run>/adapter (final/ stays a merged model)

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
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "LoRA adapters (peft) on the scope's LLM blocks, merged at the end (Hu et al., 2022)"
    config_class = LoraMethodConfig

    def prepare_model(self, model, layout):
        # The scope's blocks: those holding a trainable tensor (with QLoRA only their norms are: the linear layers'
        # weights are quantized storage); the adapters go on their linear layers named in target_modules.
        blocks = {layout.blocks + "." + n[len(layout.blocks) + 1:].split(".", 1)[0]
                  for n, p in model.named_parameters() if p.requires_grad and part_of(n, layout) == "llm_blocks"}
        targets = sorted(name for name, _ in model.named_modules()
                         if any(name.startswith(block + ".") for block in blocks)
                         and name.rsplit(".", 1)[-1] in self.config.target_modules)
        if not targets:
            raise ValueError(f"lora: no module of the trainable LLM blocks ends in {self.config.target_modules}")
        # The projector trains fully, as in the other methods: PEFT keeps it as modules_to_save, so a saved adapter
        # carries it too.
        projector = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters()
                            if p.requires_grad and part_of(n, layout) == "projector"})
        peft_config = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                                 target_modules=targets, modules_to_save=projector or None)
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            # QLoRA: norms to fp32, inputs that carry gradients through the frozen quantized layers
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, peft_config)

    def on_train_end(self, ctx):
        if not self.config.merge and ctx.output_dir is not None and ctx.accelerator.is_main_process:
            ctx.final_model.save_pretrained(ctx.output_dir / "adapter")
        if is_fsdp(ctx.accelerator):  # PEFT's merge adds B·A into the weight in place, which shards don't allow
            merge_sharded(ctx.final_model)
            ctx.final_model = ctx.final_model.unload()
        else:
            ctx.final_model = ctx.final_model.merge_and_unload()


@torch.no_grad()
def merge_sharded(model) -> None:
    """Each LoRA layer's ``W += scale · B·A`` on FSDP2 shards: the adapter's whole factors (gathered one layer at a
    time, the same on every process) give the whole update, of which each process adds its piece to its shard of W."""
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            delta = whole(module.lora_B[adapter].weight).float() @ whole(module.lora_A[adapter].weight).float()
            delta = (delta.T if module.fan_in_fan_out else delta) * module.scaling[adapter]
            weight.add_(laid_out_as(delta.to(weight.dtype), weight))
