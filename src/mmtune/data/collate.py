"""Records → model batches: chat template, prompt masking (labels = -100), padding, pixel values.

The prompt (with its image) goes through the model's own processor, which expands the image
placeholder into the right number of image tokens; the answer is tokenized on its own and appended,
so the boundary between what is masked and what is learned is exact for every tokenizer.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmtune.data.records import IMAGE_TOKEN, Record, RecordError

IGNORE_INDEX = -100
# The batch key of the positions whose logits a loss reads (train.target_logits): named as the models' forward
# argument, so the model computes its head there only (hidden states gathered at the targets, then the head).
KEEP = "logits_to_keep"
# The batch key by which the collator asks for a padding-free forward (data.padding_free; never passed to the model).
PADDING_FREE = "padding_free"
# The batch keys of a method's own batches (never passed to the model): the records with their images
# (``TrainCollator.keep_samples``), and each row's advantage in a GRPO rollout (NaN: a row trained by the cross-entropy).
SAMPLES = "samples"
ADVANTAGES = "advantages"
ROW_WEIGHTS = "row_weights"  # and its rows' weights in a sample-reduced loss (each record weighs the same)
# The image inputs of a blank image, on a text-only batch whose forward must run the vision tower all the same (sharded
# weights: another process's batch has images, and each module's forward gathers from every process): mmtune.losses
BLANK_IMAGE = "blank_image"
_MARKER = "MMTUNEANSWERMARKER"


def user_message(prompt: str, image: bool | int = True) -> list[dict]:
    """A user turn: ``image`` images (``True``: one) where the text's ``<image>`` placeholders stand, or before the
    text where it has none."""
    count = int(image)
    if count and prompt.count(IMAGE_TOKEN) == count:
        pieces = [piece.strip() for piece in prompt.split(IMAGE_TOKEN)]  # the template separates image and text
        content = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for piece in pieces[1:]:
            content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
        return [{"role": "user", "content": content}]
    return [{"role": "user", "content": [*[{"type": "image"}] * count, {"type": "text", "text": prompt}]}]


def has_system_slot(processor) -> bool:
    """Whether the processor's chat template renders a system message as one (before the first user turn, unlike a
    user or an assistant turn) — LLaVA-1.5's tiny template, for one, renders any other role as the assistant's."""
    cached = getattr(processor, "_mmtune_system_slot", None)
    if cached is not None:
        return cached
    marker, user = "MMTUNESYSTEMMARKER", user_message("question", 0)
    try:
        alone = processor.apply_chat_template(user, tokenize=False)
        with_system = processor.apply_chat_template(
            [{"role": "system", "content": [{"type": "text", "text": marker}]}, *user], tokenize=False)
        as_other = [processor.apply_chat_template([{"role": role, "content": [{"type": "text", "text": marker}]}],
                                                  tokenize=False) for role in ("user", "assistant")]
        start = len(os.path.commonprefix([alone, with_system]))  # what every rendering opens with (a BOS)
        added = with_system[start:len(with_system) - len(alone) + start]
        supported = with_system[start:].endswith(alone[start:]) and marker in added and \
            all(added != other[start:] and added != other for other in as_other)
    except Exception:  # noqa: BLE001 — a template that raises on a system role ("System role not supported")
        supported = False
    if not supported:
        warnings.warn(f"{type(processor).__name__}'s chat template has no system slot: a conversation's system "
                      "message is put before its first user turn's text", stacklevel=2)
    try:
        processor._mmtune_system_slot = supported  # asked once per processor
    except AttributeError:
        pass
    return supported


def assistant_message(answer: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def images_by_turn(record: Record) -> list[int]:
    """How many of the record's images each user turn shows, in order: as its ``<image>`` placeholders say (a
    conversation keeps its shape), or all in the first turn where the record places none."""
    turns = [turn["prompt"] for turn in record.history] + [record.prompt]
    placed = [turn.count(IMAGE_TOKEN) for turn in turns]
    if record.images and sum(placed) == len(record.images):
        return placed
    return [len(record.images)] + [0] * (len(turns) - 1)


def conversation(record: Record, upto: int | None = None, processor=None) -> list[dict]:
    """The chat messages of ``record`` up to the user turn of exchange ``upto`` (default: the last, the record's
    own prompt), each image in the user turn that places it (``images_by_turn``) and the system message in the
    template's system slot (before the first user turn's text where ``processor``'s template has none)."""
    exchanges = [(turn["prompt"], turn["answer"]) for turn in record.history] + [(record.prompt, None)]
    upto = len(exchanges) - 1 if upto is None else upto
    messages: list[dict] = []
    if record.system and processor is not None and has_system_slot(processor):
        messages.append({"role": "system", "content": [{"type": "text", "text": record.system}]})
    elif record.system:
        exchanges[0] = (f"{record.system}\n{exchanges[0][0]}", exchanges[0][1])
    counts = images_by_turn(record)
    for index, (prompt, answer) in enumerate(exchanges[:upto + 1]):
        messages += user_message(prompt, image=counts[index])
        if index < upto:
            messages += assistant_message(answer)
    return messages


