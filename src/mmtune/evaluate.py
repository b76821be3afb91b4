"""Batched greedy generation over each task's test records, scored with the task's metric (and, if asked, sampled
generation of the open-response tasks).

Every evaluation writes ``predictions/<task>.jsonl`` (one line per sample: id, prompt, prediction,
references, per-sample score) next to ``scores.json``, so a number can always be traced to its samples.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmtune.config import RunConfig, TaskSpec
from mmtune.data.collate import (
    IGNORE_INDEX,
    KEEP,
    GenerationCollator,
    RecordDataset,
    TrainCollator,
    accepts_logits_to_keep,
    model_inputs,
)
from mmtune.data.mixture import draw, read_task
from mmtune.data.records import Record, metric_choice
from mmtune.data.registry import load_registry
from mmtune.data.synthetic import resolve_task_path
from mmtune.files import atomic_write, safe_file_name
from mmtune.losses import per_sample_mean, target_log_probs
from mmtune.metrics import caption_ceiling, hallucinations, score


def load_tasks(sources: list, limit: int | None = None, resolve=Path, registry: dict | None = None,
               data_seed: int = 0, skip_bad_records: bool = False,
               skipped: list[str] | None = None) -> dict[str, list[Record]]:
    """Records grouped by task name (a source may hold several tasks); at most ``limit`` per task. A source is a
    path or a task spec as in ``data.tasks`` (a ``TaskSpec``: a file, a Hugging Face dataset, ``dataset:<name>``):
    its ``metric`` is stamped on its records, its ``n`` draws that many with ``data_seed`` (kept in file order)."""
    tasks: dict[str, list[Record]] = defaultdict(list)
    for source in sources:
        spec = source if isinstance(source, TaskSpec) else TaskSpec(path=str(source))
        records = read_task(spec, resolve, skip_bad_records, skipped, registry)
        if spec.metric is not None:
            records = with_metric(records, spec.metric, spec.path)
        if spec.n is not None:
            chosen = {id(r) for r in draw(records, spec.n, data_seed)}
            records = [r for r in records if id(r) in chosen]
        for record in records:
            if limit is None or len(tasks[record.task]) < limit:
                tasks[record.task].append(record)
    if not tasks:
        raise ValueError(f"no records in {[str(getattr(s, 'path', s)) for s in sources]}")
    return dict(tasks)


def with_metric(records: list[Record], metric: str, where: str) -> list[Record]:
    """``records`` scored by their task spec's ``metric``; a record that declares another one is an error."""
    for record in records:
        if record.metric not in (None, metric):
            raise ValueError(f"{record.source or where}: record {record.id!r} declares metric {record.metric!r}, but "
                             f"its task spec ({where}) says metric: {metric}")
        record.metric = metric
    return records


@torch.no_grad()
def generate(model, processor, records: list[Record], batch_size: int = 16, max_new_tokens: int = 128,
             progress: bool = True, desc: str = "generate", sampling: dict | None = None) -> list[str]:
    """Answers for ``records``: left-padded batches, KV cache, new tokens only. Greedy unless ``sampling``
    gives ``generate`` options (``{"do_sample": True, "temperature": 0.7, "top_p": 0.9}``)."""
    model.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    loader = DataLoader(RecordDataset(records), batch_size=batch_size, collate_fn=GenerationCollator(processor))
    device = next(model.parameters()).device
    answers: list[str] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        batch.pop("records")
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        options = sampling or {"do_sample": False, "num_beams": 1}
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                use_cache=True, **options)
        new = tokens[:, inputs["input_ids"].shape[1]:]
        answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


