"""lora: which layers get adapters — the scope's choice, never more."""

import pytest

from mmtune.methods.lora import Lora, LoraMethodConfig, lora_targets
from mmtune.models.scope import apply_scope, layout_of
from mmtune.models.tiny import build_tiny


def _adapted(model) -> set[str]:
    return {name.split("layers.", 1)[1].rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters()
            if ".lora_A." in name}


def test_adapters_stay_inside_the_modules_the_scope_chose():
    """scope.modules=[attention]: adapters on the attention projections of the last 2 blocks, none on the MLP."""
    model, _ = build_tiny("llava")
    layout = apply_scope(model, last_n_blocks=2, modules=["attention"])
    adapted = _adapted(Lora(LoraMethodConfig()).prepare_model(model, layout))
    assert adapted == {f"{block}.self_attn.{name}" for block in (2, 3) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}


def test_without_modules_every_target_of_the_scope_blocks_gets_one():
    model, _ = build_tiny("llava")
    layout = apply_scope(model, layers="1")
    adapted = _adapted(Lora(LoraMethodConfig()).prepare_model(model, layout))
    assert {name.split(".", 1)[0] for name in adapted} == {"1"} and len(adapted) == 7


def test_a_layout_no_scope_was_applied_to_skips_layers_the_user_froze():
    """A user's own Trainer (layout_of, no scope): a frozen MLP in a trainable block gets no adapter."""
    model, _ = build_tiny("llava")
    apply_scope(model, last_n_blocks=1)
    model.model.language_model.layers[3].mlp.requires_grad_(False)
    targets = lora_targets(model, layout_of(model), LoraMethodConfig().target_modules)
    assert targets and not any(".mlp." in t for t in targets)


def test_targets_outside_the_chosen_modules_are_named_in_the_error():
    model, _ = build_tiny("llava")
    layout = apply_scope(model, last_n_blocks=1, modules=["norm"])
    with pytest.raises(ValueError, match="scope.modules chooses"):
        lora_targets(model, layout, ["q_proj"])