def prompt_text(processor, prompt: str | Record) -> str:
    """The text the model sees before it answers: a prompt, or a whole record (its history and image included)."""
    messages = conversation(prompt, processor=processor) if isinstance(prompt, Record) else user_message(prompt)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def later_segments(processor, record: Record, prefix: str, suffix: str) -> list[tuple[str, str]]:
    """For a conversation: ``(user_text, answer)`` for every exchange after the first — the template's text between
    the previous answer's end and this answer's start (masked), and the answer (learned)."""
    if not record.history:
        return []
    answers = [turn["answer"] for turn in record.history] + [record.target]
    rendered = processor.apply_chat_template(conversation(record, 0, processor), add_generation_prompt=True,
                                             tokenize=False)
    segments = []
    for index in range(1, len(answers)):
        done = rendered + prefix + answers[index - 1] + suffix
        rendered = processor.apply_chat_template(conversation(record, index, processor), add_generation_prompt=True,
                                                 tokenize=False)
        if not rendered.startswith(done):
            where = f"{record.source}: " if record.source else ""
            raise RecordError(f"{where}record {record.id!r}: the processor's chat template does not render turn "
                              f"{index} after turn {index - 1}; mmtune cannot mask this conversation exactly")
        segments.append((rendered[len(done):], answers[index]))
    return segments


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


def load_image(record: Record) -> Image.Image | list[Image.Image] | None:
    """The record's image (None for a text-only record; a list for a record with several)."""
    images = []
    for path in record.images:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except Exception as error:
            raise RecordError(f"record {record.id!r}: cannot read image {path}: {error}") from error
    if isinstance(record.image, list):
        return images
    return images[0] if images else None


def record_from_row(row: dict) -> Record:
    """A record from a row of a Hugging Face ``datasets.Dataset`` holding mmtune's record fields (absent optional
    fields come back as None there)."""
    fields = {k: v for k, v in row.items() if v is not None or k == "image"}
    record = Record(**{k: v for k, v in fields.items() if k in Record.__dataclass_fields__})
    record.validate()
    return record


