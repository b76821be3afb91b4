"""Multi-task mixing: draw N records per task with the run's seed, weight, and shuffle them together."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from mmtune.data.hf_datasets import is_hf_source, read_hf_records
from mmtune.data.records import Record, read_records


def draw(records: list[Record], n: int | None, seed: int, weight: float = 1.0) -> list[Record]:
    """``n`` records at random (all if None), each repeated ``weight`` times (fractional part at random)."""
    rng = random.Random(seed)
    if n is not None:
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        records = rng.sample(records, n) if n < len(records) else list(records)
    if weight <= 0:
        raise ValueError(f"weight must be positive, got {weight}")
    whole, fraction = int(weight), weight - int(weight)
    mixed = [r for r in records for _ in range(whole)]
    if fraction:
        mixed += rng.sample(records, round(fraction * len(records)))
    return mixed


def build_mixture(task_specs, seed: int, resolve=lambda p: Path(p), skip_bad_records: bool = False,
                  skipped: list[str] | None = None) -> list[Record]:
    """Load every task of a run, draw its share, and shuffle the union with ``seed``."""
    mixture: list[Record] = []
    for index, spec in enumerate(task_specs):
        path = resolve(spec.path)
        if is_hf_source(path):
            records = read_hf_records(path, spec.columns, spec.split, spec.defaults, skip_bad_records, skipped)
        elif spec.columns or spec.defaults or spec.split:
            raise ValueError(f"task {spec.path}: columns / defaults / split apply to Hugging Face datasets saved with "
                             "save_to_disk and Parquet files, not to JSONL task files")
        else:
            records = read_records(path, skip_bad_records=skip_bad_records, skipped=skipped)
        if not records:
            raise ValueError(f"task file {spec.path} has no usable records")
        mixture += draw(records, spec.n, seed + index, spec.weight)
    random.Random(seed).shuffle(mixture)
    return mixture


def mixture_summary(records: list[Record]) -> str:
    counts = Counter((r.task, r.kind) for r in records)
    return ", ".join(f"{task} ({kind}): {n}" for (task, kind), n in sorted(counts.items()))
