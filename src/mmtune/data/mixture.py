"""Multi-task mixing: how each epoch's records are drawn from the task sources.

Two modes. **Fixed** (the default, and what every earlier run used): N records per task drawn once with the run's
seed, repeated ``weight`` times, shuffled together; each epoch is a new order of the same records.
**Sampled** (any of ``tasks[].probability``, ``data.temperature``, ``data.replay``, ``data.resample_each_epoch``):
the task sources are kept whole and each epoch is drawn from them by ``MixtureSampler`` — a task per slot with the
given probabilities (or ``p_i ∝ size_i^(1/T)``), a fixed share of every batch from the replay (general) data, and,
with resampling, a fresh draw of each task's N records every epoch. The epoch keeps the fixed mode's length
(Σ N·weight training records, plus the replay records that fill each batch's share)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Sampler

from mmtune.data.hf_datasets import is_hf_source, read_hf_records
from mmtune.data.messages import format_tags, iter_conversation_file
from mmtune.data.records import Record, read_records
from mmtune.data.registry import DATASET_PREFIX, lookup


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


def read_task(spec, resolve=lambda p: Path(p), skip_bad_records: bool = False,
              skipped: list[str] | None = None, registry: dict | None = None) -> list[Record]:
    """Every record of one task source: a JSONL task file, a JSON / JSONL file of conversations, a Hugging Face dataset
    or Parquet files — or a ``dataset:<name>`` of ``registry`` (``mmtune.data.registry``)."""
    if spec.path.startswith(DATASET_PREFIX):
        return read_registered(lookup(registry, spec.path), spec, skip_bad_records, skipped)
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
    return records


def read_registered(entry, spec, skip_bad_records: bool, skipped: list[str] | None) -> list[Record]:
    """A registry entry's records, the task spec's own columns / defaults / split taking precedence."""
    columns, defaults = {**entry.columns, **spec.columns}, {**entry.defaults, **spec.defaults}
    split = spec.split or entry.split
    where = f"dataset {entry.name!r} ({entry.path})"
    if not entry.path.exists():
        raise FileNotFoundError(f"{where}: file_name not found")
    if is_hf_source(entry.path):
        records = read_hf_records(entry.path, columns, split, defaults, skip_bad_records, skipped,
                                  None if entry.formatting == "records" else entry.formatting, entry.tags)
    elif entry.formatting == "records":
        if columns or defaults:
            raise ValueError(f"{where}: columns / task / kind apply to datasets and conversations, not to mmtune "
                             "task files (their records name their task and kind)")
        records = read_records(entry.path, skip_bad_records=skip_bad_records, skipped=skipped)
    else:
        tags = format_tags(entry.formatting, columns, entry.tags)
        records = list(iter_conversation_file(entry.path, tags, defaults, skip_bad_records, skipped))
    if not records:
        raise ValueError(f"{where} has no usable records")
    return records


def build_mixture(task_specs, seed: int, resolve=lambda p: Path(p), skip_bad_records: bool = False,
                  skipped: list[str] | None = None, registry: dict | None = None,
                  data_seed: int | None = None) -> list[Record]:
    """Load every task of a run, draw its share with ``data_seed`` (``data.seed``: which records, the same for every
    training seed; ``seed`` where None), and shuffle the union with ``seed`` (the fixed mode)."""
    draws = seed if data_seed is None else data_seed
    mixture: list[Record] = []
    for index, spec in enumerate(task_specs):
        records = read_task(spec, resolve, skip_bad_records, skipped, registry)
        mixture += draw(records, spec.n, draws + index, spec.weight)
    random.Random(seed).shuffle(mixture)
    return mixture


def temperature_probabilities(sizes: list[int], temperature: float) -> list[float]:
    """``p_i ∝ size_i^(1/T)``: T = 1 samples in proportion to size, larger T flattens towards uniform."""
    weights = [size ** (1.0 / temperature) for size in sizes]
    return [w / sum(weights) for w in weights]


@dataclass
class MixturePlan:
    """How the sampled mode draws each epoch: indices into the run's record list, per source."""

    pools: list[list[int]]  # per training task: the indices of its records
    counts: list[int]  # per training task: the records it draws (its n; in proportion mode, records per epoch)
    weights: list[float]  # per training task: its repeat weight (proportion mode)
    probabilities: list[float] | None  # per training task: the chance each slot is drawn from it (None: proportions)
    replay: list[int]  # the indices of the replay (general) records
    replay_per_batch: int  # replay records in every batch
    batch_size: int
    resample: bool  # a fresh draw of each task's records every epoch
    seed: int  # the order (train.seed)
    data_seed: int | None = None  # which records (data.seed; None: seed)

    @property
    def batches_per_epoch(self) -> int:
        main = sum(round(n * w) for n, w in zip(self.counts, self.weights, strict=True))
        return main // (self.batch_size - self.replay_per_batch)

    def describe(self, names: list[str]) -> str:
        parts = [f"{name} p={p:.3f}" for name, p in zip(names, self.probabilities, strict=True)] \
            if self.probabilities else [f"{name} {n}×{w:g}" for name, n, w in zip(names, self.counts, self.weights,
                                                                                   strict=True)]
        text = "sampled mixture: " + ", ".join(parts)
        if self.replay_per_batch:
            text += f"; replay {self.replay_per_batch} of every {self.batch_size} records ({len(self.replay)} in its pool)"
        return text + ("; each task's records drawn afresh every epoch" if self.resample else "")