@torch.no_grad()
def teacher_forced(model, processor, records: list[Record], batch_size: int = 16,
                   max_length: int = 2048) -> dict[str, float]:
    """Per-record means of the target tokens, teacher-forced, averaged over records: ``confidence`` (the mean
    probability the model gives its target tokens, NRCA's clean ``c_i``) and ``loss`` (the mean token
    cross-entropy: the task's validation loss, on the same scale as the training loss with
    ``loss_reduction=sample``).

    Why both: NRCA divides by the confidence — a base that gives the downstream targets almost no probability (a
    format it never saw) makes its relative gap explode, so the benchmark reports it; the loss is what a user watches
    per task during training (is one task overfitting while the others still learn?).

    NRCA's diagnostic beside them: ``noised_confidence``, the same confidence with every image replaced by NRCA's
    noised view (``(1 − δ)X + δε``, δ = 0.5, a fixed seed), and ``confidence_gap`` = clean − noised over the records
    with an image — how much the image still carries the answer. A gap shrinking over training while the score falls
    is the paper's open-response overfitting (the model answers from language priors).

    Where the records say which answer words depend on the image (``extra.image_words``), the same split by token:
    ``confidence_image`` / ``noised_confidence_image`` / ``confidence_gap_image`` over those tokens, ``…_template``
    over the others (per record, then over the records that have such tokens). A caption is mostly template ("there
    is … on a … background"), which the image can't change: the whole-answer gap dilutes the part that can.
    """
    from mmtune.methods.nrca import noisy_view

    model.eval()
    collate = TrainCollator(processor, max_length, mark_image_tokens=True, target_logits=accepts_logits_to_keep(model))
    loader = DataLoader(RecordDataset(records), batch_size=batch_size, collate_fn=collate)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    confidence = loss = clean_pictured = noised = 0.0
    pictured = 0
    split = {f"{what}_{part}": 0.0 for what in ("clean", "noised") for part in ("image", "template")}
    split_records = {"image": 0, "template": 0}
    for batch in loader:
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        labels = batch["labels"].to(device)
        log_probs, index = target_log_probs(model(**inputs).logits, labels, inputs.get(KEEP))
        per_record = per_sample_mean(log_probs.exp(), index, labels.shape[0])
        confidence += per_record.sum().item()
        loss += per_sample_mean(-log_probs, index, labels.shape[0]).sum().item()
        if "pixel_values" in inputs:
            rows = batch["image_mask"].to(device) if "image_mask" in batch else torch.ones_like(per_record, dtype=bool)
            noisy = {**inputs, "pixel_values": noisy_view(inputs["pixel_values"], 0.5, generator)}
            noisy_log_probs, noisy_index = target_log_probs(model(**noisy).logits, labels, inputs.get(KEEP))
            noisy_record = per_sample_mean(noisy_log_probs.exp(), noisy_index, labels.shape[0])
            clean_pictured += per_record[rows].sum().item()
            noised += noisy_record[rows].sum().item()
            pictured += int(rows.sum())
            if "image_tokens" in batch:
                is_image = batch["image_tokens"].to(device)[:, 1:][labels[:, 1:] != IGNORE_INDEX]
                for part, chosen in (("image", is_image), ("template", ~is_image)):
                    counts = torch.zeros_like(per_record).index_add(0, index[chosen], torch.ones_like(
                        log_probs[chosen]))
                    having = rows & (counts > 0)
                    for what, values in (("clean", log_probs), ("noised", noisy_log_probs)):
                        means = per_sample_mean(values[chosen].exp(), index[chosen], labels.shape[0])
                        split[f"{what}_{part}"] += means[having].sum().item()
                    split_records[part] += int(having.sum())
    result = {"confidence": confidence / len(records), "loss": loss / len(records)}
    if pictured:
        result["noised_confidence"] = noised / pictured
        result["confidence_gap"] = (clean_pictured - noised) / pictured
    for part, count in split_records.items():
        if count:
            result[f"confidence_{part}"] = split[f"clean_{part}"] / count
            result[f"noised_confidence_{part}"] = split[f"noised_{part}"] / count
            result[f"confidence_gap_{part}"] = (split[f"clean_{part}"] - split[f"noised_{part}"]) / count
    return result


# What teacher_forced's diagnostic adds to a task's scores (the split: where the records name their image words).
DIAGNOSTIC_KEYS = ("noised_confidence", "confidence_gap",
                   *(f"{what}_{part}" for part in ("image", "template")
                     for what in ("confidence", "noised_confidence", "confidence_gap")))


