"""LLaVA conversation JSON — read any LLaVA-format data, and export mmtune task files or mixes to it."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from mmtune.data.formats import load_json
from mmtune.data.records import Record, RecordError
from mmtune.files import atomic_write

LAYOUT = """ROOT/<file>.json (--file, default llava.json): [{"id", "image", "conversations": [{"from": "human",
    "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}]; every human/gpt pair becomes a record
ROOT/<image>   (or --images DIR)"""
IMAGE_TOKEN = "<image>"


def convert(root: Path, split: str = "", file: str = "llava.json", images: str | None = None, task: str = "llava",
            kind: str = "open", **_) -> Iterator[Record]:
    path = root / file
    items = load_json(path)
    if not isinstance(items, list):
        raise RecordError(f"{path}: expected a JSON list of conversations")
    image_dir = Path(images) if images else root
    # The released mixes reuse ids (llava_instruct_150k is three subsets keyed by the COCO image id; the v1.5
    # 665k mix repeats many): a repeated id gets its item's position, so every conversation keeps a unique id.
    seen_ids = Counter(str(item.get("id")) for item in items if isinstance(item, dict))
    for position, item in enumerate(items):
        if "image" not in item:
            continue  # text-only conversations carry no image (not yet supported: mmtune records have one image)
        item_id = str(item.get("id", position))
        if seen_ids[item_id] > 1:
            item_id = f"{item_id}@{position}"
        turns = item.get("conversations", [])
        for index in range(0, len(turns) - 1, 2):
            human, gpt = turns[index], turns[index + 1]
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise RecordError(f"{path}: item {position} (id {item.get('id')!r}): turns {index}/{index + 1} are "
                                  f"not a human/gpt pair")
            prompt = human["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()
            suffix = f"-{index // 2}" if len(turns) > 2 else ""
            yield Record(id=f"{item_id}{suffix}", task=task, kind=kind,
                         image=str(image_dir / item["image"]), prompt=prompt, answers=[gpt["value"]])


def export(records: Iterable[Record], out: str | Path, image_root: str | Path | None = None,
           overwrite: bool = False) -> int:
    """Write records as LLaVA conversation JSON; images relative to ``image_root`` (default: the JSON's folder)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    base = Path(image_root) if image_root else out.parent
    items = [{"id": r.id, "image": os.path.relpath(Path(r.image).resolve(), base.resolve()),
              "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{r.prompt}"},
                                {"from": "gpt", "value": r.target}]} for r in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(items, indent=1, ensure_ascii=False) + "\n")
    return len(items)
