"""A run's training data: the synthetic world (generated once), the task mixture, the over-length check and the
data loader whose order is a function of the run alone."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from mmtune.config import RunConfig
from mmtune.data.collate import RecordDataset, TrainCollator
from mmtune.data.mixture import (
    MixturePlan,
    MixtureSampler,
    build_mixture,
    draw_records,
    mixture_summary,
    read_task,
    temperature_probabilities,
)
from mmtune.data.records import RecordError
from mmtune.data.registry import load_registry
from mmtune.data.synthetic import SYNTHETIC_PREFIX, ensure_world, resolve_task_path


class EpochSampler(Sampler):
    """A fresh permutation per epoch from ``seed + epoch``: the data order is a function of the run only."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


class LengthGroupedSampler(EpochSampler):
    """``EpochSampler``'s permutation, then — as the Hugging Face Trainer's ``group_by_length`` — cut into megabatches
    of up to 50 batches, each sorted longest first, the megabatch holding the longest record first (an out-of-memory
    shows at the first step): consecutive batches hold records of similar length, so less padding, and the order is
    still a function of (seed, epoch) — a resumed run redraws it."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size = lengths, batch_size

    def __iter__(self):
        order = list(super().__iter__())
        size = self.batch_size * max(1, min(len(order) // (self.batch_size * 4), 50))
        megabatches = [sorted(order[i:i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(order), size)]
        longest = max(range(len(megabatches)), key=lambda m: self.lengths[megabatches[m][0]])
        megabatches[0], megabatches[longest] = megabatches[longest], megabatches[0]
        return iter([j for megabatch in megabatches for j in megabatch])


def padded_share(lengths: list[int], order: list[int], batch_size: int) -> float:
    """The share of a padded epoch's positions that are padding (``order`` read in batches, the last partial one
    dropped as the loader does)."""
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    padded = sum(max(lengths[j] for j in batch) * len(batch) for batch in batches)
    real = sum(lengths[j] for batch in batches for j in batch)
    return 1 - real / padded if padded else 0.0


def world_dir(config: RunConfig) -> Path | None:
    paths = [t.path for t in [*config.data.tasks, *config.data.replay, *config.eval.downstream, *config.eval.heldout]]
    if not any(p.startswith(SYNTHETIC_PREFIX) for p in paths):
        return None
    synth = config.data.synthetic
    return Path(synth.dir) if synth.dir else Path(config.train.output_dir) / "synthetic"


def load_records(config: RunConfig, accelerator, say) -> tuple[Path | None, list, list[str]]:
    """The synthetic world (generated once, by the main process) and the shuffled task mixture; returns
    ``(world folder or None, records, skipped bad records)``."""
    world = world_dir(config)
    if world is not None and accelerator.is_main_process:
        synth = config.data.synthetic
        ensure_world(world, synth.seed, synth.n_train, synth.n_test, synth.image_size, config.train.progress,
                     version=synth.version, caption_errors=synth.caption_errors)
    accelerator.wait_for_everyone()
    if not config.data.tasks:
        raise ValueError("data.tasks is empty: name at least one task file")
    skipped: list[str] = []
    resolve = lambda p: resolve_task_path(p, world, "train")  # noqa: E731
    registry = load_registry(config.data.registry) if config.data.registry else None
    if config.data.sampled:  # every source kept whole, each record tagged with its source (MixturePlan's pools)
        records = []
        for source, spec in enumerate([*config.data.tasks, *config.data.replay]):
            for record in read_task(spec, resolve, config.data.skip_bad_records, skipped, registry):
                record.pool = source
                records.append(record)
    else:
        records = build_mixture(config.data.tasks, config.train.seed, resolve=resolve,
                                skip_bad_records=config.data.skip_bad_records, skipped=skipped, registry=registry,
                                data_seed=config.data.draw_seed(config.train.seed))
    say(f"{'task sources' if config.data.sampled else 'mixture'}: {len(records)} records — {mixture_summary(records)}")
    if skipped:
        say(f"skipped {len(skipped)} bad records (data.skip_bad_records=true); first: {skipped[0]}")
    return world, records, skipped


def build_loader(config: RunConfig, records: list, processor, skipped: list[str], say,
                 target_logits: bool = False, keep_samples: bool = False) -> tuple[DataLoader, list]:
    """The training data loader (records longer than ``data.max_length`` refused before training, or skipped and
    counted in ``skipped``; ``target_logits``: batches name the positions whose logits the losses read;
    ``keep_samples``: batches carry their records and images, for a method that builds batches of its own); returns
    it with the records it holds."""
    collator = TrainCollator(processor, config.data.max_length, target_logits=target_logits,
                             padding_free=config.data.padding_free, keep_samples=keep_samples)
    lengths = record_lengths(records, collator)
    too_long = over_length(records, lengths, collator.max_length)
    if too_long and not config.data.skip_bad_records:
        raise RecordError(too_long[0][1] + f" ({len(too_long)} such records; data.skip_bad_records=true skips them)")
    if too_long:
        skipped += [message for _, message in too_long]
        dropped = {id(record) for record, _ in too_long}
        lengths = [n for r, n in zip(records, lengths, strict=True) if id(r) not in dropped]
        records = [r for r in records if id(r) not in dropped]
        say(f"skipped {len(too_long)} records longer than data.max_length")
    if config.data.sampled:
        plan = mixture_plan(config, records)
        say(plan.describe([t.path for t in config.data.tasks]))
        sampler = MixtureSampler(plan)
    elif config.data.group_by_length:
        sampler = LengthGroupedSampler(lengths, config.train.batch_size, config.train.seed)
        grouped, plain = (100 * padded_share(lengths, list(order), config.train.batch_size)
                          for order in (sampler, EpochSampler(len(records), config.train.seed)))
        say(f"data.group_by_length: batches of similar length — padding is {grouped:.1f}% of epoch 1's positions "
            f"(in a random order: {plain:.1f}%)")
    else:
        sampler = EpochSampler(len(records), config.train.seed)
    if config.data.padding_free and not config.data.sampled:
        padded = 100 * padded_share(lengths, list(sampler), config.train.batch_size)
        say(f"data.padding_free: the model sees each batch's records concatenated, without the {padded:.1f}% of "
            "epoch 1's positions that padding would fill")
    elif config.data.padding_free:
        say("data.padding_free: the model sees each batch's records concatenated, without padding")
    loader = DataLoader(RecordDataset(records), batch_size=config.train.batch_size, drop_last=True, sampler=sampler,
                        collate_fn=collator, num_workers=config.data.num_workers)
    return loader, records


def mixture_plan(config: RunConfig, records: list) -> MixturePlan:
    """The sampled mixture's plan over ``records`` (tagged with their source by ``load_records``)."""
    data, tasks = config.data, config.data.tasks
    pools = [[i for i, r in enumerate(records) if r.pool == source] for source in range(len(tasks) + len(data.replay))]
    for source, pool in enumerate(pools):
        if not pool:
            spec = [*tasks, *data.replay][source]
            raise ValueError(f"{spec.path}: no record left to train on (all were skipped)")
    counts = [min(spec.n or len(pool), len(pool)) for spec, pool in zip(tasks, pools, strict=False)]
    probabilities = None
    if tasks[0].probability is not None:
        total = sum(t.probability for t in tasks)
        probabilities = [t.probability / total for t in tasks]
    elif data.temperature is not None:
        probabilities = temperature_probabilities(counts, data.temperature)
    replay_per_batch = round(data.replay_share * config.train.batch_size)
    if data.replay and not 1 <= replay_per_batch < config.train.batch_size:
        raise ValueError(f"data.replay_share={data.replay_share} of train.batch_size={config.train.batch_size} is "
                         f"{data.replay_share * config.train.batch_size:g} records: it must round to 1 … "
                         f"{config.train.batch_size - 1}")
    # each replay source's n records, drawn once per run with data.seed (its share of every batch is replay_share)
    draw = data.draw_seed(config.train.seed)
    replay = [i for source, (spec, pool) in enumerate(zip(data.replay, pools[len(tasks):], strict=True))
              for i in draw_records(pool, min(spec.n or len(pool), len(pool)), draw * 7919 + 2 + source)]
    return MixturePlan(pools=pools[:len(tasks)], counts=counts, weights=[t.weight for t in tasks],
                       probabilities=probabilities, replay=replay, replay_per_batch=replay_per_batch,
                       batch_size=config.train.batch_size, resample=data.resample_each_epoch, seed=config.train.seed,
                       data_seed=data.seed)


