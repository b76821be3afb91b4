"""What trains: vision tower frozen, projector and the last N LLM blocks trainable, two learning rates.

Where each part lives differs per architecture; that knowledge is one table, ``LAYOUTS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Layout:
    vision: str  # module path of the vision encoder
    projector: str  # module path of the connector / projector
    blocks: str  # module path of the LLM's list of transformer blocks


LAYOUTS: dict[str, Layout] = {
    "llava": Layout("model.vision_tower", "model.multi_modal_projector", "model.language_model.layers"),
    "llava_next": Layout("model.vision_tower", "model.multi_modal_projector", "model.language_model.layers"),
    "qwen2_vl": Layout("model.visual", "model.visual.merger", "model.language_model.layers"),
    "qwen2_5_vl": Layout("model.visual", "model.visual.merger", "model.language_model.layers"),
    "idefics3": Layout("model.vision_model", "model.connector", "model.text_model.layers"),
    "smolvlm": Layout("model.vision_model", "model.connector", "model.text_model.layers"),
}


def layout_of(model: nn.Module) -> Layout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise ValueError(f"no layout for model type {model_type!r}; supported: {', '.join(sorted(LAYOUTS))} "
                         "(add one line to mmtune.models.scope.LAYOUTS)")
    return LAYOUTS[model_type]


def block_names(model: nn.Module, layout: Layout, last_n: int) -> list[str]:
    """Module paths of the last ``last_n`` LLM blocks, e.g. ``model.language_model.layers.30``."""
    blocks = model.get_submodule(layout.blocks)
    if last_n < 0 or last_n > len(blocks):
        raise ValueError(f"scope.last_n_blocks={last_n}, but the LLM has {len(blocks)} blocks")
    return [f"{layout.blocks}.{i}" for i in range(len(blocks) - last_n, len(blocks))]


def apply_scope(model: nn.Module, train_projector: bool = True, last_n_blocks: int = 2, full: bool = False) -> Layout:
    """Freeze everything, then unfreeze the projector and the last N LLM blocks (``full``: train everything)."""
    layout = layout_of(model)
    model.requires_grad_(full)
    if full:
        return layout
    if train_projector:
        _unfreeze(model.get_submodule(layout.projector))
    for name in block_names(model, layout, last_n_blocks):
        _unfreeze(model.get_submodule(name))
    return layout


def _unfreeze(module: nn.Module) -> None:
    """Make a module's floating-point parameters trainable (quantized storage — QLoRA's 4-bit weights — stays
    frozen: LoRA adapters train beside it)."""
    for param in module.parameters():
        if param.is_floating_point():
            param.requires_grad_(True)


def part_of(name: str, layout: Layout) -> str:
    """Which part a parameter name belongs to (works on PEFT-wrapped names too)."""
    dotted = "." + name
    if "." + layout.projector + "." in dotted:
        return "projector"
    if "." + layout.vision + "." in dotted:
        return "vision"
    if "." + layout.blocks + "." in dotted:
        return "llm_blocks"
    return "other"


def parameter_groups(model: nn.Module, layout: Layout, lr_blocks: float, lr_projector: float,
                     weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups: the projector at its own learning rate, everything else trainable at ``lr_blocks``."""
    projector, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (projector if part_of(name, layout) == "projector" else rest).append(param)
    groups = []
    if rest:
        groups.append({"params": rest, "lr": lr_blocks, "weight_decay": weight_decay, "name": "llm_blocks"})
    if projector:
        groups.append({"params": projector, "lr": lr_projector, "weight_decay": weight_decay, "name": "projector"})
    if not groups:
        raise ValueError("nothing to train: the scope leaves no trainable parameter")
    return groups


def scope_summary(model: nn.Module, layout: Layout) -> str:
    """A small table: trainable / total parameters per part."""
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        row = counts.setdefault(part_of(name, layout), [0, 0])
        row[1] += param.numel()
        if param.requires_grad:
            row[0] += param.numel()
    lines = [f"{'part':<12}{'trainable':>14}{'total':>14}"]
    for part in ("vision", "projector", "llm_blocks", "other"):
        if part in counts:
            t, n = counts[part]
            lines.append(f"{part:<12}{t:>14,}{n:>14,}")
    t = sum(v[0] for v in counts.values())
    n = sum(v[1] for v in counts.values())
    lines.append(f"{'total':<12}{t:>14,}{n:>14,}  ({100 * t / max(1, n):.1f}% trainable)")
    return "\n".join(lines)
