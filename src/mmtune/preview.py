"""``mmtune data preview``: training examples exactly as the model sees them — the chat template applied, the image
tokens expanded, and which tokens are learned (labels) and which are masked — before any training.

LLaMA-Factory prints ``input_ids`` / ``inputs`` / ``label_ids`` / ``labels`` of its first example; this prints the
same from mmtune's own collator (``TrainCollator``), so what it shows is what trains: a wrong template, a mask that
learns the prompt, a target cut by ``data.max_length`` or an image that expands to no tokens shows here first.
"""

from __future__ import annotations

from pathlib import Path

from mmtune.config import RunConfig
from mmtune.data.collate import IGNORE_INDEX, TrainCollator, load_image
from mmtune.data.mixture import read_task
from mmtune.data.registry import load_registry
from mmtune.data.synthetic import ensure_world, resolve_task_path
from mmtune.models.base_model import check_model_source
from mmtune.models.load import load_processor, set_pixel_budget
from mmtune.train_data import world_dir


def preview_processor(config: RunConfig):
    """The run's processor alone (a checkpoint's weights are not loaded; a tiny model's is built as training does)."""
    if config.model.tiny:
        from mmtune.models.base_model import load_base

        return load_base(config)[1]
    check_model_source(config)
    processor = load_processor(config.model.path)
    set_pixel_budget(processor, config.model.min_pixels, config.model.max_pixels)
    return processor


def preview_records(config: RunConfig, count: int) -> list:
    """The first ``count`` records of each training task (as its source holds them; the synthetic world is made if
    the run would make it)."""
    world = world_dir(config)
    if world is not None:
        synth = config.data.synthetic
        ensure_world(world, synth.seed, synth.n_train, synth.n_test, synth.image_size, config.train.progress,
                     version=synth.version, caption_errors=synth.caption_errors)
    registry = load_registry(config.data.registry) if config.data.registry else None
    if not config.data.tasks:
        raise ValueError("data.tasks is empty: name at least one task file")
    records = []
    for spec in config.data.tasks:
        records += read_task(spec, lambda p: resolve_task_path(p, world, "train"), registry=registry)[:count]
    return records


def render_example(collator: TrainCollator, record) -> str:
    """One record through the collator: the decoded input with the learned tokens in ``[[…]]``, a run of one image
    token shown once with its count, then the ids."""
    batch = collator([{"record": record, "image": load_image(record)}])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tokenizer = collator.tokenizer
    image_id = getattr(collator.processor, "image_token_id", None)
    segments: list[tuple[str, list[int]]] = []  # runs of masked text, learned text, and one image token
    for token, label in zip(ids, labels, strict=True):
        kind = "learned" if label != IGNORE_INDEX else "image" if token == image_id else "masked"
        if segments and segments[-1][0] == kind:
            segments[-1][1].append(token)
        else:
            segments.append((kind, [token]))
    shown = [f"{tokenizer.decode(tokens[:1])}×{len(tokens)}" if kind == "image" else
             f"[[{tokenizer.decode(tokens)}]]" if kind == "learned" else tokenizer.decode(tokens)
             for kind, tokens in segments]
    learned_count = sum(label != IGNORE_INDEX for label in labels)
    where = f"{record.source}" if record.source else f"record {record.id}"
    return "\n".join([
        f"── {where} (task {record.task}, {record.kind}; {len(record.images)} image(s)) ──",
        "".join(shown),
        f"{len(ids)} tokens, {learned_count} learned (in [[…]]), {len(ids) - learned_count} masked",
        f"input_ids: {ids}",
        f"label_ids: {labels}",
    ])


def preview(config: RunConfig, count: int = 1) -> str:
    """``count`` examples of each training task, rendered (``render_example``)."""
    processor = preview_processor(config)
    collator = TrainCollator(processor, config.data.max_length)
    examples = [render_example(collator, record) for record in preview_records(config, count)]
    model = config.model.path or f"tiny {config.model.tiny}"
    return f"{len(examples)} training example(s) as {Path(model).name or model} sees them:\n\n" + "\n\n".join(examples)
