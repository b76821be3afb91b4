"""What trains: vision tower frozen, projector and the last N LLM blocks trainable, two learning rates.

Where each part lives differs per architecture: ``LAYOUTS`` holds the ones tested end to end; any other
image-text-to-text model is read by ``discover_layout`` (the vision encoder, the connector and the language model's
blocks found by the names transformers gives them), with an error naming what could not be found.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Layout:
    vision: str  # module path of the vision encoder
    projector: str  # module path of the connector / projector
    blocks: str  # module path of the LLM's list of transformer blocks
    # More connector modules, trained and counted with the projector (Qwen3-VL's DeepStack mergers, which project
    # intermediate vision features into the LLM as its merger projects the last ones)
    more_projectors: tuple[str, ...] = ()
    # What ``apply_scope`` unfroze inside the blocks (whole blocks, or the submodules ``scope.modules`` chose): what a
    # method that re-decides what trains (LoRA's adapters) must stay within. Empty on a layout no scope was applied to.
    scoped: tuple[str, ...] = ()

    @property
    def projectors(self) -> tuple[str, ...]:
        return (self.projector, *self.more_projectors)


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
MORE_CONNECTOR_NAMES = ("visual.deepstack_merger_list",)
LANGUAGE_NAMES = ("language_model", "text_model")

# Architectures read by discovery and checked on their reference configs (built on the meta device): `mmtune ls
# architectures` prints their scope. Tiny models of LLaVA, Qwen2-VL, Idefics3 and of the first four here run the
# pipeline end to end in the tests.
DISCOVERED = ("qwen3_vl", "gemma3", "internvl", "llava_onevision", "mistral3", "lfm2_vl", "glm4v")


def discover_layout(model: nn.Module) -> Layout:
    """The layout of an image-text-to-text model not in ``LAYOUTS``, from the names of its parts."""
    inner = "model" if isinstance(getattr(model, "model", None), nn.Module) else ""
    base = model.get_submodule(inner) if inner else model
    prefix = f"{inner}." if inner else ""

    def first(names) -> str | None:
        return next((prefix + name for name in names if _has(base, name)), None)

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
    more = tuple(prefix + name for name in MORE_CONNECTOR_NAMES if _has(base, name))
    return Layout(vision, connector, blocks, more)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def layout_of(model: nn.Module) -> Layout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return LAYOUTS[model_type] if model_type in LAYOUTS else discover_layout(model)


def block_names(model: nn.Module, layout: Layout, last_n: int) -> list[str]:
    """Module paths of the last ``last_n`` LLM blocks, e.g. ``model.language_model.layers.30``."""
    blocks = model.get_submodule(layout.blocks)
    if last_n < 0 or last_n > len(blocks):
        raise ValueError(f"scope.last_n_blocks={last_n}, but the LLM has {len(blocks)} blocks")
    return [f"{layout.blocks}.{i}" for i in range(len(blocks) - last_n, len(blocks))]


def apply_scope(model: nn.Module, train_projector: bool = True, last_n_blocks: int = 2, full: bool = False,
                layers: str | None = None, modules: list[str] | tuple[str, ...] = (),
                train_vision: bool = False) -> Layout:
    """Freeze everything, then unfreeze the projector and the chosen LLM blocks — the last ``last_n_blocks``, or the
    blocks ``layers`` names (``"28-31"``, ``"0-3,30,31"``) — and, if ``modules`` names some (``attention``, ``mlp``,
    ``norm`` or submodule names like ``q_proj``), only those parts of them; ``train_vision`` also unfreezes the vision
    tower (``full``: train everything)."""
    layout = layout_of(model)
    model.requires_grad_(full)
    if full:
        return dataclasses.replace(layout, scoped=(layout.blocks,))
    if train_projector:
        for projector in layout.projectors:
            _unfreeze(model.get_submodule(projector))
    if train_vision:
        _unfreeze(model.get_submodule(layout.vision))
    names = block_names(model, layout, last_n_blocks) if layers is None else \
        [f"{layout.blocks}.{i}" for i in block_indices(layers, len(model.get_submodule(layout.blocks)))]
    scoped: list[str] = []
    for name in names:
        block = model.get_submodule(name)
        if not modules:
            _unfreeze(block)
            scoped.append(name)
            continue
        chosen = [(child_name, child) for child_name, child in block.named_modules()
                  if child_name and module_matches(child_name, modules)]
        if not chosen:
            available = sorted({n.rsplit(".", 1)[-1] for n, _ in block.named_modules() if n})
            raise ValueError(f"scope.modules={list(modules)} matches nothing in {name}; its submodules: "
                             f"{', '.join(available)} (or the groups {', '.join(MODULE_GROUPS)})")
        for child_name, child in chosen:
            _unfreeze(child)
            scoped.append(f"{name}.{child_name}")
    return dataclasses.replace(layout, scoped=tuple(scoped))


def apply_scope_config(model: nn.Module, scope) -> Layout:
    """``apply_scope`` with a run's ``scope`` config section."""
    return apply_scope(model, scope.train_projector, scope.last_n_blocks, scope.full, scope.layers, scope.modules,
                       scope.train_vision)


