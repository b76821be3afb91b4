"""Keep the best model of the evaluations during training, and stop early when it stops improving.

``train.best_metric`` names what "best" means — ``S``, ``G``, ``H`` (raw means), ``S/base``, ``G/base``, ``H/base``
(normalised to the base model), or one task's score by its name — always higher-is-better. Each evaluation during
training (``eval.every_steps``) that beats the best so far writes ``<run>/best/`` (the model as ``final/`` is, or a
PEFT adapter for LoRA) atomically; ``<run>/best.json`` says which step and value. A resumed run replays the
evaluations of ``metrics.jsonl`` to continue the same bookkeeping.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from mmtune.files import atomic_write

SUMMARIES = ("S", "G", "H", "S/base", "G/base", "H/base")


def metric_value(summary: dict, name: str) -> float:
    """``name`` from one evaluation's summary (S / G / H …, or a task's score); a name it lacks is an error
    listing those it has."""
    if name in SUMMARIES and name in summary:
        return float(summary[name])
    tasks = summary.get("tasks", {})
    if name in tasks:
        return float(tasks[name])
    known = [k for k in SUMMARIES if k in summary] + sorted(tasks)
    raise ValueError(f"train.best_metric={name!r} is not in the evaluation; choose one of {', '.join(known)}")


@dataclass
class BestState:
    metric: str
    value: float = -math.inf
    step: int = 0
    evaluations_without_improvement: int = 0

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
                    if value > state.value:
                        state.value, state.step, state.evaluations_without_improvement = value, row["step"], 0
                    else:
                        state.evaluations_without_improvement += 1
        return state

    def save(self, root: Path) -> None:
        atomic_write(Path(root) / "best.json", json.dumps(asdict(self), indent=2) + "\n")


def update_best(state: BestState, summary: dict, step: int, save_model, root: Path) -> bool:
    """Record one evaluation; on a new best, write ``<root>/best`` with ``save_model(folder)``. Returns whether it
    was a new best. (Call on the main process.)"""
    value = metric_value(summary, state.metric)
    improved = value > state.value
    if improved:
        partial, final = Path(root) / "best.partial", Path(root) / "best"
        shutil.rmtree(partial, ignore_errors=True)
        save_model(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        state.value, state.step, state.evaluations_without_improvement = value, step, 0
    else:
        state.evaluations_without_improvement += 1
    state.save(root)
    return improved