def target_confidence(model, processor, records: list[Record], batch_size: int = 16, max_length: int = 2048) -> float:
    """Mean over records of the mean probability the model gives its target tokens (see ``teacher_forced``)."""
    return teacher_forced(model, processor, records, batch_size, max_length)["confidence"]


def chance_score(records: list[Record]) -> float:
    """The score a random guess gets, in the task's units: 100 / (number of choices) for multiple choice, averaged
    over the records; 0 for free-form answers (a guess that matches a free answer is rare; yes/no questions are the
    exception this leaves out)."""
    choices = [len(r.choices) for r in records if r.choices]
    return 100 * sum(1 / n for n in choices) / len(records) if choices and len(choices) == len(records) else 0.0


def hallucination(records: list[Record], answers: list[str]) -> dict | None:
    """The CHAIR-style hallucination of ``answers`` over the records that list what their image holds
    (``extra.present``): None when none does (``mmtune.metrics.hallucinations``)."""
    listed = [(r.extra["present"], a) for r, a in zip(records, answers, strict=True) if r.extra.get("present")]
    if not listed:
        return None
    found = hallucinations([a for _, a in listed], [p for p, _ in listed])
    return {**found, "n": len(listed)}


def ceiling_score(metric: str, records: list[Record]) -> float:
    """The best score an answer can get, in the task's units: 100 for accuracies, and for captions (CIDEr) the score of
    the best of each record's own references (``mmtune.metrics.caption_ceiling``) — computed once per set of
    references, not at every evaluation during training (the records don't change)."""
    if metric != "cider":
        return 100.0
    return _caption_ceiling(tuple((r.id, tuple(r.answers)) for r in records))


@functools.lru_cache(maxsize=32)
def _caption_ceiling(references: tuple[tuple[str, tuple[str, ...]], ...]) -> float:
    return caption_ceiling({record: list(answers) for record, answers in references})


