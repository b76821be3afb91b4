"""What trains: vision tower frozen, projector and the last N LLM blocks trainable, two learning rates.

Where each part lives differs per architecture: ``LAYOUTS`` holds the ones tested end to end; any other
image-text-to-text model is read by ``discover_layout`` (the vision encoder, the connector and the language model's
blocks found by the names transformers gives them), with an error naming what could not be found.
"""

from __future__ import annotations

import functools
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


# Names transformers gives the parts of a vision-language model, under its inner ``model``.
VISION_NAMES = ("vision_tower", "visual", "vision_model")
CONNECTOR_NAMES = ("multi_modal_projector", "connector", "visual.merger", "mlp1")
LANGUAGE_NAMES = ("language_model", "text_model")

# Architectures read by discovery and checked on their reference configs (built on the meta device): `mmtune ls
# architectures` prints their scope; the tiny models of three of LAYOUTS' run the pipeline end to end in the tests.
DISCOVERED = ("qwen3_vl", "gemma3", "internvl", "llava_onevision", "mistral3", "lfm2_vl", "glm4v")


def discover_layout(model: nn.Module) -> Layout:
    """The layout of an image-text-to-text model not in ``LAYOUTS``, from the names of its parts."""
    inner = "model" if isinstance(getattr(model, "model", None), nn.Module) else ""
    base = model.get_submodule(inner) if inner else model
    prefix = f"{inner}." if inner else ""

    def first(names) -> str | None:
        for name in names:
            try:
                base.get_submodule(name)
            except AttributeError:
                continue
            return prefix + name
        return None

    vision, connector, language = first(VISION_NAMES), first(CONNECTOR_NAMES), first(LANGUAGE_NAMES)
    blocks = f"{language}.layers" if language and isinstance(
        getattr(model.get_submodule(language), "layers", None), nn.ModuleList) else None
    missing = [what for what, found in (("vision encoder", vision), ("connector", connector),
                                        ("language-model blocks", blocks)) if found is None]
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"{model_type}: could not find its {', '.join(missing)} (looked for {prefix}"
                         f"{' | '.join(VISION_NAMES)}, {' | '.join(CONNECTOR_NAMES)}, <{' | '.join(LANGUAGE_NAMES)}>"
                         ".layers); add its layout to mmtune.models.scope.LAYOUTS")
    return Layout(vision, connector, blocks)


def layout_of(model: nn.Module) -> Layout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return LAYOUTS[model_type] if model_type in LAYOUTS else discover_layout(model)


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


@functools.lru_cache(maxsize=4)
def reference_scopes(last_n_blocks: int = 2) -> list[dict]:
    """For every architecture mmtune knows (``LAYOUTS``) or discovers (``DISCOVERED``): its layout and the scope of
    its reference config (transformers' default config of the type, e.g. LLaVA-1.5-7B), built on the meta device."""
    import warnings

    import torch
    from transformers import CONFIG_MAPPING, AutoModelForImageTextToText

    rows = []
    for name in [*LAYOUTS, *DISCOVERED]:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = AutoModelForImageTextToText.from_config(CONFIG_MAPPING[name]())
        layout = layout_of(model)
        apply_scope(model, True, last_n_blocks)
        rows.append({"name": name, "source": "table" if name in LAYOUTS else "discovered", "layout": layout,
                     "blocks": len(model.get_submodule(layout.blocks)),
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
    return rows