def optimizer_steps(loader, skip_first_batches, accum: int, steps_per_epoch: int, epoch: int, step_in_epoch: int,
                    count: int):
    """From a position (``epoch``, optimizer steps done in it), yield ``count`` optimizer steps' micro-batches as
    ``(epoch, steps done in the epoch with this one, micro)``, epoch after epoch; each epoch has its own order, a
    resumed epoch skips what was trained, and nothing is read past the last step."""
    while count > 0:
        loader.set_epoch(epoch)
        batches = skip_first_batches(loader, step_in_epoch * accum) if step_in_epoch else loader
        micro: list[dict] = []
        for batch in batches:
            micro.append(batch)
            if len(micro) < accum:
                continue
            step_in_epoch, count = step_in_epoch + 1, count - 1
            yield epoch, step_in_epoch, micro
            micro = []
            if step_in_epoch >= steps_per_epoch or count == 0:
                break
        epoch, step_in_epoch = epoch + 1, 0


def find_too_long(records, collator: TrainCollator) -> list[tuple]:
    """Records whose prompt + answer exceed ``max_length``, found before training starts, not mid-run, as
    ``(record, message)``."""
    return over_length(records, record_lengths(records, collator), collator.max_length)


def over_length(records, lengths: list[int], max_length: int) -> list[tuple]:
    found = []
    for record, length in zip(records, lengths, strict=True):
        if length > max_length:
            where = f"{record.source}: " if record.source else ""
            found.append((record, f"{where}record {record.id!r} (task {record.task}, {record.image}): prompt + answer "
                                  f"is about {length} tokens, longer than data.max_length={max_length}"))
    return found


