"""VQA-style questions + annotations files (OK-VQA, VQAv2): all ten annotator answers kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmtune.data.formats import load_json
from mmtune.data.records import SHORT_ANSWER_INSTRUCTION, Record

LAYOUT = """ROOT/OpenEnded_mscoco_<split>2014_questions.json  {"questions": [{"question_id", "image_id", "question"}]}
ROOT/mscoco_<split>2014_annotations.json            {"annotations": [{"question_id", "answers": [{"answer"}] x 10}]}
ROOT/<split>2014/COCO_<split>2014_<image_id:012d>.jpg  (or --questions / --annotations / --images)"""


def convert(root: Path, split: str, questions: str | None = None, annotations: str | None = None,
            images: str | None = None, task: str = "okvqa", **_) -> Iterator[Record]:
    question_file = Path(questions) if questions else root / f"OpenEnded_mscoco_{split}2014_questions.json"
    annotation_file = Path(annotations) if annotations else root / f"mscoco_{split}2014_annotations.json"
    image_dir = Path(images) if images else root / f"{split}2014"
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in load_json(annotation_file)["annotations"]}
    for q in load_json(question_file)["questions"]:
        image = image_dir / f"COCO_{split}2014_{int(q['image_id']):012d}.jpg"
        yield Record(id=f"{task}-{q['question_id']}", task=task, kind="open", image=str(image),
                     prompt=f"{q['question']}\n{SHORT_ANSWER_INSTRUCTION}",
                     answers=answers.get(q["question_id"], []), metric="vqa")
