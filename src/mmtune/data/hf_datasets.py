"""Hugging Face ``datasets`` on both sides of mmtune's records.

* ``to_hf_dataset(records)``: records as a ``datasets.Dataset`` (one column per record field), for trainers that
  require one (TRL's ``SFTTrainer``); ``TrainCollator`` turns its rows back into records.
* ``read_hf_records(path, columns)``: a task source that is a dataset saved with ``save_to_disk`` or Parquet files,
  with a mapping from its columns to the record's fields; validated like a JSONL task file, each bad row named.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from mmtune.data.records import Record, checked_records, image_path

FIELDS = ("id", "task", "kind", "image", "prompt", "answers", "choices", "answer_index", "metric", "history",
          "system")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists())


def is_hf_source(path: str | Path) -> bool:
    """A dataset saved with ``save_to_disk``, a Parquet file, or a folder of Parquet files."""
    path = Path(path)
    return is_saved_dataset(path) or path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet")))


def to_hf_dataset(records: list[Record]):
    import datasets

    # Every row carries every field (None where a record has none): the columns are taken from all rows alike; with
    # any several-image record, every image is a list (one column type).
    rows = [{field: r.to_json().get(field) for field in FIELDS} for r in records]
    if any(isinstance(row["image"], list) for row in rows):
        for row in rows:
            row["image"] = [row["image"]] if isinstance(row["image"], str) else row["image"]
    return datasets.Dataset.from_list(rows)


def image_cache_dir() -> Path:
    """Where decoded images of Hugging Face datasets are written as files: ``$MMTUNE_CACHE/images`` (default
    ``~/.cache/mmtune/images``)."""
    return Path(os.environ.get("MMTUNE_CACHE", Path.home() / ".cache" / "mmtune")) / "images"


def read_hf_records(path: str | Path, columns: dict[str, str] | None = None, split: str | None = None,
                    defaults: dict | None = None, skip_bad_records: bool = False,
                    skipped: list[str] | None = None, formatting: str | None = None,
                    tags: dict | None = None) -> list[Record]:
    """Records from a dataset folder written by ``save_to_disk`` (a ``DatasetDict`` needs ``split``) or from Parquet
    files (a file, or a folder of ``*.parquet``). ``columns`` maps record fields to dataset columns (``{"prompt":
    "question"}``); ``defaults`` fills fields the data lacks (``{"task": "okvqa", "kind": "open"}``). ``answers``
    may be one string; ``image`` a path relative to the dataset's folder.

    A dataset of conversations (a ``messages`` column, or ``formatting: messages | sharegpt``; TRL's
    ``llava-instruct-mix-vsft``) is read by ``mmtune.data.messages``: ``columns`` then maps ``messages`` / ``images``,
    ``tags`` the role and content names, and decoded images are written once as PNG files under ``image_cache_dir``."""
    path = Path(path)
    data, base = _load(path, split)
    if formatting is not None or "messages" in data.column_names or columns and "messages" in columns:
        return _read_conversations(data, path, base, split, formatting or "messages", columns, tags, defaults,
                                   skip_bad_records, skipped)
    columns, defaults = dict(columns or {}), dict(defaults or {})
    unknown = [k for k in [*columns, *defaults] if k not in FIELDS]
    if unknown:
        raise ValueError(f"{path}: {unknown[0]!r} is not a record field; fields: {', '.join(FIELDS)}")
    missing = [field for field, column in columns.items() if column not in data.column_names]
    if missing:
        raise ValueError(f"{path}: no column {columns[missing[0]]!r} (for {missing[0]}); columns: "
                         f"{', '.join(data.column_names)}")
    source = {field: columns.get(field, field) for field in FIELDS}

    def build(index: int, row: dict) -> Record:
        values = {**defaults, **{f: row[c] for f, c in source.items() if c in row and row[c] is not None}}
        if isinstance(values.get("answers"), str):
            values["answers"] = [values["answers"]]
        if isinstance(values.get("id"), int):
            values["id"] = str(values["id"])
        values.setdefault("id", str(index))
        missing_fields = [f for f in ("task", "kind", "prompt", "answers") if f not in values]
        if missing_fields:
            raise ValueError(f"missing field(s) {missing_fields} (map a column with columns:, or set defaults:)")
        image = values.get("image")
        if isinstance(image, str):
            values["image"] = image_path(image, base)
        elif image is not None:
            raise ValueError(f"'image' must be a path (decoded image columns are not supported), got "
                             f"{type(image).__name__}")
        record = Record(**{"image": None, **values})
        record.validate()
        return record

    candidates = ((f"{path}[{index}]", functools.partial(build, index, row)) for index, row in enumerate(data))
    return list(checked_records(candidates, skip_bad_records, True, skipped))


def _load(path: Path, split: str | None):
    """The dataset (one split) and the folder its relative image paths start from."""
    import datasets

    if is_saved_dataset(path):
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{path} holds splits {sorted(data)}; name one (split: …)")
            data = data[split]
        return data, path
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: neither a dataset saved with save_to_disk nor Parquet files")
    data = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    return data, path if path.is_dir() else path.parent


def _read_conversations(data, path: Path, base: Path, split, formatting: str, columns, tags, defaults,
                        skip_bad_records: bool, skipped) -> list[Record]:
    from mmtune.data.messages import conversation_record, decoded_image_writer, format_tags

    tags = format_tags(formatting, columns, tags)
    if tags["messages"] not in data.column_names:
        raise ValueError(f"{path}: no column {tags['messages']!r} (the conversations); columns: "
                         f"{', '.join(data.column_names)}")
    defaults = {"task": path.stem if path.suffix else path.name, **(defaults or {})}
    # Decoded images are written once per dataset version (its fingerprint: a changed dataset gets new files).
    write = decoded_image_writer(image_cache_dir(), f"{path.resolve()}|{split}|{getattr(data, '_fingerprint', '')}")

    def build(index: int, row: dict) -> Record:
        return conversation_record(row, index, tags, defaults, lambda image, k: write(image, index, k, base))

    candidates = ((f"{path}[{index}]", functools.partial(build, index, row)) for index, row in enumerate(data))
    return list(checked_records(candidates, skip_bad_records, True, skipped))