def as_sample(item: dict) -> dict:
    """``{"record", "image"}`` from a ``RecordDataset`` item, or from a record row of a ``datasets.Dataset`` (what
    TRL's trainers require), with its image loaded."""
    if "record" in item:
        return item
    record = record_from_row(item)
    return {"record": record, "image": load_image(record)}


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
    # batch["image_tokens"] (NRCA's diagnostic split, ``image_token_flags``): evaluation asks for it; training
    # batches skip it, as it tokenizes each caption a second time
    mark_image_tokens: bool = False
    # batch["logits_to_keep"]: the positions that predict a target (the model's head runs there only)
    target_logits: bool = False
    # batch["padding_free"]: the model sees the rows concatenated without their padding (mmtune.data.padding_free)
    padding_free: bool = False
    # batch["samples"]: the records with their images (GRPO samples answers to their prompts)
    keep_samples: bool = False

    def __post_init__(self):
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.answer_prefix, self.answer_suffix = answer_affixes(self.processor)

    def blank_image_inputs(self) -> dict[str, torch.Tensor]:
        """The processor's image inputs of one blank 64×64 image (``pixel_values`` and what goes with them), made once:
        what a text-only batch's forward runs the vision tower on where every process must run it (``BLANK_IMAGE``)."""
        if getattr(self, "_blank", None) is None:
            record = Record(id="blank", task="blank", kind="open", image="blank.png", prompt="", answers=[""])
            inputs = GenerationCollator(self.processor)([{"record": record, "image": Image.new("RGB", (64, 64))}])
            self._blank = {k: v for k, v in inputs.items() if torch.is_tensor(v) and k in IMAGE_INPUTS}
        return self._blank

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(self.answer_prefix + answer + self.answer_suffix, add_special_tokens=False)["input_ids"]

    def image_token_flags(self, record: Record) -> list[bool] | None:
        """For each token of the record's answer (``answer_ids``): whether it is part of one of the words the record
        names as depending on the image (``extra.image_words``: in a caption, the colours, shapes, counts; the rest
        is template). None where the record names none, has a history, or the tokenizer gives no offsets."""
        words = record.extra.get("image_words") if isinstance(record.extra, dict) else None
        if not words or record.history or not getattr(self.tokenizer, "is_fast", False):
            return None
        answer = record.target
        spans = [(m.start() + len(self.answer_prefix), m.end() + len(self.answer_prefix))
                 for word in words for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", answer, re.IGNORECASE)]
        offsets = self.tokenizer(self.answer_prefix + answer + self.answer_suffix, add_special_tokens=False,
                                 return_offsets_mapping=True)["offset_mapping"]
        return [any(start < end_span and end > start_span for start_span, end_span in spans) for start, end in offsets]

    def turn_by_turn(self, record: Record, images: list, keys: list[str]) -> tuple[list[int], list[int], dict, int]:
        """A conversation whose later turns show images: every user turn that shows one goes through the processor
        with its own images, the others through the tokenizer; the answers are appended as everywhere. Returns the
        row, its labels, its per-token extras (``keys``) and where the last image turn ends (before its answer)."""
        counts = images_by_turn(record)
        answers = [turn["answer"] for turn in record.history] + [record.target]
        first = self.processor.apply_chat_template(conversation(record, 0, self.processor),
                                                   add_generation_prompt=True, tokenize=False)
        turns = [first, *(text for text, _ in later_segments(self.processor, record, self.answer_prefix,
                                                             self.answer_suffix))]
        row, label, extras, taken, split = [], [], {key: [] for key in keys}, 0, 0
        for index, (text, answer) in enumerate(zip(turns, answers, strict=True)):
            shown = images[taken:taken + counts[index]]
            taken += counts[index]
            if shown or index == 0:
                encoded = self.processor(text=[text], images=[shown] if shown else None, add_special_tokens=index == 0,
                                         return_tensors="pt")
                ids = encoded["input_ids"][0].tolist()
                for key in keys:
                    extras[key] += encoded[key][0].tolist() if key in encoded else [0] * len(ids)
            else:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                for key in keys:
                    extras[key] += [0] * len(ids)
            target = self.answer_ids(answer)
            row, label = row + ids, label + [IGNORE_INDEX] * len(ids)
            split = len(row) if index == last_image_turn(record) else split
            row, label = row + target, label + target
            for key in keys:
                extras[key] += [0] * len(target)
        return row, label, extras, split

    def as_one_piece(self, record: Record, row: list[int], label: list[int], own: dict, split: int,
                     whole: list[int], whole_extras: dict) -> tuple[list[int], list[int], dict]:
        """The row with its part up to the last image turn replaced by the processor's one piece (``whole``), for a
        processor that sizes an image by the others shown with it (LLaVA-OneVision: several images are not tiled
        as one is): the text tokens of both agree, so the answers' labels carry over; else an error names it."""
        image_ids = image_token_ids(self.processor)
        mine = [(token, tag) for token, tag in zip(row[:split], label[:split], strict=True) if token not in image_ids]
        theirs = [j for j, token in enumerate(whole) if token not in image_ids]
        if [token for token, _ in mine] != [whole[j] for j in theirs]:
            where = f"{record.source}: " if record.source else ""
            raise RecordError(f"{where}record {record.id!r}: {type(self.processor).__name__} lays out this "
                              "conversation's images differently turn by turn than in one piece, and its text does "
                              "not line up; put its images in the first user turn")
        labels = [IGNORE_INDEX] * len(whole)
        for j, (_, tag) in zip(theirs, mine, strict=True):
            labels[j] = tag
        extras = {key: whole_extras[key] + own[key][split:] for key in own}
        return whole + row[split:], labels + label[split:], extras

    def assemble(self, image_inputs: dict, rows: list[list[int]], labels: list[list[int]], extras: dict[str, list],
                 records: list[Record], device: torch.device | None = None) -> dict:
        """A batch from its rows' token ids, labels and per-token extras (right-padded), the processor's image inputs
        for those rows, and what the losses and methods read of each row (target positions, open / image masks,
        tasks) — the collator's own batches and the ones a method builds (GRPO's rollouts) alike."""
        width = max(len(r) for r in rows)

        def padded(seqs, value):
            return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)

        batch = dict(image_inputs)
        batch["input_ids"] = padded(rows, self.tokenizer.pad_token_id)
        batch["attention_mask"] = padded([[1] * len(r) for r in rows], 0)
        batch["labels"] = padded(labels, IGNORE_INDEX)
        for key, seqs in extras.items():
            batch[key] = padded(seqs, 0)
        if self.target_logits:
            batch[KEEP] = target_positions(batch["labels"])
        if self.padding_free:
            batch[PADDING_FREE] = True
        batch["open_mask"] = torch.tensor([r.kind == "open" for r in records], device=device)
        batch["image_mask"] = torch.tensor([r.image is not None for r in records], device=device)
        batch["image_counts"] = torch.tensor([len(r.images) for r in records], device=device)
        tiles = pixel_counts(self.processor, batch)
        if tiles is not None:
            batch["pixel_counts"] = tiles.to(device) if device is not None else tiles
        batch["tasks"] = [r.task for r in records]  # for methods that need each task's loss (multi-task optimisation)
        return batch

    def check_length(self, record: Record, row: list[int]) -> None:
        if len(row) > self.max_length:
            where = f"{record.source}: " if record.source else ""
            raise RecordError(f"{where}record {record.id!r} (task {record.task}): prompt + answer is "
                              f"{len(row)} tokens, longer than data.max_length={self.max_length}")

    def __call__(self, samples: list[dict]) -> dict:
        samples = [as_sample(s) for s in samples]
        records: list[Record] = [s["record"] for s in samples]
        # The first user turn (with its image) goes through the processor, which expands the image placeholder.
        first = [processor_prompt(self.processor, r) for r in records]
        encoded = self.processor(text=first, images=batch_images(samples), padding=True, padding_side="right",
                                 return_tensors="pt")
        prompt_ids = encoded.pop("input_ids")
        prompt_mask = encoded.pop("attention_mask")
        per_token = {k: encoded.pop(k) for k in list(encoded) if torch.is_tensor(encoded[k])
                     and encoded[k].shape[:2] == prompt_ids.shape}
        rows, labels, extras = [], [], {k: [] for k in per_token}
        flags = [self.image_token_flags(r) if self.mark_image_tokens else None for r in records]
        images = batch_images(samples) or [[] for _ in records]
        for i, record in enumerate(records):
            n = int(prompt_mask[i].sum())
            if last_image_turn(record) > 0:  # images in later turns: each turn through the processor on its own
                row, label, own, split = self.turn_by_turn(record, images[i], list(per_token))
                whole = prompt_ids[i, :n].tolist()  # the processor's one piece, whose pixels the batch carries
                if not same_image_tokens(self.processor, row[:split], whole):
                    row, label, own = self.as_one_piece(record, row, label, own, split, whole,
                                                        {k: v[i, :n].tolist() for k, v in per_token.items()})
                for key in per_token:
                    extras[key].append(own[key])
                rows.append(row)
                labels.append(label)
                self.check_length(record, row)
                continue
            row, label = prompt_ids[i, :n].tolist(), [IGNORE_INDEX] * n
            first_answer = record.history[0]["answer"] if record.history else record.target
            answer = self.answer_ids(first_answer)
            row, label = row + answer, label + answer
            for user_text, later_answer in later_segments(self.processor, record, self.answer_prefix,
                                                          self.answer_suffix):
                user = self.tokenizer(user_text, add_special_tokens=False)["input_ids"]
                answer = self.answer_ids(later_answer)
                row, label = row + user + answer, label + [IGNORE_INDEX] * len(user) + answer
            self.check_length(record, row)
            rows.append(row)
            labels.append(label)
            for key, value in per_token.items():
                extras[key].append(value[i, :n].tolist() + [0] * (len(row) - n))
        batch = self.assemble(encoded, rows, labels, extras, records)
        if any(f is not None for f in flags):  # where the task says which answer tokens depend on the image
            width = batch["input_ids"].shape[1]
            batch["image_tokens"] = torch.tensor(
                [[False] * (len(row) - len(f or [])) + (f or []) + [False] * (width - len(row))
                 for row, f in zip(rows, flags, strict=True)], dtype=torch.bool)
        if self.keep_samples:
            batch[SAMPLES] = samples
        return batch


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits predict a target token of some row (logits at t predict labels at t+1), sorted."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (through a PEFT wrapper, to the model it wraps)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def image_token_ids(processor) -> set[int]:
    """The ids the processor writes for image content (the image token; and Qwen-VL's vision start / end)."""
    ids = {getattr(processor, "image_token_id", None)}
    tokenizer = getattr(processor, "tokenizer", processor)
    for name in ("<|vision_start|>", "<|vision_end|>", "<fake_token_around_image>", "<global-img>", "<img>",
                 "</img>", "<start_of_image>", "<end_of_image>"):
        token = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
        ids.add(token)
    return {i for i in ids if i is not None}