def draw_records(pool: list[int], n: int, seed: int) -> list[int]:
    """``n`` of ``pool``'s records drawn at random with ``seed`` (the whole pool, unchanged, when ``n`` covers it)."""
    if n >= len(pool):
        return pool
    return [pool[j] for j in torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n].tolist()]


def _stream(pool: list[int], generator: torch.Generator) -> Iterator[int]:
    """``pool``'s indices in random order, again and again (a new order each pass)."""
    while True:
        for position in torch.randperm(len(pool), generator=generator).tolist():
            yield pool[position]


def records_seed(plan: MixturePlan, epoch: int) -> int:
    """The seed of which records an epoch draws (``data.seed``, else ``train.seed``): fixed unless resampling."""
    which = plan.seed if plan.data_seed is None else plan.data_seed
    return which * 7919 + (epoch if plan.resample else 0)


def epoch_indices(plan: MixturePlan, epoch: int) -> list[int]:
    """The record indices of one epoch, batch after batch: every batch ``batch_size − replay_per_batch`` training
    records then ``replay_per_batch`` replay records. A function of (plan, epoch) alone: a resumed run redraws it."""
    draw_seed = records_seed(plan, epoch)
    order = torch.Generator().manual_seed(plan.seed + epoch)  # their order: new every epoch
    per_batch = plan.batch_size - plan.replay_per_batch
    slots = plan.batches_per_epoch * per_batch
    if plan.probabilities is not None:
        tasks = torch.multinomial(torch.tensor(plan.probabilities, dtype=torch.float64), slots, replacement=True,
                                  generator=order).tolist()
        streams = [_stream(draw_records(pool, n, draw_seed + 104729 * (i + 1)), torch.Generator().manual_seed(
            draw_seed + 104729 * (i + 1))) for i, (pool, n) in enumerate(zip(plan.pools, plan.counts, strict=True))]
        main = [next(streams[task]) for task in tasks]
    else:
        main = []
        for i, (pool, n, weight) in enumerate(zip(plan.pools, plan.counts, plan.weights, strict=True)):
            records = torch.Generator().manual_seed(draw_seed + 104729 * (i + 1))
            chosen = torch.randperm(len(pool), generator=records)
            picked = [pool[j] for j in chosen[:n].tolist()]
            whole, fraction = int(weight), weight - int(weight)
            # the fractional repeats are part of which records train (data.seed), not of their order
            repeats = records if plan.data_seed is not None else order
            main += picked * whole + [picked[j] for j in torch.randperm(len(picked), generator=repeats)[
                :round(fraction * len(picked))].tolist()]
        main = [main[j] for j in torch.randperm(len(main), generator=order)[:slots].tolist()]
    replay = _stream(plan.replay, torch.Generator().manual_seed(plan.seed * 7919 + 1 + epoch)) if plan.replay else None
    indices = []
    for batch in range(plan.batches_per_epoch):
        indices += main[batch * per_batch:(batch + 1) * per_batch]
        indices += [next(replay) for _ in range(plan.replay_per_batch)]
    return indices


def drawn_indices(plan: MixturePlan, epoch: int = 0) -> list[int]:
    """The records an epoch's batches are drawn from: each task's n (its whole pool without one) and the replay's
    drawn records, sorted — what trains, where the run's record list holds every source whole."""
    draw_seed = records_seed(plan, epoch)
    tasks = [i for t, (pool, n) in enumerate(zip(plan.pools, plan.counts, strict=True))
             for i in draw_records(pool, n, draw_seed + 104729 * (t + 1))]
    return sorted({*tasks, *plan.replay})


class MixtureSampler(Sampler):
    """The sampled mode's order: ``epoch_indices`` for the epoch set by ``set_epoch`` (read with the run's batch
    size and ``drop_last``, every batch is one the plan composed)."""

    def __init__(self, plan: MixturePlan):
        self.plan, self.epoch = plan, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.plan.batches_per_epoch * self.plan.batch_size

    def __iter__(self):
        return iter(epoch_indices(self.plan, self.epoch))


def mixture_summary(records: list[Record]) -> str:
    counts = Counter((r.task, r.kind) for r in records)
    return ", ".join(f"{task} ({kind}): {n}" for (task, kind), n in sorted(counts.items()))
