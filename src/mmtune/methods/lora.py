"""lora — low-rank adapters (PEFT) on the scope's LLM blocks instead of tuning them fully.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, through Hugging Face
``peft``. The adapters go on the linear layers of the scope's LLM blocks (``scope.last_n_blocks`` / ``scope.layers``,
and within them only the parts ``scope.modules`` names) whose names end in one of ``target_modules``; the projector
stays fully trainable, as in the other methods.
At the end the adapters are merged, so ``final/`` is a plain model any tool loads; with ``merge=false`` the
unmerged adapter (and the trained projector, saved as PEFT ``modules_to_save``) is also written to ``<run>/adapter``,
loadable with ``peft.PeftModel.from_pretrained(base_model, "<run>/adapter")``.
Hyperparameters: ``r`` = 8, ``alpha`` = 16, ``dropout`` = 0.0, ``target_modules``, ``merge`` = true.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer

from mmtune.methods.base import Method, MethodConfig, laid_out_as, partitioned, register, whole
from mmtune.models.scope import part_of


@dataclass
class LoraMethodConfig(MethodConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge: bool = True  # false: also keep the unmerged adapter in <run>/adapter (final/ stays a merged model)

    ranges: ClassVar[dict[str, str]] = {"r": "≥ 1", "alpha": "> 0", "dropout": "[0, 1)"}
    def __post_init__(self):
        super().__post_init__()
        if not self.target_modules:
            raise ValueError("target_modules is empty: name the modules that get adapters")


@register
class Lora(Method):
    name = "lora"
    supports_sharding = True  # tested on FSDP2 shards: tests/methods/test_methods_sharded.py
    description = "LoRA adapters (peft) on the scope's LLM blocks, merged at the end (Hu et al., 2022)"
    config_class = LoraMethodConfig

    def prepare_model(self, model, layout):
        targets = lora_targets(model, layout, self.config.target_modules)
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
        if ctx.engine.fsdp:  # PEFT's merge adds B·A into the weight in place, which shards don't allow
            merge_sharded(ctx.final_model)
            ctx.final_model = unload_keeping_trained_modules(ctx.final_model)
        elif partitioned(dict(ctx.final_model.named_parameters())):  # DeepSpeed ZeRO-3: W is an empty partition
            merge_partitioned(ctx.final_model, ctx.trainable)
            ctx.final_model = unload_keeping_trained_modules(ctx.final_model)
        else:
            ctx.final_model = ctx.final_model.merge_and_unload()


def unload_keeping_trained_modules(model):
    """The plain model after the LoRA updates were merged by hand: PEFT's ``unload()`` with each fully trained module
    (``modules_to_save``: the projector) replaced by its trained copy first — ``unload()`` alone gives back the
    original, untrained module since peft 0.22 (before, it kept the copy)."""
    from peft.utils.other import ModulesToSaveWrapper

    wrappers = [(name, module) for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    for name, wrapper in wrappers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper.modules_to_save[wrapper.active_adapters[0]])
    return model.unload()


def lora_targets(model, layout, target_modules: list[str]) -> list[str]:
    """The linear layers that get adapters: those named in ``target_modules`` inside what the scope trains — its
    blocks, or only the submodules ``scope.modules`` chose (``layout.scoped``; QLoRA's quantized layers included,
    which the scope cannot unfreeze). On a layout no scope was applied to (a user's own Trainer), the blocks holding
    a trainable tensor, minus layers whose weight is a frozen floating-point tensor."""
    blocks = {layout.blocks + "." + n[len(layout.blocks) + 1:].split(".", 1)[0]
              for n, p in model.named_parameters() if p.requires_grad and part_of(n, layout) == "llm_blocks"}
    within = layout.scoped or tuple(blocks)
    targets = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in target_modules or not any(name.startswith(path + ".") or name == path
                                                                     for path in within):
            continue
        weight = getattr(module, "weight", None)
        if not layout.scoped and weight is not None and weight.is_floating_point() and not weight.requires_grad:
            continue  # the user froze it: an adapter would train what they chose to keep
        targets.append(name)
    if not targets:
        chosen = f"the scope's {', '.join(layout.scoped)}" if layout.scoped else "the trainable LLM blocks"
        raise ValueError(f"lora: no module of {chosen} ends in {target_modules} (method.lora.target_modules; "
                         "scope.modules chooses which parts of the blocks train)")
    return sorted(targets)


def lora_layers(model) -> Iterator[tuple[str, LoraLayer, list[str]]]:
    """Each LoRA layer of ``model``: its name, the layer, and the active adapters it holds."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module, [adapter for adapter in module.active_adapters if adapter in module.lora_A]


def lora_update(module: LoraLayer, adapter: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The update ``scale · B·A`` an adapter adds to its layer's weight (whole factors, in fp32), laid out as the
    weight (transposed for ``fan_in_fan_out`` layers)."""
    delta = lora_b.float() @ lora_a.float()
    return (delta.T if module.fan_in_fan_out else delta) * module.scaling[adapter]


@torch.no_grad()
def merge_partitioned(model, masters: dict[str, torch.Tensor]) -> None:
    """Each LoRA layer's ``W += scale · B·A`` under DeepSpeed ZeRO-3, where W (frozen) is partitioned over the
    processes: the update comes from the adapter's full fp32 masters (``masters``: ``ctx.trainable`` inside
    ``on_masters``, by parameter name); W is gathered one layer at a time, the main process adds the update, and
    DeepSpeed partitions the result again (``GatheredParameters`` with ``modifier_rank=0``)."""
    import deepspeed

    for name, module, adapters in lora_layers(model):
        weight = module.get_base_layer().weight
        updates = [lora_update(module, adapter, masters[f"{name}.lora_A.{adapter}.weight"],
                               masters[f"{name}.lora_B.{adapter}.weight"]) for adapter in adapters]
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            if deepspeed.comm.get_rank() == 0:
                for update in updates:
                    weight.add_(update.to(weight.device, weight.dtype))


@torch.no_grad()
def merge_sharded(model) -> None:
    """Each LoRA layer's ``W += scale · B·A`` on FSDP2 shards: the adapter's whole factors (gathered one layer at a
    time, the same on every process) give the whole update, of which each process adds its piece to its shard of W."""
    for _, module, adapters in lora_layers(model):
        weight = module.get_base_layer().weight
        for adapter in adapters:
            delta = lora_update(module, adapter, whole(module.lora_A[adapter].weight),
                                whole(module.lora_B[adapter].weight))
            weight.add_(laid_out_as(delta.to(weight.dtype), weight))