def same_image_tokens(processor, row: list[int], whole: list[int]) -> bool:
    """Whether a turn-by-turn row holds the image tokens the processor gave the conversation in one piece."""
    image_id = getattr(processor, "image_token_id", None)
    return image_id is None or row.count(image_id) == whole.count(image_id)


def pixel_counts(processor, batch: dict) -> torch.Tensor | None:
    """Rows of ``pixel_values`` per record where an image takes a varying number of them (InternVL's tiles: a wide
    image is cut into several, plus a thumbnail), from the image tokens of each row; None for the other layouts (one
    entry per image or per record, or Qwen-VL's patches that ``image_grid_thw`` describes)."""
    pixels = batch.get("pixel_values")
    if pixels is None or "image_grid_thw" in batch or pixels.shape[0] == int(batch["image_counts"].sum()):
        return None
    if pixels.dim() == 5 and "pixel_attention_mask" in batch:  # Idefics3: [records, images, C, H, W]
        return None
    image_token = getattr(processor, "image_token_id", None)
    tokens = (batch["input_ids"] == image_token).sum(dim=1) if image_token is not None else None
    if tokens is None or int(tokens.sum()) % pixels.shape[0]:
        raise ValueError(f"{type(processor).__name__}: {pixels.shape[0]} pixel_values entries for "
                         f"{int(batch['image_counts'].sum())} images, and the image tokens do not say which belong "
                         "to which record; mmtune cannot split this batch per record")
    return tokens // (int(tokens.sum()) // pixels.shape[0])


