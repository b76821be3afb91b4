"""OCR-VQA (``dataset.json``): questions about book covers; split 1 = train, 2 = val, 3 = test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from mmtune.data.formats import load_json
from mmtune.data.records import SHORT_ANSWER_INSTRUCTION, Record

LAYOUT = """ROOT/dataset.json   {image_id: {"imageURL", "questions": [...], "answers": [...], "split": 1|2|3, ...}}
ROOT/images/<image_id><extension of imageURL>   (1 = train, 2 = val, 3 = test; or --images DIR)

The official loader saves each cover as the image id plus the extension of its imageURL (.jpg, .png, .gif)."""


def image_file(image_dir: Path, image_id: str, entry: dict) -> Path:
    """Where the official loader put this cover: ``<image_id>`` + the extension of ``imageURL`` (.jpg when the
    entry has no URL, or when only a .jpg exists, as some mirrors convert)."""
    suffix = Path(urlparse(str(entry.get("imageURL", ""))).path).suffix or ".jpg"
    official = image_dir / f"{image_id}{suffix}"
    fallback = image_dir / f"{image_id}.jpg"
    return official if official.exists() or not fallback.exists() else fallback
SPLITS = {"train": 1, "val": 2, "test": 3}


def convert(root: Path, split: str, images: str | None = None, **_) -> Iterator[Record]:
    if split not in SPLITS:
        raise ValueError(f"ocrvqa split {split!r}; choose one of {', '.join(SPLITS)}")
    image_dir = Path(images) if images else root / "images"
    for image_id, entry in load_json(root / "dataset.json").items():
        if int(entry.get("split", 0)) != SPLITS[split]:
            continue
        for index, (question, answer) in enumerate(zip(entry["questions"], entry["answers"], strict=True)):
            yield Record(id=f"ocrvqa-{image_id}-{index}", task="ocrvqa", kind="open",
                         image=str(image_file(image_dir, image_id, entry)), prompt=f"{question}\n{SHORT_ANSWER_INSTRUCTION}",
                         answers=[str(answer)], metric="exact")
