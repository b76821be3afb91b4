"""The run folder: where a run's files go, and the lock that keeps two runs out of one folder."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mmtune.config import RunConfig
from mmtune.errors import RunInUseError

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "final", "final.partial", "checkpoints", "eval", "report",
               "train_summary.json", "tensorboard", "adapter", "wandb", "mlruns", "best", "best.json")
LOCK_FILE = "mmtune.lock"


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "train_summary.json"

    @property
    def base_eval(self) -> Path:
        """The base model's full evaluation (before training)."""
        return self.root / "eval" / "base"

    def during(self, name: str) -> Path:
        """An evaluation during training (``base``, ``step-000040``)."""
        return self.root / "eval" / "during" / name


def lock_output_dir(root: Path) -> int | None:
    """Hold an exclusive lock on ``root`` for the life of this process (released by the OS even on kill -9),
    so two runs can never write into one folder. Returns the lock's file descriptor."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no advisory locks
        return None
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunInUseError(f"{root} is in use by a live run (pid {holder}); wait for it to finish or choose "
                            "another train.output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def release_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def prepare_output_dir(config: RunConfig, is_main: bool) -> tuple[RunPaths, int | None]:
    """Create and lock the run folder; refuse one that holds another run unless resuming or told to overwrite."""
    root = Path(config.train.output_dir)
    if not is_main:
        return RunPaths(root), None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"train.output_dir={root}: can't create the run folder ({error.strerror or error})") from None
    if not os.access(root, os.W_OK):
        raise PermissionError(f"train.output_dir={root}: the folder is not writable")
    lock = lock_output_dir(root)
    taken = any((root / m).exists() for m in RUN_MARKERS)
    if taken and not config.train.resume_from:
        if not config.train.overwrite:
            release_lock(lock)
            raise FileExistsError(f"{root} already holds a run; choose another train.output_dir, resume with "
                                  "train.resume_from=latest, or replace it with train.overwrite=true")
        for marker in RUN_MARKERS:
            target = root / marker
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return RunPaths(root), lock
