"""Padding-free forwards (``data.padding_free``): a padded batch's rows concatenated into one sequence for the model.

The collator still builds the padded batch every method reads (labels, per-row masks, sub-batches); only the model
sees the rows without their padding: one row of every record's tokens, positions restarting at each record (Qwen-VL's
multimodal rotary positions too: the model's own ``get_rope_index``, record by record) and no attention mask, from
which transformers builds attention inside each record (flash-attention's variable-length kernels on a GPU; on CPU,
SDPA or eager with the equivalent block-diagonal mask). The logits come back in the padded layout (zeros where no
loss reads them), so the losses — and every method — are the padded batch's to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtune.data.collate import IGNORE_INDEX, IMAGE_INPUTS, KEEP, PADDING_FREE  # noqa: F401 — PADDING_FREE: also here
from mmtune.engine import innermost


@dataclass
class Packing:
    """Where the packed model's logits go in the padded layout."""

    real: torch.Tensor  # [B, W] bool: the positions holding a token
    rows: torch.Tensor | None = None  # with logits_to_keep: each packed logit's row ...
    columns: torch.Tensor | None = None  # ... and its index among the kept positions
    kept: int = 0  # how many positions the padded batch keeps


def pack(inputs: dict, labels: torch.Tensor, rope_index=None) -> tuple[dict, Packing]:
    """The model inputs of a right-padded batch as one padding-free row, and where its logits go back.

    ``rope_index``: the model's ``get_rope_index`` (Qwen2/2.5/3-VL), called on the padded batch so that each record's
    multimodal positions are exactly the padded forward's; None: positions ``0 … length − 1`` per record.
    With ``logits_to_keep`` (``train.target_logits``), the head runs on each record's own target positions only (the
    padded batch keeps the union of all rows' targets in every row)."""
    real = inputs["attention_mask"].bool()
    size, width = real.shape
    lengths = real.sum(dim=1)
    steps = torch.arange(width, device=real.device)
    if not bool((real == (steps < lengths[:, None])).all()):
        raise ValueError("data.padding_free needs right-padded rows (tokens first, then padding)")
    packed = {}
    for key, value in inputs.items():
        if key in ("attention_mask", "position_ids", KEEP):
            continue
        per_token = torch.is_tensor(value) and value.dim() == 2 and value.shape == real.shape
        packed[key] = value[real].unsqueeze(0) if per_token and key not in IMAGE_INPUTS else value
    text = steps.expand(size, width)[real].unsqueeze(0)  # restarting at 0 for every record
    positions = text
    if rope_index is not None:
        if inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None:
            three, _ = rope_index(input_ids=inputs["input_ids"], mm_token_type_ids=inputs.get("mm_token_type_ids"),
                                  image_grid_thw=inputs.get("image_grid_thw"),
                                  video_grid_thw=inputs.get("video_grid_thw"), attention_mask=real.long())
            three = three[:, real].unsqueeze(1)
        else:  # text only: the model's own positions are the text positions on all three axes
            three = text.unsqueeze(0).expand(3, 1, -1)
        # Qwen-VL's packed form: the text positions first (they mark where records start), then the three axes
        positions = torch.cat([text.unsqueeze(0), three.to(text.dtype)], dim=0)
    packed["position_ids"] = positions
    packed["use_cache"] = False  # transformers reads packed positions only where no cache is built
    packing = Packing(real=real)
    kept = inputs.get(KEEP)
    if kept is not None:
        kept = kept.to(real.device)
        targets = labels[:, 1:].to(real.device)[:, kept] != IGNORE_INDEX  # [B, K]: which kept positions are targets
        rows, columns = targets.nonzero(as_tuple=True)
        starts = torch.cumsum(lengths, dim=0) - lengths
        packed[KEEP] = starts[rows] + kept[columns]
        packing = Packing(real=real, rows=rows, columns=columns, kept=kept.numel())
    return packed, packing


def unpack(logits: torch.Tensor, packing: Packing) -> torch.Tensor:
    """The packed forward's logits ``[1, positions, V]`` in the padded batch's layout: ``[B, W, V]``, or ``[B, K, V]``
    over the kept positions; zeros where no loss reads them (padding, another row's targets)."""
    size = packing.real.shape[0]
    if packing.rows is None:
        out = logits.new_zeros(size, packing.real.shape[1], logits.shape[-1])
        out[packing.real] = logits[0]
        return out
    out = logits.new_zeros(size, packing.kept, logits.shape[-1])
    out[packing.rows, packing.columns] = logits[0]
    return out


def rope_index_of(model):
    """The model's ``get_rope_index`` (Qwen-VL's multimodal positions) through DDP, DeepSpeed, PEFT and compile
    wrappers; None for a model with 1-D positions."""
    inner = innermost(model)
    for candidate in (inner, getattr(inner, "model", None)):
        if callable(getattr(candidate, "get_rope_index", None)):
            return candidate.get_rope_index
    return None


# The model types whose padding-free forward equals the padded one (tests/data/test_padding_free.py on each tiny
# architecture; llava_next, qwen2_5_vl and smolvlm run the language-model and position code of one tested there).
EXACT = {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm",
         "internvl"}
WHY_NOT = {
    "gemma3": "Gemma 3 lets an image's tokens attend to each other both ways; on its sliding-window layers transformers "
              "lays that overlay over the packed row before restarting the positions, so records after the first "
              "attend wrongly (measured: 1e-2 off the padded loss)",
}


def padding_free_refusal(model) -> str | None:
    """Why ``data.padding_free`` can't train ``model`` exactly (None: it can)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type in EXACT:
        return None
    reason = WHY_NOT.get(model_type, f"mmtune has not checked that a packed {model_type} forward equals the padded "
                                     "one (checked: " + ", ".join(sorted(EXACT)) + ")")
    return f"data.padding_free: {reason}; train with padded batches (data.group_by_length: true pads less)"
