"""Keep the best model of the evaluations during training, and stop early when it stops improving.

``train.best_metric`` names what "best" means — ``S``, ``G``, ``H`` (raw means), ``S/base``, ``G/base``, ``H/base``
(normalised to the base model), ``S/adj``, ``G/adj``, ``H/adj`` (chance-adjusted), ``S/head``, ``H/head`` (the primary
summary: downstream headroom gained, ``mmtune.report``), or one task's score by its name (all higher-is-better); or ``val_loss`` (the mean of
the evaluated tasks' validation losses, teacher-forced) or ``val_loss/<task>`` (lower-is-better: the Hugging Face
Trainer's ``eval_loss`` choice). Each evaluation during
training (``eval.every_steps``) that beats the best so far writes ``<run>/best/`` (the model as ``final/`` is, or a
PEFT adapter for LoRA) atomically; ``<run>/best.json`` says which step and value. A resumed run replays the
evaluations of ``metrics.jsonl`` to continue the same bookkeeping.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from mmtune.files import atomic_write

SUMMARIES = ("S", "G", "H", "S/base", "G/base", "H/base", "S/adj", "G/adj", "H/adj", "S/head", "H/head")


def lower_is_better(name: str) -> bool:
    return name == "val_loss" or name.startswith("val_loss/")


def metric_value(summary: dict, name: str) -> float:
    """``name`` from one evaluation's summary (S / G / H …, a task's score, val_loss[/task]); a name it lacks is an
    error listing those it has."""
    if name in SUMMARIES and name in summary:
        return float(summary[name])
    tasks, losses = summary.get("tasks", {}), summary.get("val_loss", {})
    if name in tasks:
        return float(tasks[name])
    if name == "val_loss" and losses:
        return sum(losses.values()) / len(losses)
    if name.startswith("val_loss/") and name.removeprefix("val_loss/") in losses:
        return float(losses[name.removeprefix("val_loss/")])
    known = [k for k in SUMMARIES if k in summary] + sorted(tasks) + \
        (["val_loss", *(f"val_loss/{t}" for t in sorted(losses))] if losses else [])
    raise ValueError(f"train.best_metric={name!r} is not in the evaluation; choose one of {', '.join(known)}")


@dataclass
class BestState:
    metric: str
    value: float | None = None  # the best so far (None: no evaluation yet)
    step: int = 0
    evaluations_without_improvement: int = 0

    def describe(self) -> str:
        return "none yet" if self.value is None else f"{self.value:.2f} at step {self.step}"

    def beaten_by(self, value: float) -> bool:
        if self.value is None:
            return not math.isnan(value)
        return value < self.value if lower_is_better(self.metric) else value > self.value

    @classmethod
    def replay(cls, metrics_file: Path, metric: str) -> BestState:
        """The state after the evaluations already in ``metrics.jsonl`` (a resumed run has dropped the rows after
        its checkpoint, so it continues exactly as the uninterrupted run did)."""
        state = cls(metric)
        if Path(metrics_file).exists():
            for line in Path(metrics_file).read_text().splitlines():
                row = json.loads(line) if line.strip() else {}
                if "eval" in row:
                    value = metric_value(row["eval"], metric)
                    if state.beaten_by(value):
                        state.value, state.step, state.evaluations_without_improvement = value, row["step"], 0
                    else:
                        state.evaluations_without_improvement += 1
        return state

    def save(self, root: Path) -> None:
        atomic_write(Path(root) / "best.json", json.dumps(asdict(self), indent=2) + "\n")


def update_best(state: BestState, summary: dict, step: int, save_model, root: Path) -> bool:
    """Record one evaluation; on a new best, write ``<root>/best`` with ``save_model(folder)`` (which replaces it
    whole). Returns whether it was a new best. (Call on the main process.)"""
    value = metric_value(summary, state.metric)
    improved = state.beaten_by(value)
    if improved:
        save_model(Path(root) / "best")  # atomic: mmtune.models.save.write_model_folder
        state.value, state.step, state.evaluations_without_improvement = value, step, 0
    else:
        state.evaluations_without_improvement += 1
    state.save(root)
    return improved