def processor_prompt(processor, record: Record) -> str:
    """What goes through the processor in one piece: the first user turn (a single-turn record's whole prompt) — or,
    where a later turn shows an image, the conversation up to that turn (the processor lays out every image)."""
    if not record.history:
        return prompt_text(processor, record)
    return processor.apply_chat_template(conversation(record, last_image_turn(record), processor),
                                         add_generation_prompt=True, tokenize=False)


def last_image_turn(record: Record) -> int:
    """The index of the last user turn that shows an image (0 where none does: the first turn)."""
    counts = images_by_turn(record)
    return max((index for index, count in enumerate(counts) if count), default=0)


def batch_images(samples: list[dict]):
    """The images of a batch for the processor: one list per record (empty for text-only; what every processor takes,
    and Gemma 3's requires), which the processors flatten in order; None when no record has one."""
    images = [s["image"] for s in samples]
    if all(image is None for image in images):
        return None
    return [image if isinstance(image, list) else [image] if image is not None else [] for image in images]


@dataclass
class GenerationCollator:
    """Left-padded prompts for batched greedy generation."""

    processor: object

    def __call__(self, samples: list[dict]) -> dict:
        samples = [as_sample(s) for s in samples]
        records = [s["record"] for s in samples]
        prompts = [prompt_text(self.processor, r) for r in records]
        batch = dict(self.processor(text=prompts, images=batch_images(samples), padding=True,
                                    padding_side="left", return_tensors="pt"))
        batch["records"] = records
        return batch


