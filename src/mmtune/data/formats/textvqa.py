"""TextVQA (``TextVQA_0.5.1_<split>.json``): questions about text in images, ten answers each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmtune.data.formats import load_json
from mmtune.data.records import SHORT_ANSWER_INSTRUCTION, Record

LAYOUT = """ROOT/TextVQA_0.5.1_<split>.json  {"data": [{"question_id", "question", "image_id", "answers": [10 strings]}]}
ROOT/train_images/<image_id>.jpg   (train and val images; test: ROOT/test_images; or --images DIR)"""


def convert(root: Path, split: str, images: str | None = None, **_) -> Iterator[Record]:
    data = load_json(root / f"TextVQA_0.5.1_{split}.json")["data"]
    image_dir = Path(images) if images else root / ("test_images" if split == "test" else "train_images")
    for item in data:
        yield Record(id=f"textvqa-{item['question_id']}", task="textvqa", kind="open",
                     image=str(image_dir / f"{item['image_id']}.jpg"),
                     prompt=f"{item['question']}\n{SHORT_ANSWER_INSTRUCTION}", answers=list(item.get("answers", [])),
                     metric="vqa")
