"""OCR-VQA (``dataset.json``): questions about book covers; split 1 = train, 2 = val, 3 = test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmtune.data.formats import load_json
from mmtune.data.records import SHORT_ANSWER_INSTRUCTION, Record

LAYOUT = """ROOT/dataset.json   {image_id: {"questions": [...], "answers": [...], "split": 1|2|3, ...}}
ROOT/images/<image_id>.jpg   (1 = train, 2 = val, 3 = test; or --images DIR)"""
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
                         image=str(image_dir / f"{image_id}.jpg"), prompt=f"{question}\n{SHORT_ANSWER_INSTRUCTION}",
                         answers=[str(answer)], metric="exact")