# scope.modules' groups: a block's submodule is in a group if one part of its path is one of these names.
MODULE_GROUPS = {
    "attention": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "feed_forward", "ffn"),
    "norm": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
             "norm", "ln_1", "ln_2", "layer_norm1", "layer_norm2"),
}


def module_matches(path: str, wanted) -> bool:
    """Whether a block's submodule path (``self_attn.q_proj``) is one of ``wanted``: a group of ``MODULE_GROUPS``
    or the name of a submodule on its path."""
    parts = path.split(".")
    return any(part in MODULE_GROUPS.get(name, (name,)) for name in wanted for part in parts)


def block_indices(spec: str, count: int) -> list[int]:
    """``"28-31"`` / ``"0-3,30,31"`` → sorted block indices, each checked against the ``count`` blocks."""
    indices: set[int] = set()
    for piece in str(spec).replace(" ", "").split(","):
        try:
            first, _, last = piece.partition("-")
            low, high = int(first), int(last) if last else int(first)
        except ValueError:
            raise ValueError(f"scope.layers={spec!r}: {piece!r} is not a block index or a range like 28-31") from None
        if not 0 <= low <= high < count:
            raise ValueError(f"scope.layers={spec!r}: {piece!r} is outside the LLM's blocks 0-{count - 1}")
        indices.update(range(low, high + 1))
    return sorted(indices)


def _unfreeze(module: nn.Module) -> None:
    """Make a module's floating-point parameters trainable (quantized storage — QLoRA's 4-bit weights — stays
    frozen: LoRA adapters train beside it)."""
    for param in module.parameters():
        if param.is_floating_point():
            param.requires_grad_(True)


def part_of(name: str, layout: Layout) -> str:
    """Which part a parameter name belongs to (works on PEFT-wrapped names too)."""
    dotted = "." + name
    if any("." + projector + "." in dotted for projector in layout.projectors):
        return "projector"
    if "." + layout.vision + "." in dotted:
        return "vision"
    if "." + layout.blocks + "." in dotted:
        return "llm_blocks"
    return "other"


def parameter_groups(model: nn.Module, layout: Layout, lr_blocks: float, lr_projector: float,
                     weight_decay: float = 0.0, lr_vision: float | None = None) -> list[dict]:
    """Optimizer groups: the projector and the vision tower at their own learning rates (the vision tower's defaults
    to the projector's), everything else trainable at ``lr_blocks``."""
    projector, vision, rest = [], [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = part_of(name, layout)
            (projector if part == "projector" else vision if part == "vision" else rest).append(param)
    groups = []
    if rest:
        groups.append({"params": rest, "lr": lr_blocks, "weight_decay": weight_decay, "name": "llm_blocks"})
    if projector:
        groups.append({"params": projector, "lr": lr_projector, "weight_decay": weight_decay, "name": "projector"})
    if vision:
        groups.append({"params": vision, "lr": lr_vision if lr_vision is not None else lr_projector,
                       "weight_decay": weight_decay, "name": "vision"})
    if not groups:
        raise ValueError("nothing to train: the scope leaves no trainable parameter")
    return groups


def scope_summary(model: nn.Module, layout: Layout) -> str:
    """A small table: trainable / total parameters per part."""
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        row = counts.setdefault(part_of(name, layout), [0, 0])
        size = getattr(param, "ds_numel", param.numel())  # DeepSpeed ZeRO-3 loads a parameter partitioned
        row[1] += size
        if param.requires_grad:
            row[0] += size
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