MODEL_INPUT_EXCLUDE = ("labels", "open_mask", "image_mask", "image_counts", "pixel_counts", "image_tokens", "records",
                       "tasks", PADDING_FREE, SAMPLES, ADVANTAGES, ROW_WEIGHTS, BLANK_IMAGE)


def model_inputs(batch: dict) -> dict:
    """The part of a batch the model's ``forward`` takes."""
    return {k: v for k, v in batch.items() if k not in MODEL_INPUT_EXCLUDE}


# What the processors add for images (one entry per image or per row's images): absent from a batch without images.
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask", "batch_num_images",
                "pixel_counts")


def subset_batch(batch: dict, rows: torch.Tensor) -> dict:
    """The batch restricted to ``rows`` (a 1-D index tensor), for every processor layout.

    Per-sample tensors are indexed on their first dimension. Qwen2-VL style processors flatten all
    images' patches into one ``pixel_values`` tensor; those are sliced with ``image_grid_thw``. With text-only or
    several-image records in the batch (``image_counts``), per-image tensors (one entry per image, not per row) follow
    the rows' images.
    """
    size = batch["input_ids"].shape[0]
    out = {}
    grid = batch.get("image_grid_thw")
    counts = batch.get("image_counts")
    if counts is None and batch.get("image_mask") is not None:
        counts = batch["image_mask"].long()
    row_list = rows.tolist()
    if counts is not None and not bool((counts == 1).all()):
        images = _entries(counts.tolist(), row_list)
    else:
        images = rows
    tiles = batch.get("pixel_counts")
    tile_rows = _entries(tiles.tolist(), row_list) if tiles is not None else None
    per_image = ("pixel_values", "image_grid_thw", "image_sizes")
    if counts is not None and int(counts[rows.to(counts.device)].sum()) == 0:
        # Rows without an image (text-only records): the batch the collator would make of them alone has no image
        # inputs at all — a vision tower given zero images fails (issue 36: EWC's one-record Fisher batches).
        batch = {k: v for k, v in batch.items() if k not in IMAGE_INPUTS}
    for key, value in batch.items():
        if key == "pixel_values" and grid is not None:
            out[key] = value[_entries(grid.prod(dim=-1).tolist(), images.tolist()).to(value.device)]
        elif key == "pixel_values" and tile_rows is not None:  # InternVL's tiles, per record
            out[key] = value[tile_rows.to(value.device)]
        elif key in per_image and torch.is_tensor(value) and images is not rows and \
                (value.shape[0] != size or key != "pixel_values" or value.dim() == 4 or "batch_num_images" in batch):
            # one entry per image (LLaVA's [images, C, H, W], LLaVA-OneVision's [images, views, C, H, W]);
            # Idefics3's [rows, images, C, H, W] is per row
            out[key] = value[images.to(value.device)]
        elif key == "image_grid_thw" and torch.is_tensor(value):
            out[key] = value[images.to(value.device)]
        elif key == "batch_num_images" and counts is not None:  # LLaVA-OneVision: images of each record that has any
            chosen = counts.to(value.device)[rows.to(value.device)]
            out[key] = chosen[chosen > 0].to(value.dtype)
        elif key == KEEP:  # positions, not rows: the union over the batch holds every subset's targets
            out[key] = value
        elif torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value[rows.to(value.device)]
        elif key in ("records", "tasks", SAMPLES):
            out[key] = [value[i] for i in row_list]
        else:
            out[key] = value
    return out


def _entries(counts: list[int], chosen: list[int]) -> torch.Tensor:
    """Indices of the entries of the ``chosen`` groups, where group ``i`` holds ``counts[i]`` consecutive entries."""
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    return torch.tensor([entry for i in chosen for entry in range(starts[i], starts[i + 1])], dtype=torch.long)
