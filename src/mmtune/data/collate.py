"""Records → model batches: chat template, prompt masking (labels = -100), padding, pixel values.

The prompt (with its image) goes through the model's own processor, which expands the image
placeholder into the right number of image tokens; the answer is tokenized on its own and appended,
so the boundary between what is masked and what is learned is exact for every tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmtune.data.records import Record, RecordError

IGNORE_INDEX = -100
_MARKER = "MMTUNEANSWERMARKER"


def user_message(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def prompt_text(processor, prompt: str) -> str:
    return processor.apply_chat_template(user_message(prompt), add_generation_prompt=True, tokenize=False)


def answer_affixes(processor) -> tuple[str, str]:
    """What the chat template puts around an assistant answer (e.g. ``" "`` and ``"</s>"``)."""
    user = user_message("question")
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(
        user + [{"role": "assistant", "content": [{"type": "text", "text": _MARKER}]}], tokenize=False,
    )
    if not full.startswith(prompt) or _MARKER not in full[len(prompt):]:
        raise ValueError("the processor's chat template does not render the assistant answer after the "
                         "generation prompt; mmtune cannot find where the answer starts")
    rest = full[len(prompt):]
    start = rest.index(_MARKER)
    return rest[:start], rest[start + len(_MARKER):].rstrip()


def load_image(record: Record) -> Image.Image:
    try:
        with Image.open(record.image) as image:
            return image.convert("RGB")
    except Exception as error:
        raise RecordError(f"record {record.id!r}: cannot read image {record.image}: {error}") from error


class RecordDataset(Dataset):
    """Records with their images loaded lazily (images are decoded in the data loader, not up front)."""

    def __init__(self, records: list[Record]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {"record": record, "image": load_image(record)}


@dataclass
class TrainCollator:
    """Batch of training samples: model inputs + ``labels`` + ``open_mask`` (open-response samples)."""

    processor: object
    max_length: int = 2048

    def __post_init__(self):
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.answer_prefix, self.answer_suffix = answer_affixes(self.processor)

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(self.answer_prefix + answer + self.answer_suffix, add_special_tokens=False)["input_ids"]

    def __call__(self, samples: list[dict]) -> dict:
        records: list[Record] = [s["record"] for s in samples]
        prompts = [prompt_text(self.processor, r.prompt) for r in records]
        encoded = self.processor(text=prompts, images=[s["image"] for s in samples], padding=True,
                                 padding_side="right", return_tensors="pt")
        prompt_ids = encoded.pop("input_ids")
        prompt_mask = encoded.pop("attention_mask")
        per_token = {k: encoded.pop(k) for k in list(encoded) if torch.is_tensor(encoded[k])
                     and encoded[k].shape[:2] == prompt_ids.shape}
        rows, labels, extras = [], [], {k: [] for k in per_token}
        for i, record in enumerate(records):
            n = int(prompt_mask[i].sum())
            answer = self.answer_ids(record.target)
            if n + len(answer) > self.max_length:
                where = f"{record.source}: " if record.source else ""
                raise RecordError(f"{where}record {record.id!r} (task {record.task}): prompt + answer is "
                                  f"{n + len(answer)} tokens, longer than data.max_length={self.max_length}")
            rows.append(prompt_ids[i, :n].tolist() + answer)
            labels.append([IGNORE_INDEX] * n + answer)
            for key, value in per_token.items():
                extras[key].append(value[i, :n].tolist() + [0] * len(answer))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id

        def padded(seqs, value):
            return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

        batch = dict(encoded)
        batch["input_ids"] = padded(rows, pad)
        batch["attention_mask"] = padded([[1] * len(r) for r in rows], 0)
        batch["labels"] = padded(labels, IGNORE_INDEX)
        for key, seqs in extras.items():
            batch[key] = padded(seqs, 0)
        batch["open_mask"] = torch.tensor([r.kind == "open" for r in records])
        return batch


@dataclass
class GenerationCollator:
    """Left-padded prompts for batched greedy generation."""

    processor: object

    def __call__(self, samples: list[dict]) -> dict:
        records = [s["record"] for s in samples]
        prompts = [prompt_text(self.processor, r.prompt) for r in records]
        batch = dict(self.processor(text=prompts, images=[s["image"] for s in samples], padding=True,
                                    padding_side="left", return_tensors="pt"))
        batch["records"] = records
        return batch


MODEL_INPUT_EXCLUDE = ("labels", "open_mask", "records")


def model_inputs(batch: dict) -> dict:
    """The part of a batch the model's ``forward`` takes."""
    return {k: v for k, v in batch.items() if k not in MODEL_INPUT_EXCLUDE}


def subset_batch(batch: dict, rows: torch.Tensor) -> dict:
    """The batch restricted to ``rows`` (a 1-D index tensor), for every processor layout.

    Per-sample tensors are indexed on their first dimension. Qwen2-VL style processors flatten all
    images' patches into one ``pixel_values`` tensor; those are sliced with ``image_grid_thw``.
    """
    size = batch["input_ids"].shape[0]
    out = {}
    grid = batch.get("image_grid_thw")
    for key, value in batch.items():
        if key == "pixel_values" and grid is not None:
            counts = grid.prod(dim=-1).tolist()
            starts = [0]
            for count in counts:
                starts.append(starts[-1] + count)
            out[key] = torch.cat([value[starts[i]:starts[i + 1]] for i in rows.tolist()])
        elif torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value[rows.to(value.device)]
        elif key == "records":
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out
