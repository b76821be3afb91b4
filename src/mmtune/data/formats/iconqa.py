"""IconQA, multiple-choice text sub-task (``choose_txt``): one folder per question."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmtune.data.formats import load_json
from mmtune.data.records import Record, letter, multiple_choice_prompt

LAYOUT = """ROOT/iconqa/<split>/choose_txt/<qid>/data.json   {"question", "choices", "answer" (index), ...}
ROOT/iconqa/<split>/choose_txt/<qid>/image.png
ROOT is the folder as downloaded (iconqa_data/, beside problems.json and pid_splits.json), or its inner iconqa/."""


def convert(root: Path, split: str, **_) -> Iterator[Record]:
    if (root / "iconqa").is_dir():  # the release's top folder, iconqa_data/
        root = root / "iconqa"
    folder = root / split / "choose_txt"
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "choose_txt").is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"expected IconQA folder not found: {folder} (splits found: {', '.join(found) or 'none'})")
    for question_dir in sorted(folder.iterdir(), key=lambda p: p.name):
        if not (question_dir / "data.json").is_file():
            continue
        data = load_json(question_dir / "data.json")
        choices = [str(c) for c in data["choices"]]
        answer = int(data["answer"])
        yield Record(id=f"iconqa-{question_dir.name}", task="iconqa", kind="choice",
                     image=str(question_dir / "image.png"), prompt=multiple_choice_prompt(data["question"], choices),
                     answers=[letter(answer)], choices=choices, answer_index=answer, metric="mc")
