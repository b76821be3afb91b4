"""The one writer of a model folder — ``final/``, ``best/``, a merged model: a Hugging Face folder (weights, config,
processor, and the run config that made it), written into ``<folder>.partial`` and swapped in only when whole, so a kill
or a full disk never leaves a folder that looks finished, and an existing one is replaced only when asked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mmtune.checkpoint import removed_unless_whole
from mmtune.config import RunConfig, save_config
from mmtune.models.load import save_processor


def write_model_folder(model: torch.nn.Module, processor, folder: str | Path, *,
                       state_dict: dict[str, torch.Tensor] | None = None, run_config: RunConfig | None = None,
                       overwrite: bool = False, checkpoints: Path | None = None, what: str | None = None) -> Path:
    """``model.save_pretrained`` (with ``state_dict`` when given: gathered shards, or weights cast to ``model.dtype``;
    a PEFT model without one saves its adapter), its processor and ``mmtune_config.yaml`` (``run_config``) into
    ``folder``, atomically. An existing ``folder`` is refused unless ``overwrite``; a full disk is a ``DiskFullError``
    naming ``what`` was written and the newest complete checkpoint in ``checkpoints``."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass --overwrite to replace it")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with removed_unless_whole(partial, what or f"the model folder {folder}", checkpoints or folder.parent / "checkpoints"):
        model.save_pretrained(partial, state_dict=state_dict)
        save_processor(processor, partial)
        if run_config is not None:
            save_config(run_config, partial / "mmtune_config.yaml")
    replace_folder(partial, folder)
    return folder


def replace_folder(new: Path, folder: Path) -> None:
    """``folder`` ← ``new`` (a finished folder beside it): the old one is moved aside first and removed last, so at
    every moment one whole folder exists under a name a reader knows."""
    if not folder.exists():
        os.replace(new, folder)
        return
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)
