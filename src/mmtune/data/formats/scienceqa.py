"""ScienceQA (``problems.json``): only problems with an image; the prompt carries the hint and lettered options."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmtune.data.formats import load_json
from mmtune.data.records import Record, letter, multiple_choice_prompt

LAYOUT = """ROOT/problems.json      {pid: {"question", "choices", "answer" (index), "hint", "image" (file name or null),
                                 "split", ...}}
ROOT/pid_splits.json    optional {split: [pid, ...]} (else each problem's "split" is used)
ROOT/images/<split>/<pid>/image.png  (or ROOT/<split>/<pid>/image.png)"""


def convert(root: Path, split: str, **_) -> Iterator[Record]:
    problems = load_json(root / "problems.json")
    splits_file = root / "pid_splits.json"
    pids = load_json(splits_file).get(split, []) if splits_file.exists() else \
        [pid for pid, p in problems.items() if p.get("split") == split]
    for pid in pids:
        problem = problems[str(pid)]
        if not problem.get("image"):
            continue  # text-only problems are not used for MLLM tuning
        folder = split if splits_file.exists() else problem.get("split", split)
        candidates = [root / "images" / folder / str(pid) / problem["image"], root / folder / str(pid) / problem["image"]]
        image = next((c for c in candidates if c.exists()), candidates[0])
        choices = [str(c) for c in problem["choices"]]
        answer = int(problem["answer"])
        yield Record(id=f"scienceqa-{pid}", task="scienceqa", kind="choice", image=str(image),
                     prompt=multiple_choice_prompt(problem["question"], choices, context=problem.get("hint")),
                     answers=[letter(answer)], choices=choices, answer_index=answer, metric="mc",
                     extra={"subject": problem.get("subject")} if problem.get("subject") else {})
