"""Evaluation during training (every ``eval.every_steps``): a row per evaluation in ``metrics.jsonl`` with each task's
score and validation loss, the best model by ``train.best_metric`` in ``<run>/best``, and early stopping.

The main process evaluates (on the first ``eval.during_limit`` records per task); the others wait for it
(``Peers.wait_for_main``, which names a main process that died meanwhile). A preemption signal during an
evaluation cuts it short: it is removed and redone when the run resumes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmtune.best import metric_value, update_best
from mmtune.evaluate import run_evaluation  # noqa: F401 — public here too, as before
from mmtune.models.save import write_model_folder
from mmtune.precision import saved_dtype, to_saved_dtype
from mmtune.preemption import EvaluationInterrupted
from mmtune.summary import GAP_KEYS, HALLUCINATION_KEYS, summarize

if TYPE_CHECKING:
    from mmtune.run import Run
    from mmtune.step_log import StepLog


def base_needs_evaluation(run: Run) -> bool:
    """Whether the base model's full evaluation (``eval.before``) is still to be done, on this process."""
    return run.config.eval.before and run.is_main and not (run.paths.base_eval / "scores.json").exists()


def is_due(run: Run) -> bool:
    """Whether the current step evaluates (``eval.every_steps``, and always the last step)."""
    every, step = run.config.eval.every_steps, run.ctx.step
    return bool(every) and not run.sharded and (step % every == 0 or step == run.ctx.total_steps)


def redo_cut_evaluation(run: Run, log: StepLog) -> bool:
    """At the start of a resumed loop: an evaluation of the checkpoint's step that a preemption cut short is redone.
    Returns whether it stops the run early (``keep_best``)."""
    if run.ctx.step and is_due(run) and not (run.paths.during(f"step-{run.ctx.step:06d}") / "scores.json").exists():
        return evaluation_row(run, log)
    return False


def evaluation_row(run: Run, log: StepLog) -> bool:
    """An evaluation during training at the current step: its row into ``metrics.jsonl`` and the trackers, then the
    best model / early stopping bookkeeping. Returns whether the run stops early."""
    eval_row = evaluate_during_training(run, f"step-{run.ctx.step:06d}")
    log.evaluation(eval_row)
    return keep_best(run, eval_row) if run.best is not None else False


def keep_best(run: Run, eval_row: dict | None) -> bool:
    """After an evaluation during training (on every process; ``eval_row`` is the main process's): a new best of
    ``train.best_metric`` writes ``<run>/best``; after ``train.early_stopping_patience`` evaluations in a row without
    one, every process agrees to stop — the return value (True: stop)."""
    if run.is_main and eval_row is not None:
        improved = update_best(run.best, eval_row["eval"], run.ctx.step, lambda folder: save_best_model(run, folder),
                               run.paths.root)
        mark = "new best" if improved else f"best still {run.best.describe()}"
        run.say(f"step {run.ctx.step}: {run.best.metric} = {metric_value(eval_row['eval'], run.best.metric):.2f} "
                f"({mark})")
    patience = run.config.train.early_stopping_patience
    if not patience:
        return False
    count = torch.tensor(float(run.best.evaluations_without_improvement if run.is_main else 0),
                         device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        count = run.accelerator.reduce(count, "sum")
    if float(count) < patience:
        return False
    run.say(f"early stop at step {run.ctx.step}: no new best {run.best.metric} in {patience} evaluations "
            f"(best {run.best.describe()}, in {run.paths.root / 'best'})")
    return True


def save_best_model(run: Run, folder: Path) -> None:
    """``best/`` as ``final/`` is written (``mmtune.models.save``): in model.dtype; a PEFT model (LoRA) saves its adapter
    (PEFT keeps adapters in fp32)."""
    model = run.ctx.unwrapped
    dtype = saved_dtype(run.config.model.dtype, run.config.train.fp32_masters)
    state = None if hasattr(model, "peft_config") else to_saved_dtype(model.state_dict(), dtype)
    write_model_folder(model, run.processor, folder, state_dict=state, overwrite=True,
                       checkpoints=run.paths.checkpoints)


def evaluate_during_training(run: Run, name: str) -> dict | None:
    """Evaluate the model on the first ``eval.during_limit`` records per task (main process; the others wait)
    into ``eval/during/<name>`` and return one metrics row: per-task scores and S / G / H, raw and normalised
    to the base on the same records (``name="base"``, evaluated once before training) — the trade-off as it
    forms."""
    row = None
    if run.is_main:
        model = run.ctx.unwrapped
        was_training = model.training
        model.eval()
        cut = run.watch.interruptible() if run.watch is not None else contextlib.nullcontext()
        try:
            with cut, run.accelerator.autocast():  # fp32 masters beside low-precision weights need autocast
                scores = run_evaluation(model, run.processor, run.config, run.world, run.paths.during(name),
                                        limit=run.config.eval.during_limit)
        except EvaluationInterrupted as signal_name:
            shutil.rmtree(run.paths.during(name), ignore_errors=True)  # half an evaluation is no evaluation
            run.say(f"evaluation {name} cut short by {signal_name}: it is redone when the run resumes")
            scores = None
        model.train(was_training)
        base_file = run.paths.during("base") / "scores.json"
        base = json.loads(base_file.read_text()) if base_file.exists() else None
        if scores is not None:
            summary = summarize(scores, base)
            # with each task's validation loss (teacher-forced, on the same records): which task overfits when
            losses = {task: result["target_loss"] for task, result in scores["tasks"].items()}
            # and NRCA's diagnostic: how much each task's target confidence still depends on the image
            gaps = {key: {task: result[key] for task, result in scores["tasks"].items() if key in result}
                    for key in GAP_KEYS}
            # and, with eval.sample_temperature, the open-response tasks' scores on sampled answers
            sampled = {task: result["sampled_score"] for task, result in scores["tasks"].items()
                       if "sampled_score" in result}
            # and, where the records list what each image holds, the share of answers naming something it lacks
            made_up = {key: {task: result[key] for task, result in scores["tasks"].items() if key in result}
                       for key in HALLUCINATION_KEYS}
            row = {"step": run.ctx.step,
                   "eval": {**{k: v for k, v in summary.items() if k not in ("normalised", "adjusted", "headroom")},
                            "val_loss": losses, **{key: value for key, value in gaps.items() if value},
                            **({"sampled": sampled} if sampled else {}),
                            **{key: value for key, value in made_up.items() if value}}}
    run.peers.wait_for_main(run.accelerator)
    return row


