"""The one record schema every mmtune command reads and writes, stored as JSONL task files.

A record is one (image, prompt, answers) sample of one task. ``kind`` says whether the task is
open-response (captions, free-form answers: what NRCA protects) or fixed-choice (lettered options).
``answers[0]`` is the training target; all of ``answers`` are the references for evaluation.
Instruction data also holds conversations and text-only samples (the LLaVA-1.5 mix has both): ``history``
lists a conversation's earlier exchanges (``{"prompt", "answer"}``, trained on like the last one: loss on
every assistant turn), and ``image`` is null for a text-only record — or a list of paths for a record with several
images (in order, each where its ``<image>`` placeholder stands — in any user turn — or, where none is placed,
all before the first user turn's text; for processors that take several images per sample). ``system`` is a conversation's system message, rendered
in the chat template's system slot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from PIL import Image

from mmtune.config import METRICS  # noqa: F401 — the one list (config), public here too

KINDS = ("open", "choice")
IMAGE_TOKEN = "<image>"  # where an image stands in a user turn's text (none placed: all go before the first turn's)
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


class RecordError(ValueError):
    """A bad record: the message names the file, the line and what is wrong."""


@dataclass
class Record:
    id: str
    task: str
    kind: str
    image: str | list[str] | None  # None: a text-only record; a list: several images
    prompt: str
    answers: list[str]
    choices: list[str] | None = None
    answer_index: int | None = None
    metric: str | None = None  # optional: how evaluation scores this task (inferred when absent)
    extra: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # earlier exchanges of a conversation: {"prompt", "answer"}
    system: str | None = None  # a conversation's system message: the chat template's system slot
    source: ClassVar[str] = ""  # "file:line" it was read from (set by iter_records; not a field)

    @property
    def images(self) -> list[str]:
        """The record's image paths: none, one, or several."""
        if self.image is None:
            return []
        return list(self.image) if isinstance(self.image, list) else [self.image]

    @property
    def target(self) -> str:
        """The training target: the first reference answer."""
        return self.answers[0]

    def validate(self) -> None:
        """Type and consistency checks: a field of the wrong type would otherwise train or score silently wrong
        (a string ``answers`` is iterated as characters; ``True`` is the index 1)."""
        for name in ("id", "task", "prompt"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"'{name}' must be a non-empty string, got {value!r}"[:200])
        if isinstance(self.image, list):
            if not self.image or not all(isinstance(i, str) and i.strip() for i in self.image):
                raise ValueError(f"'image' as a list must hold one or more path strings, got {self.image!r}"[:200])
        elif self.image is not None and (not isinstance(self.image, str) or not self.image.strip()):
            raise ValueError(f"'image' must be a path string (or null for a text-only record, or a list of paths), "
                             f"got {self.image!r}"[:200])
        if not isinstance(self.history, list):
            raise ValueError(f"'history' must be a list of {{\"prompt\", \"answer\"}} exchanges, got {self.history!r}"[:200])
        for number, turn in enumerate(self.history):
            if not isinstance(turn, dict) or set(turn) != {"prompt", "answer"} or not all(
                    isinstance(turn[k], str) and turn[k].strip() for k in ("prompt", "answer")):
                raise ValueError(f"'history'[{number}] must be {{\"prompt\": text, \"answer\": text}}, got {turn!r}"[:200])
        if self.system is not None and (not isinstance(self.system, str) or not self.system.strip()):
            raise ValueError(f"'system' must be a non-empty string (or absent), got {self.system!r}"[:200])
        placed = sum(text.count(IMAGE_TOKEN) for text in [*(t["prompt"] for t in self.history), self.prompt])
        if placed not in (0, len(self.images)):
            raise ValueError(f"{placed} {IMAGE_TOKEN} placeholder(s) in the user turns for {len(self.images)} "
                             "image(s): place every image or none (unplaced images go before the first turn's text)")
        if self.kind not in KINDS:
            raise ValueError(f"'kind' is {self.kind!r}; must be one of {KINDS}")
        if not isinstance(self.answers, list) or not self.answers or \
                not all(isinstance(a, str) for a in self.answers) or not self.answers[0].strip():
            raise ValueError(f"no answer: 'answers' must be a non-empty list of strings, got {self.answers!r}"[:200])
        if self.choices is not None and (not isinstance(self.choices, list) or
                                         not all(isinstance(c, str) for c in self.choices)):
            raise ValueError(f"'choices' must be a list of strings, got {self.choices!r}"[:200])
        if self.answer_index is not None and (not isinstance(self.answer_index, int) or
                                              isinstance(self.answer_index, bool)):
            raise ValueError(f"'answer_index' must be an integer, got {self.answer_index!r}")
        if self.kind == "choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError("a 'choice' record needs at least two 'choices'")
            if self.answer_index is None or not 0 <= self.answer_index < len(self.choices):
                raise ValueError(f"'answer_index' {self.answer_index!r} is not an index into its {len(self.choices)} choices")
            expected = (letter(self.answer_index), self.choices[self.answer_index])
            if self.answers[0].strip() not in expected:
                raise ValueError(f"'answers' {self.answers[0]!r} disagrees with 'answer_index' {self.answer_index} "
                                 f"(expected {expected[0]!r} or {expected[1]!r})")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"'metric' is {self.metric!r}; must be one of {METRICS}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"'extra' must be a mapping, got {self.extra!r}"[:200])
        present = self.extra.get("present")
        if present is not None and not (isinstance(present, list) and all(isinstance(p, str) for p in present)):
            raise ValueError("'extra.present' (what the image holds, for the hallucination score) must be a list of "
                             f"strings, got {present!r}"[:200])

    def to_json(self, base_dir: Path | None = None) -> dict:
        data = asdict(self)
        if not data["extra"]:
            del data["extra"]
        for key in ("choices", "answer_index", "metric", "system"):
            if data[key] is None:
                del data[key]
        if not data["history"]:
            del data["history"]
        if base_dir is not None and self.image is not None:
            try:
                relative = [os.path.relpath(Path(i).resolve(), base_dir) for i in self.images]
                data["image"] = relative if isinstance(self.image, list) else relative[0]
            except ValueError:  # another drive on Windows
                pass
        return data