def sampled_answers(model, processor, records: list[Record], temperature: float, seed: int, batch_size: int = 16,
                    max_new_tokens: int = 128, progress: bool = True, desc: str = "sample") -> list[str]:
    """Answers sampled from the model's own distribution at ``temperature`` (no top-k / top-p cut), from a fixed
    ``seed`` so every evaluation draws the same random numbers; the caller's random state is left as it was (an
    evaluation during training must not change what the training draws next)."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return generate(model, processor, records, batch_size, max_new_tokens, progress, desc,
                        sampling={"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0})


def evaluate(model, processor, sides: dict[str, list], out_dir: str | Path, batch_size: int = 16,
             max_new_tokens: int = 128, limit: int | None = None, progress: bool = True,
             overwrite: bool = False, sample_temperature: float | None = None, sample_seed: int = 0,
             sources: dict | None = None, say=None) -> dict:
    """Evaluate every task of every side (``{"downstream": [...], "heldout": [...]}``: paths or task specs, read by
    ``load_tasks`` with ``sources``' keywords — resolve, registry, data_seed, skip_bad_records); write and return
    scores. ``say`` (e.g. ``print``) is told how each task is scored where no one chose its metric.

    With ``sample_temperature``, open-response tasks (scored by CIDEr) are also scored on sampled answers
    (``sampled_score``; their lines in ``predictions/<task>.sampled.jsonl``): a greedy caption keeps the most likely
    word even when the model's confidence has drifted towards a wrong one, a sampled caption says it as often as the
    model believes it."""
    out = Path(out_dir)
    if (out / "scores.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'scores.json'} exists; choose another --out or pass --overwrite")
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    results: dict = {"tasks": {}}
    skipped: list[str] = []
    for side, paths in sides.items():
        if not paths:
            continue
        for task, records in load_tasks(paths, limit, skipped=skipped, **(sources or {})).items():
            metric, chosen = metric_choice(records)
            if say is not None and chosen != "declared":
                say(f"{task}: scored by {metric} ({chosen}; choose with metric: in its task spec or records)")
            predictions = generate(model, processor, records, batch_size, max_new_tokens, progress, f"eval {task}")
            items = [{"id": r.id, "prediction": p, "answers": r.answers, "choices": r.choices,
                      "answer_index": r.answer_index} for r, p in zip(records, predictions, strict=True)]
            result = score(metric, items)
            forced = teacher_forced(model, processor, records, batch_size)
            # Everything `mmtune score` needs to re-score the file with any metric (choices for multiple choice).
            made_up = hallucination(records, predictions)
            absent = dict(zip((r.id for r in records if r.extra.get("present")), made_up["per_answer"],
                              strict=True)) if made_up else {}
            lines = [json.dumps({"id": record.id, "prompt": record.prompt, "prediction": item["prediction"],
                                 "answers": record.answers, "metric": metric, "score": value,
                                 **({"choices": record.choices, "answer_index": record.answer_index}
                                    if record.choices is not None else {}),
                                 **({"hallucinated": absent[record.id]} if record.id in absent else {})}) + "\n"
                     for record, item, value in zip(records, items, result.per_sample, strict=True)]
            atomic_write(out / "predictions" / f"{safe_file_name(task)}.jsonl", "".join(lines))
            results["tasks"][task] = {**result.as_dict(), "side": side, "metric_choice": chosen,
                                      "target_confidence": forced["confidence"],
                                      "target_loss": forced["loss"], "chance": chance_score(records),
                                      "ceiling": ceiling_score(metric, records),
                                      **{k: forced[k] for k in DIAGNOSTIC_KEYS if k in forced}}
            if made_up:
                results["tasks"][task].update(hallucination=made_up["rate"],
                                              hallucination_mentions=made_up["mention_rate"])
            if sample_temperature is not None and metric == "cider":
                sampled = sampled_answers(model, processor, records, sample_temperature, sample_seed, batch_size,
                                          max_new_tokens, progress, f"sample {task}")
                sampled_result = score(metric, [{**item, "prediction": p} for item, p in
                                                zip(items, sampled, strict=True)])
                atomic_write(out / "predictions" / f"{safe_file_name(task)}.sampled.jsonl", "".join(
                    json.dumps({"id": record.id, "prompt": record.prompt, "prediction": p, "answers": record.answers,
                                "metric": metric, "score": value, "temperature": sample_temperature,
                                "seed": sample_seed}) + "\n"
                    for record, p, value in zip(records, sampled, sampled_result.per_sample, strict=True)))
                results["tasks"][task].update(sampled_score=sampled_result.score,
                                              sample_temperature=sample_temperature)
                sampled_made_up = hallucination(records, sampled)
                if sampled_made_up:
                    results["tasks"][task]["sampled_hallucination"] = sampled_made_up["rate"]
    if skipped:  # data.skip_bad_records: what the evaluation left out, counted where its scores are
        results["skipped_records"] = {"count": len(skipped), "examples": skipped[:20]}
        if say is not None:
            say(f"evaluation skipped {len(skipped)} bad records (data.skip_bad_records=true); first: {skipped[0]}")
    atomic_write(out / "scores.json", json.dumps(results, indent=2) + "\n")
    return results


def run_evaluation(model, processor, config: RunConfig, world: Path | None, out: Path,
                   limit: int | None = None, say=None) -> dict | None:
    """Evaluate the configured downstream and held-out tasks (nothing if none are configured): their specs read as
    ``data.tasks`` are (synthetic tasks from the world's test split, ``dataset:`` names from ``data.registry``), an
    ``n`` drawn with ``data.seed`` (0 where null: every training seed is scored on the same records)."""
    sides = {side: getattr(config.eval, side) for side in ("downstream", "heldout")}
    if not any(sides.values()):
        return None
    sources = {"resolve": lambda p: resolve_task_path(p, world, "test"),
               "registry": load_registry(config.data.registry) if config.data.registry else None,
               "data_seed": config.data.seed or 0, "skip_bad_records": config.data.skip_bad_records}
    return evaluate(model, processor, sides, out, config.eval.batch_size, config.eval.max_new_tokens,
                    limit or config.eval.limit, config.train.progress, overwrite=True,
                    sample_temperature=config.eval.sample_temperature, sample_seed=config.eval.sample_seed,
                    sources=sources, say=say)
