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

LAYOUT = """ROOT/<file>.json (--file, default llava.json): [{"id", "image"?, "conversations": [{"from": "human",
    "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}]; one record per conversation (its earlier
    human/gpt pairs kept as the record's history, all trained on); an item without "image" is a text-only record
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
        where = f"{path}: item {position} (id {item.get('id')!r})" if isinstance(item, dict) else f"{path}: item {position}"
        if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
            raise RecordError(f"{where}: expected an object with a 'conversations' list")
        item_id = str(item.get("id", position))
        if seen_ids[item_id] > 1:
            item_id = f"{item_id}@{position}"
        turns = item["conversations"]
        if len(turns) < 2 or len(turns) % 2:
            raise RecordError(f"{where}: {len(turns)} turns; a conversation is human/gpt pairs")
        exchanges = []
        for index in range(0, len(turns), 2):
            human, gpt = turns[index], turns[index + 1]
            if not isinstance(human, dict) or not isinstance(gpt, dict) or human.get("from") != "human" \
                    or gpt.get("from") != "gpt":
                raise RecordError(f"{where}: turns {index}/{index + 1} are not a human/gpt pair")
            prompt = str(human.get("value", "")).replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()
            exchanges.append({"prompt": prompt, "answer": str(gpt.get("value", ""))})
        image = str(image_dir / item["image"]) if item.get("image") else None
        last = exchanges[-1]
        yield Record(id=item_id, task=task, kind=kind, image=image, prompt=last["prompt"], answers=[last["answer"]],
                     history=exchanges[:-1])


def export(records: Iterable[Record], out: str | Path, image_root: str | Path | None = None,
           overwrite: bool = False) -> int:
    """Write records as LLaVA conversation JSON; images relative to ``image_root`` (default: the JSON's folder)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    base = Path(image_root) if image_root else out.parent
    items = [item(r, base) for r in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(items, indent=1, ensure_ascii=False) + "\n")
    return len(items)


def item(record: Record, base: Path) -> dict:
    """One record as a LLaVA conversation: its history first, ``<image>`` in the first human turn (if any)."""
    exchanges = [(t["prompt"], t["answer"]) for t in record.history] + [(record.prompt, record.target)]
    turns = []
    for index, (prompt, answer) in enumerate(exchanges):
        images = len(record.images) if index == 0 else 0
        turns += [{"from": "human", "value": f"{IMAGE_TOKEN}\n" * images + prompt},
                  {"from": "gpt", "value": answer}]
    out = {"id": record.id}
    if record.image is not None:  # several images: a list, as LLaVA-NeXT / OneVision data has them
        paths = [os.path.relpath(Path(image).resolve(), base.resolve()) for image in record.images]
        out["image"] = paths if isinstance(record.image, list) else paths[0]
    out["conversations"] = turns
    return out