def letter(index: int) -> str:
    return chr(ord("A") + index)


def multiple_choice_prompt(question: str, choices: list[str], context: str | None = None,
                           instruction: str = MC_INSTRUCTION) -> str:
    """LLaVA-1.5 evaluation convention: context, question, "A. ..." options, then the instruction."""
    lines = []
    if context and context.strip():
        lines.append(f"Context: {context.strip()}")
    lines.append(question.strip())
    lines += [f"{letter(i)}. {choice}" for i, choice in enumerate(choices)]
    lines.append(instruction)
    return "\n".join(lines)


def metric_choice(records: list[Record]) -> tuple[str, str]:
    """How a task is scored, and why: the one metric its records declare (a task spec's ``metric`` is stamped on its
    records), else the rule — multiple choice → ``mc``; most records with ≥ 10 references (VQA annotators) → ``vqa``;
    a mean answer longer than 3 words → ``cider``; else ``exact``. Records that declare different metrics are an
    error: a task is scored with one."""
    declared = {r.metric for r in records if r.metric}
    if len(declared) > 1:
        task = records[0].task if records else "?"
        raise ValueError(f"task {task}: its records declare several metrics ({', '.join(sorted(declared))}); a task "
                         "is scored with one — set metric on its task spec or make its records agree")
    if declared:
        return declared.pop(), "declared"
    if any(r.kind == "choice" for r in records):
        return "mc", "inferred: multiple-choice records"
    if records and sum(len(r.answers) >= 10 for r in records) > len(records) / 2:
        return "vqa", "inferred: most records have ≥ 10 reference answers"
    mean_words = sum(len(r.target.split()) for r in records) / max(1, len(records))
    if mean_words > 3:
        return "cider", f"inferred: mean answer {mean_words:.1f} words > 3"
    return "exact", f"inferred: mean answer {mean_words:.1f} words ≤ 3"


def infer_metric(records: list[Record]) -> str:
    """How to score a task (``metric_choice``'s metric)."""
    return metric_choice(records)[0]


def image_path(path: str, base_dir: str | Path) -> str:
    """An image path as records hold it: relative paths taken from ``base_dir`` (the task file's or dataset's folder)."""
    return os.path.normpath(path if os.path.isabs(path) else Path(base_dir) / path)


def _parse_line(line: str, base_dir: Path) -> Record:
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("a record must be a JSON object")
    known = {"id", "task", "kind", "image", "prompt", "answers", "choices", "answer_index", "metric", "extra",
             "history", "system"}
    missing = {"id", "task", "kind", "image", "prompt", "answers"} - data.keys()
    if missing:
        raise ValueError(f"missing field(s) {sorted(missing)}")
    unknown = data.keys() - known
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; valid fields: {sorted(known)}")
    if isinstance(data["id"], int) and not isinstance(data["id"], bool):
        data["id"] = str(data["id"])
    if data["image"] is not None:
        paths = data["image"] if isinstance(data["image"], list) and data["image"] else [data["image"]]
        if not all(isinstance(path, str) for path in paths):
            raise ValueError(f"'image' must be a path string, a list of them, or null (text-only), got "
                             f"{data['image']!r}"[:200])
        resolved = [image_path(path, base_dir) for path in paths]
        data["image"] = resolved if isinstance(data["image"], list) else resolved[0]
    record = Record(**data)
    record.validate()
    return record


def check_image(path: str) -> None:
    """Decode the whole image now, so a missing, corrupt or truncated file fails at validation, not mid-training
    (the header alone — what ``verify`` reads — passes for a truncated JPEG)."""
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises many types for corrupt files
        raise ValueError(f"unreadable image {path}: {error}") from None


def checked_records(candidates: Iterable[tuple[str, Callable[[], Record]]], skip_bad_records: bool = False,
                    check_images: bool = True, skipped: list[str] | None = None) -> Iterator[Record]:
    """Records from ``(where, build)`` pairs (``build`` parses and validates one), checked as every task source is:
    unique ids and readable images. A bad one raises ``RecordError`` naming ``where``, or, if skipping, is noted."""
    seen: set[str] = set()
    for where, build in candidates:
        try:
            record = build()
            record.source = where
            if record.id in seen:
                raise ValueError(f"duplicate id {record.id!r}")
            if check_images:
                for image in record.images:
                    check_image(image)
        except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
            message = f"{where}: {error}"
            if not skip_bad_records:
                raise RecordError(message) from None
            if skipped is not None:
                skipped.append(message)
            continue
        seen.add(record.id)
        yield record


def _undecodable(error: UnicodeDecodeError) -> Record:
    raise ValueError(f"not UTF-8 text ({error})")
