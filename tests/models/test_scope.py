"""Layouts (mmtune.models.scope): the table, and discovery for any image-text-to-text model whose parts it finds."""

import pytest
import torch
from torch import nn

from mmtune.cli import main
from mmtune.models.scope import DISCOVERED, LAYOUTS, discover_layout, reference_scopes


def test_discovery_reproduces_the_table_and_reads_todays_architectures(capsys):
    """Built on the meta device from each type's reference config: discovery finds what the table says for the six
    known layouts, and a vision encoder, a connector and the blocks for Qwen3-VL, Gemma 3, InternVL,
    LLaVA-OneVision, Mistral 3, LFM2-VL and GLM-4V; the scope trains the connector and the last 2 blocks."""
    from transformers import CONFIG_MAPPING, AutoModelForImageTextToText

    rows = {row["name"]: row for row in reference_scopes()}
    assert set(rows) == set(LAYOUTS) | set(DISCOVERED)
    for name, layout in LAYOUTS.items():
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(CONFIG_MAPPING[name]())
        assert discover_layout(model) == layout, name
    for name in DISCOVERED:
        row = rows[name]
        assert row["source"] == "discovered" and 0 < row["trainable"] < row["parameters"] / 5, name
    assert rows["llava"]["parameters"] == 7_062_902_784  # LLaVA-1.5-7B's shape
    assert main(["ls", "architectures"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in rows) and "discovered" in out


def test_a_model_whose_parts_cannot_be_found_names_them():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = nn.Linear(2, 2)
            self.language_model = nn.Linear(2, 2)  # no .layers

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    with pytest.raises(ValueError, match=r"could not find its connector, language-model blocks"):
        discover_layout(Toy())


@pytest.fixture(scope="module")
def tiny_llava():
    from mmtune.models.tiny import build_tiny

    return build_tiny("llava", hidden_size=32, num_layers=4)[0]


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_layer_ranges_module_types_and_the_vision_tower(tiny_llava):
    from mmtune.models.scope import apply_scope, parameter_groups

    model = tiny_llava
    apply_scope(model, last_n_blocks=2)
    last_two = trainable(model)
    apply_scope(model, layers="2-3")
    assert trainable(model) == last_two
    apply_scope(model, layers="0,3", train_projector=False)
    assert {n.split("layers.")[1].split(".")[0] for n in trainable(model)} == {"0", "3"}
    apply_scope(model, layers="3", modules=["attention"], train_projector=False)
    names = trainable(model)
    assert names and all(".layers.3.self_attn." in n for n in names)
    apply_scope(model, layers="3", modules=["q_proj", "mlp"], train_projector=False)
    assert {n.split(".layers.3.")[1].split(".")[0] for n in trainable(model)} == {"self_attn", "mlp"}
    assert all("q_proj" in n for n in trainable(model) if "self_attn" in n)
    with pytest.raises(ValueError, match="matches nothing.*q_proj"):
        apply_scope(model, modules=["attn_out"])
    with pytest.raises(ValueError, match="outside the LLM's blocks 0-3"):
        apply_scope(model, layers="2-4")
    with pytest.raises(ValueError, match="not a block index"):
        apply_scope(model, layers="last")
    layout = apply_scope(model, train_vision=True)
    groups = {g["name"]: g for g in parameter_groups(model, layout, 1e-4, 1e-5, lr_vision=1e-6)}
    assert groups["vision"]["lr"] == 1e-6 and groups["projector"]["lr"] == 1e-5
    assert all(any(p is q for q in groups["vision"]["params"]) for p in model.model.vision_tower.parameters())


def test_other_toolkits_names_get_a_hint(tiny_config):
    from mmtune.config import ConfigError

    for key, hint in (("scope.freeze_vit=false", "scope.train_vision"), ("freeze_trainable_layers=2", "scope.last_n_blocks"),
                      ("scope.vit_lr=1e-5", "scope.lr_vision"), ("train.num_train_epochs=3", "train.epochs"),
                      ("use_dft_loss=true", "method.name: dft")):
        with pytest.raises(ConfigError, match=f"did you mean {hint}"):
            tiny_config(key)
    assert tiny_config("scope.layers=2-3", "scope.modules=[attention]").scope.layers == "2-3"
