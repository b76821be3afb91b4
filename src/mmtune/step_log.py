"""Where each step's numbers go: ``metrics.jsonl`` (the main process; the one writer of that file), the trackers of
``train.report_to`` (tensorboard, W&B, MLflow through Accelerate), and the progress bar — or, without one (logs, CI),
a status line per ~5% of the run."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import time

import torch
from tqdm import tqdm

from mmtune.checkpoint import disk_full_error, disk_is_full
from mmtune.config import RunConfig, flat_config, to_dict
from mmtune.run_folder import RunPaths

TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def available_trackers(names: list[str]) -> list[str]:
    """The trackers of ``train.report_to`` to start. One named on purpose and not installed is an error; the
    default (tensorboard) is skipped quietly when tensorboard is not installed."""
    missing = [n for n in names if importlib.util.find_spec(TRACKER_MODULES[n]) is None]
    if missing and names != ["tensorboard"]:
        raise ValueError(f"train.report_to names {', '.join(missing)}, which is not installed here: "
                         f"pip install {' '.join(missing)} (or remove it from train.report_to)")
    return [n for n in names if n not in missing]


def start_trackers(accelerator, config: RunConfig, root) -> None:
    """Start Accelerate's trackers: tensorboard under <run>/tensorboard, MLflow in <run>/mlruns unless
    MLFLOW_TRACKING_URI says otherwise, W&B as its environment says (WANDB_MODE=offline for no network)."""
    if not accelerator.log_with:
        return
    names = {str(t).split(".")[-1].lower() for t in accelerator.log_with}
    if "mlflow" in names and accelerator.is_main_process and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        # A file store in the run folder (no server, no database driver needed); recent MLflow wants an opt-in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((root / "mlruns").resolve().as_uri())
    flat = {key: value if isinstance(value, int | float | str | bool) else str(value)
            for key, value in flat_config(to_dict(config)).items()}
    accelerator.init_trackers("mmtune", config=flat, init_kwargs={
        "wandb": {"name": root.name, "dir": str(root)}, "mlflow": {"run_name": root.name}})


def tracker_name(key: str) -> str:
    """``S/base %`` → ``S_base``: names every tracker accepts (MLflow's file store makes "/" a folder)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")


def append_row(metrics_file, row: dict, paths: RunPaths) -> None:
    """One row of ``metrics.jsonl``, flushed; a row that could not be written whole is cut off again, so the rows
    written so far stay readable (a full disk then stops the run with a ``DiskFullError``)."""
    position = os.fstat(metrics_file.fileno()).st_size
    data = (json.dumps(row) + "\n").encode()
    try:
        while data:  # an unbuffered file: a short write on a nearly full disk is continued (or fails) here
            data = data[metrics_file.write(data):]
    except OSError as error:
        with contextlib.suppress(OSError):
            os.ftruncate(metrics_file.fileno(), position)
        if disk_is_full(error, paths.root):
            raise disk_full_error(f"{paths.metrics} (step {row.get('step')})", paths.checkpoints) from error
        raise


class StepLog:
    """The log of one training: open for the loop's life (``close`` in a ``finally``); call ``step`` on every
    process after every optimizer step (the loss terms are averaged over processes on logged steps)."""

    def __init__(self, accelerator, config: RunConfig, paths: RunPaths, total_steps: int, first_step: int):
        self.accelerator, self.paths, self.total_steps, self.first_step = accelerator, paths, total_steps, first_step
        self.every = config.train.log_every
        main = accelerator.is_main_process
        self.progress = tqdm(total=total_steps, initial=first_step, desc="train",
                             disable=not (main and config.train.progress))
        # Without progress bars (logs, CI), one status line per ~5% of the run instead.
        self.status_every = 0 if config.train.progress else max(1, total_steps // 20)
        self.file = paths.metrics.open("ab", buffering=0) if main else None
        start_trackers(accelerator, config, paths.root)
        self.started = time.time()

    def step(self, step: int, epoch: float, terms: dict[str, float], lr: float, grad_norm: float,
             task_losses: torch.Tensor | None = None, tasks: list[str] | None = None,
             diagnostics: dict[str, torch.Tensor] | None = None) -> None:
        """``task_losses``: the step's per-task loss sums and counts ``[2, T]`` over ``tasks`` (this process's),
        written as ``loss/<task>``: each task's mean training loss over the step's samples on every process.
        ``diagnostics``: what a method measured beside its loss (``Step.note``: key → ``[Σx, Σx², n]``), written as
        the mean over every process's values and ``<key>/std`` — not part of ``loss``."""
        self.progress.update(1)
        if step % self.every == 0 or step == self.total_steps:
            accelerator = self.accelerator
            # One reduction per kind, over the keys of every process: a process whose batches gave no term of some
            # key (GRPO's, without a record of its tasks) counts 0 there, and every process makes the same calls.
            names, noted = every_process_keys(accelerator, list(terms), list(diagnostics or {}))
            means = accelerator.reduce(torch.tensor([float(terms.get(k, 0.0)) for k in names], dtype=torch.float64,
                                                    device=accelerator.device), "mean").tolist()
            logged = dict(zip(names, means, strict=True))
            row = {"step": step, "epoch": epoch, "loss": sum(logged.values()), **logged}
            if task_losses is not None and tasks:
                sums, counts = accelerator.reduce(task_losses.to(accelerator.device), "sum").tolist()
                row.update({f"loss/{task}": total / count for task, total, count in zip(tasks, sums, counts,
                                                                                         strict=True) if count})
            if noted:
                noted, none = sorted(noted), torch.zeros(3, dtype=torch.float64)
                totals = accelerator.reduce(torch.stack([(diagnostics or {}).get(k, none) for k in noted])
                                            .to(accelerator.device), "sum").tolist()
                row.update(described(noted, totals))
            row.update({"lr": lr, "grad_norm": grad_norm, "elapsed_s": round(time.time() - self.started, 4)})
            self.write(row)
            accelerator.log({f"train/{tracker_name(k)}": v for k, v in row.items() if isinstance(v, float) and k != "epoch"},
                            step=step)
            self.progress.set_postfix(loss=f"{row['loss']:.4f}")
        if self.status_every and (step % self.status_every == 0 or step == self.total_steps):
            elapsed = time.time() - self.started
            left = elapsed / max(1, step - self.first_step) * (self.total_steps - step)
            self.accelerator.print(f"step {step}/{self.total_steps} ({100 * step // self.total_steps}%)  "
                                   f"loss {sum(terms.values()):.4f}  lr {lr:.2e}  "
                                   f"{elapsed:.0f} s elapsed, ~{left:.0f} s left")

    def evaluation(self, row: dict | None) -> None:
        """An evaluation during training (the main process's row; None elsewhere): its row and its trackers' values."""
        if row is None:
            return
        self.write(row)
        self.accelerator.log({f"eval/{tracker_name(k)}": v for k, v in flat_config(row["eval"]).items()
                              if isinstance(v, int | float)}, step=row["step"])

    def write(self, row: dict) -> None:
        if self.file is not None:
            append_row(self.file, row, self.paths)

    def close(self) -> None:
        self.progress.close()
        if self.file is not None:
            self.file.close()
        # Not accelerator.end_training(): it also destroys the process group, which the rest of the run still uses.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []


def every_process_keys(accelerator, *keys: list[str]) -> list[list[str]]:
    """Each list of ``keys`` joined with the same list of every other process (in the order of the processes, then
    of their keys): the same lists on every process, so that the reductions over them match (one exchange)."""
    if getattr(accelerator, "num_processes", 1) <= 1:
        return list(keys)
    from accelerate.utils import gather_object

    gathered = gather_object([keys])  # one entry per process: its lists
    return [list(dict.fromkeys(k for lists in gathered for k in lists[i])) for i in range(len(keys))]


def described(names: list[str], totals: list[list[float]]) -> dict[str, float]:
    """Each diagnostic's mean and standard deviation (population) from its totals ``[Σx, Σx², n]``; none where n = 0."""
    out = {}
    for name, (total, squares, count) in zip(names, totals, strict=True):
        if count:
            mean = total / count
            out[name] = mean
            out[f"{name}/std"] = max(0.0, squares / count - mean ** 2) ** 0.5
    return out
