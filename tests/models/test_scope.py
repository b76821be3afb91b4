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
