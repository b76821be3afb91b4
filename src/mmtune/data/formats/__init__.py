"""Converters from the public datasets' native layouts to mmtune records.

Each converter is a generator ``convert(root, split, **options) -> Iterator[Record]`` that streams the
annotation file and never opens an image (paths are resolved and their existence checked by
:func:`mmtune.data.formats.prepare`). ``FORMATS`` maps a format name to its converter and the layout it
expects (shown by ``mmtune data prepare --help``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mmtune.data.records import Record, RecordError


@dataclass(frozen=True)
class Format:
    convert: Callable[..., Iterator[Record]]
    layout: str
    splits: str


def _formats() -> dict[str, Format]:
    from mmtune.data.formats import gqa, iconqa, karpathy, llava, ocrvqa, scienceqa, textvqa, vqa

    return {
        "coco": Format(karpathy.convert_coco, karpathy.LAYOUT_COCO, "train (with restval) | val | test"),
        "flickr30k": Format(karpathy.convert_flickr30k, karpathy.LAYOUT_FLICKR, "train | val | test"),
        "scienceqa": Format(scienceqa.convert, scienceqa.LAYOUT, "train | val | test | minival | minitest"),
        "iconqa": Format(iconqa.convert, iconqa.LAYOUT, "train | val | test"),
        "okvqa": Format(vqa.convert, vqa.LAYOUT, "train | val"),
        "textvqa": Format(textvqa.convert, textvqa.LAYOUT, "train | val"),
        "gqa": Format(gqa.convert, gqa.LAYOUT, "train_balanced | val_balanced | testdev_balanced | ..."),
        "ocrvqa": Format(ocrvqa.convert, ocrvqa.LAYOUT, "train | val | test"),
        "llava": Format(llava.convert, llava.LAYOUT, "(ignored: the JSON file is the split)"),
    }


FORMAT_NAMES = ("coco", "flickr30k", "scienceqa", "iconqa", "okvqa", "textvqa", "gqa", "ocrvqa", "llava")


def get_format(name: str) -> Format:
    formats = _formats()
    if name not in formats:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMAT_NAMES)}")
    return formats[name]


def load_json(path: Path):
    import json

    if not path.is_file():
        raise FileNotFoundError(f"expected annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecordError(f"{path}: invalid JSON ({error})") from None


def prepare(format_name: str, root: str | Path, split: str, limit: int | None = None, seed: int = 0,
            skip_bad_records: bool = False, prompt: str | None = None, **options) -> tuple[list[Record], list[str]]:
    """Convert, check images and ids, and draw ``limit`` records at random with ``seed``.

    Returns ``(records, skipped)``: with ``skip_bad_records`` a bad record (missing image, duplicate id) is
    skipped and described in ``skipped``; otherwise it raises :class:`RecordError` naming the record.
    """
    fmt = get_format(format_name)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder")
    records, skipped, seen = [], [], set()
    for record in fmt.convert(root, split, **options):
        problem = None
        if record.id in seen:
            problem = f"duplicate id {record.id!r}"
        elif record.image is not None and not os.path.isfile(record.image):
            problem = f"record {record.id!r}: image not found: {record.image}"
        if problem:
            if not skip_bad_records:
                raise RecordError(f"{format_name} {split}: {problem} (--skip-bad-records skips such records)")
            skipped.append(problem)
            continue
        if prompt is not None:
            record.prompt = prompt
        seen.add(record.id)
        record.validate()
        records.append(record)
    if limit is not None and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    return records, skipped
