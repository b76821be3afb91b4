"""GQA balanced questions (``<split>_questions.json``): one answer, scored by exact match."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmtune.data.formats import load_json
from mmtune.data.records import SHORT_ANSWER_INSTRUCTION, Record

LAYOUT = """ROOT/questions/<split>_questions.json  {qid: {"imageId", "question", "answer", "fullAnswer"}}
                                     (e.g. testdev_balanced_questions.json; or ROOT/<split>_questions.json)
ROOT/images/<imageId>.jpg"""


def convert(root: Path, split: str, images: str | None = None, **_) -> Iterator[Record]:
    candidates = [root / "questions" / f"{split}_questions.json", root / f"{split}_questions.json"]
    questions = load_json(next((c for c in candidates if c.exists()), candidates[0]))
    image_dir = Path(images) if images else root / "images"
    for qid, q in questions.items():
        yield Record(id=f"gqa-{qid}", task="gqa", kind="open", image=str(image_dir / f"{q['imageId']}.jpg"),
                     prompt=f"{q['question']}\n{SHORT_ANSWER_INSTRUCTION}", answers=[q["answer"]], metric="exact",
                     extra={"full_answer": q["fullAnswer"]} if q.get("fullAnswer") else {})