def record_lengths(records, collator: TrainCollator) -> list[int]:
    """Each record's prompt + answer in tokens, image tokens included (what a padded batch pads to): the image's
    token count measured on the first record with an image; where the processor sizes images by their resolution
    (Qwen2-VL's dynamic resolution, InternVL's tiles), each image's own count from its size (read from the file's
    header) as the processor reports it. (The over-length check of the collator measures every batch exactly.)"""
    if not records:
        return []
    from mmtune.data.collate import prompt_text

    tokenizer, processor = collator.tokenizer, collator.processor
    image_tokens = 0
    pictured = next((r for r in records if r.image is not None), None)
    per_image = None
    if pictured is not None:
        first_prompt = prompt_text(processor, pictured.prompt)
        text_only = len(tokenizer(first_prompt, add_special_tokens=False)["input_ids"])
        image = RecordDataset([pictured])[0]["image"]
        image = image[0] if isinstance(image, list) else image
        with_image = processor(text=[first_prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
        image_tokens = with_image - text_only
        per_image = image_token_counter(processor, image.size, image_tokens)
    # (a conversation's earlier answers are in its rendered prompt already)
    return [len(tokenizer(prompt_text(processor, record), add_special_tokens=False)["input_ids"]) +
            (sum(map(per_image, record.images)) if per_image else image_tokens * len(record.images)) +
            len(collator.answer_ids(record.target)) for record in records]


def image_token_counter(processor, first_size: tuple[int, int], first_tokens: int):
    """For a processor whose image token count follows the image's size: ``path → tokens`` (the first image's
    measured count, moved by the processor's own count for each size: ``_get_num_multimodal_tokens``, what vLLM
    reads); None where every size gets the same count, or the processor can't say."""
    from PIL import Image

    count = getattr(processor, "_get_num_multimodal_tokens", None)
    try:
        def tokens(size: tuple[int, int]) -> int:  # PIL's (width, height) → the processor's (height, width)
            return int(count(image_sizes=[(size[1], size[0])]).num_image_tokens[0])

        base = tokens(first_size)
        if tokens((first_size[0] * 4 + 7, first_size[1] * 3 + 5)) == base:
            return None
    except Exception:  # noqa: BLE001 — no counter, or one this processor does not implement
        return None

    def counted(path: str) -> int:
        with Image.open(path) as image:  # the header only: no pixels decoded
            return first_tokens + tokens(image.size) - base
    return counted
