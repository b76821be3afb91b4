"""Shared helpers for training tests."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from mmtune.data.synthetic import vocabulary
from mmtune.models.tiny import build_tiny


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForImageTextToText.from_pretrained(run / "final")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_weights(config) -> dict[str, torch.Tensor]:
    model, _ = build_tiny(config.model.tiny, words=vocabulary(), image_size=config.model.tiny_image_size,
                          hidden_size=config.model.tiny_hidden_size, num_layers=config.model.tiny_layers,
                          seed=config.train.seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def losses(run: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]  # evaluation rows (eval.every_steps) carry no loss


def trainable_names(weights: dict, last_n: int = 2, layers: int = 4) -> set[str]:
    blocks = tuple(f"language_model.layers.{i}." for i in range(layers - last_n, layers))
    return {n for n in weights if "multi_modal_projector" in n or any(b in n for b in blocks)}
