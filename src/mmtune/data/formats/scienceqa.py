"""ScienceQA (``problems.json``): only problems with an image; the prompt carries the hint and lettered options."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mmtune.data.formats import load_json
from mmtune.data.records import Record, letter, multiple_choice_prompt

LAYOUT = """ROOT/problems.json      {pid: {"question", "choices", "answer" (index), "hint", "image" (file name or null),
                                 "split" (train | val | test), ...}}
ROOT/pid_splits.json    optional {split: [pid, ...]}: train, val, test, trainval, minitrain, minival, minitest
                        (else each problem's "split" is used)
ROOT/images/<problem's split>/<pid>/image.png  (or ROOT/<problem's split>/<pid>/image.png)

A mini split (minival, minitest, ...) lists problems of the full splits: each image lives under its problem's
own "split" folder, as in the release."""


def convert(root: Path, split: str, **_) -> Iterator[Record]:
    problems = load_json(root / "problems.json")
    splits_file = root / "pid_splits.json"
    if splits_file.exists():
        splits = load_json(splits_file)
        if split not in splits:
            raise ValueError(f"{splits_file}: no split {split!r}; it has {', '.join(sorted(splits))}")
        pids = splits[split]
    else:
        known = sorted({str(p.get("split")) for p in problems.values()})
        if split not in known:
            raise ValueError(f"{root / 'problems.json'}: no problem has split {split!r}; splits: {', '.join(known)}")
        pids = [pid for pid, p in problems.items() if p.get("split") == split]
    for pid in pids:
        problem = problems[str(pid)]
        if not problem.get("image"):
            continue  # text-only problems are not used for MLLM tuning
        folder = problem.get("split", split)
        candidates = [root / "images" / folder / str(pid) / problem["image"], root / folder / str(pid) / problem["image"]]
        image = next((c for c in candidates if c.exists()), candidates[0])
        choices = [str(c) for c in problem["choices"]]
        answer = int(problem["answer"])
        yield Record(id=f"scienceqa-{pid}", task="scienceqa", kind="choice", image=str(image),
                     prompt=multiple_choice_prompt(problem["question"], choices, context=problem.get("hint")),
                     answers=[letter(answer)], choices=choices, answer_index=answer, metric="mc",
                     extra={"subject": problem.get("subject")} if problem.get("subject") else {})
