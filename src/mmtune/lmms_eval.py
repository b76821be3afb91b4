"""Held-out benchmarks the community runs (MME, MMBench, POPE, MMMU) through lmms-eval, read into mmtune's report.

lmms-eval writes one results JSON per evaluation (``--output_path``): ``results`` maps each task to its metrics
(``"mme_percetion_score,none": 1402.3``, ``"pope_accuracy,none": 0.86``, their ``_stderr``), ``config.model_args``
says which model (``pretrained=<folder>,...``) and ``higher_is_better`` the direction of each metric. Each metric
becomes a held-out column of the report (``mme/mme_percetion_score``, or the task's name when it has one metric),
matched to a run by its model folder: a run's ``final/`` (or ``best/``) for the run's row, the runs' base model for
the base. Raw values keep lmms-eval's scales (0–1 accuracies beside 0–2000 MME scores), so read G/base — the share of
the base's score kept, scale-free — not raw G; no chance level is known for them (chance-adjusted columns use 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def model_of(model_args) -> str | None:
    """The ``pretrained=`` folder of lmms-eval's ``model_args`` (a ``k=v,k=v`` string, or a mapping)."""
    if isinstance(model_args, dict):
        return model_args.get("pretrained")
    for part in str(model_args or "").split(","):
        key, _, value = part.partition("=")
        if key.strip() == "pretrained":
            return value.strip().strip("'\"")
    return None


def read_results(path: str | Path) -> dict:
    """``{"model": resolved folder, "tasks": {column: score}}`` from one lmms-eval results file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not an lmms-eval results file ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: no 'results' mapping (an lmms-eval results JSON from --output_path)")
    model = model_of((data.get("config") or {}).get("model_args"))
    if not model:
        raise ValueError(f"{path}: config.model_args names no pretrained=<folder>: the report can't tell which model "
                         "it evaluated")
    directions = data.get("higher_is_better") or {}
    tasks: dict[str, float] = {}
    for task, metrics in data["results"].items():
        values = {key.split(",")[0]: value for key, value in metrics.items()
                  if key != "alias" and "_stderr" not in key and isinstance(value, int | float)
                  and not isinstance(value, bool) and math.isfinite(value)}
        for metric, value in values.items():
            if directions.get(task, {}).get(metric) is False:
                raise ValueError(f"{path}: {task} {metric} is lower-is-better; the report's S / G read every score as "
                                 "higher-is-better (leave this task out of the lmms-eval run)")
            tasks[task if len(values) == 1 else f"{task}/{metric}"] = float(value)
    if not tasks:
        raise ValueError(f"{path}: no numeric metric in its results")
    return {"model": str(Path(model).expanduser().resolve()), "tasks": tasks, "file": str(path)}


def by_model(paths: list[str | Path]) -> dict[str, dict]:
    """The results files keyed by the model folder they evaluated (two files for one model: their tasks merged,
    a task in both is an error)."""
    models: dict[str, dict] = {}
    for path in paths:
        result = read_results(path)
        known = models.setdefault(result["model"], {"tasks": {}, "files": []})
        twice = set(known["tasks"]) & set(result["tasks"])
        if twice:
            raise ValueError(f"{path}: {sorted(twice)[0]} of {result['model']} is also in {known['files'][0]}")
        known["tasks"].update(result["tasks"])
        known["files"].append(str(path))
    return models


def add_heldout(scores: dict, tasks: dict[str, float]) -> dict:
    """``scores.json`` content with lmms-eval's tasks added as held-out columns."""
    added = {name: {"score": value, "side": "heldout", "metric": "lmms-eval", "chance": 0.0}
             for name, value in tasks.items()}
    clash = set(added) & set(scores["tasks"])
    if clash:
        raise ValueError(f"lmms-eval task {sorted(clash)[0]} has the name of one of mmtune's evaluated tasks")
    return {**scores, "tasks": {**scores["tasks"], **added}}
