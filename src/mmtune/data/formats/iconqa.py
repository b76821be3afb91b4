"""IconQA, multiple-choice text sub-task (``choose_txt``): one folder per question."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmtune.data.formats import load_json
from mmtune.data.records import Record, letter, multiple_choice_prompt

LAYOUT = """ROOT/<split>/choose_txt/<qid>/data.json   {"question", "choices", "answer" (index), ...}
ROOT/<split>/choose_txt/<qid>/image.png"""


def convert(root: Path, split: str, **_) -> Iterator[Record]:
    folder = root / split / "choose_txt"
    if not folder.is_dir():
        raise FileNotFoundError(f"expected IconQA folder not found: {folder}")
    for question_dir in sorted(folder.iterdir(), key=lambda p: p.name):
        if not (question_dir / "data.json").is_file():
            continue
        data = load_json(question_dir / "data.json")
        choices = [str(c) for c in data["choices"]]
        answer = int(data["answer"])
        yield Record(id=f"iconqa-{question_dir.name}", task="iconqa", kind="choice",
                     image=str(question_dir / "image.png"), prompt=multiple_choice_prompt(data["question"], choices),
                     answers=[letter(answer)], choices=choices, answer_index=answer, metric="mc")
