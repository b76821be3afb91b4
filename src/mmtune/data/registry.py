"""A dataset registry: configs name datasets (``dataset:<name>``), one JSON file says where and how to read them.

The file follows LLaMA-Factory's ``dataset_info.json`` for the keys both need, so an existing one mostly works::

    {"chartqa_train": {"file_name": "chartqa/train.jsonl", "formatting": "messages", "task": "chartqa"},
     "okvqa": {"file_name": "okvqa_hf", "split": "train", "columns": {"prompt": "question", "answers": "answers"},
               "task": "okvqa", "kind": "open"},
     "llava_mix": {"file_name": "mix.json", "formatting": "sharegpt",
                   "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}}

``file_name``: a task file, a JSON / JSONL file of conversations, a dataset saved with ``save_to_disk`` or Parquet
files, relative to the registry file. ``formatting``: ``records`` (mmtune's, the default for a ``.jsonl`` task file),
``messages`` or ``sharegpt`` (``mmtune.data.messages``). ``columns``: record fields → dataset columns, or for
conversations ``messages`` / ``images``. ``tags``: conversation role and content names. ``split``, ``task``, ``kind``,
``metric`` (how evaluation scores it: cider | vqa | mc | exact).
``hf_hub_url`` / ``ms_hub_url`` entries are refused: nothing is downloaded at run time (download it, then
``file_name``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DATASET_PREFIX = "dataset:"
ENTRY_KEYS = {"file_name", "formatting", "columns", "tags", "split", "task", "kind", "metric"}
FORMATTINGS = ("records", "messages", "sharegpt")


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    path: Path
    formatting: str = "records"
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    split: str | None = None
    defaults: dict = field(default_factory=dict)  # task, kind, metric


def load_registry(path: str | Path) -> dict[str, DatasetEntry]:
    """The registry's entries, each checked: an error names the file, the entry and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.registry: {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of dataset name → entry")
    entries = {}
    for name, entry in data.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with file_name")
        if "hf_hub_url" in entry or "ms_hub_url" in entry or "om_hub_url" in entry:
            raise ValueError(f"{where}: hub datasets are not downloaded at run time; download it and give its folder "
                             "as file_name")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {', '.join(sorted(ENTRY_KEYS))}")
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"].strip():
            raise ValueError(f"{where}: 'file_name' (a path relative to the registry) is missing")
        formatting = entry.get("formatting", "records")
        if formatting == "alpaca":
            raise ValueError(f"{where}: formatting 'alpaca' is text-only instruction data; mmtune reads records, "
                             "messages or sharegpt")
        if formatting not in FORMATTINGS:
            raise ValueError(f"{where}: formatting {formatting!r}; choose one of {', '.join(FORMATTINGS)}")
        for key in ("columns", "tags"):
            if not isinstance(entry.get(key, {}), dict):
                raise ValueError(f"{where}: '{key}' must be an object")
        entries[name] = DatasetEntry(name=name, path=(path.parent / entry["file_name"]).resolve(), formatting=formatting,
                                     columns=dict(entry.get("columns", {})), tags=dict(entry.get("tags", {})),
                                     split=entry.get("split"),
                                     defaults={k: entry[k] for k in ("task", "kind", "metric") if k in entry})
    return entries


def lookup(registry: dict[str, DatasetEntry] | None, task_path: str) -> DatasetEntry:
    name = task_path[len(DATASET_PREFIX):]
    if registry is None:
        raise ValueError(f"task {task_path!r} names a registered dataset, but data.registry is not set")
    if name not in registry:
        raise ValueError(f"task {task_path!r}: no dataset {name!r} in data.registry; it has: {', '.join(sorted(registry))}")
    return registry[name]
