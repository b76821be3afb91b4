"""Task files read and written: JSONL records (``mmtune.data.record``, the one schema) or conversations
(``mmtune.data.messages``), each bad line named by file and line — or skipped and counted, where asked."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mmtune.data.messages import is_conversation, iter_conversation_file
from mmtune.data.record import (  # noqa: F401 — the schema's names, public here too (most callers import them here)
    CAPTION_PROMPT,
    IMAGE_TOKEN,
    KINDS,
    MC_INSTRUCTION,
    METRICS,
    SHORT_ANSWER_INSTRUCTION,
    Record,
    RecordError,
    _parse_line,
    _undecodable,
    check_image,
    checked_records,
    image_path,
    infer_metric,
    letter,
    metric_choice,
    multiple_choice_prompt,
)
from mmtune.files import atomic_write


def holds_conversations(path: Path) -> bool:
    """Whether a file holds conversations (``mmtune.data.messages``) rather than mmtune records: a JSON list (task files
    are JSONL), or JSONL whose first line is a conversation. Reads the first line only."""
    with path.open("rb") as handle:
        first = handle.readline().decode("utf-8", errors="replace").strip()
        while not first and handle.peek(1):
            first = handle.readline().decode("utf-8", errors="replace").strip()
    if first.startswith("["):
        return True
    try:
        return is_conversation(json.loads(first))
    except json.JSONDecodeError:
        return False


def iter_records(path: str | Path, skip_bad_records: bool = False, check_images: bool = True,
                 skipped: list[str] | None = None) -> Iterator[Record]:
    """Stream records from a JSONL task file — or a JSON / JSONL file of conversations (``messages`` + ``images``,
    ``mmtune.data.messages``); bad lines raise ``RecordError`` or, if skipping, are noted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    if holds_conversations(path):
        yield from iter_conversation_file(path, None, {}, skip_bad_records, skipped, check_images)
        return

    def candidates() -> Iterator[tuple[str, Callable[[], Record]]]:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    yield f"{path}:{number}", functools.partial(_undecodable, error)
                    continue
                if line.strip():
                    yield f"{path}:{number}", functools.partial(_parse_line, line, path.parent)

    yield from checked_records(candidates(), skip_bad_records, check_images, skipped)


def read_records(path: str | Path, skip_bad_records: bool = False, check_images: bool = True,
                 skipped: list[str] | None = None) -> list[Record]:
    return list(iter_records(path, skip_bad_records, check_images, skipped))


def write_records(records: Iterable[Record], path: str | Path, overwrite: bool = False) -> int:
    """Write a JSONL task file with image paths relative to it; refuses to replace a file unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0

    def write(handle) -> None:
        nonlocal count
        for record in records:
            handle.write(json.dumps(record.to_json(path.parent.resolve()), ensure_ascii=False) + "\n")
            count += 1

    atomic_write(path, write)
    return count
