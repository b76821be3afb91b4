"""Preemption: on SIGTERM or Ctrl-C (SIGINT; any signal of ``train.preempt_signals``) finish the optimizer step in
flight, write a verified checkpoint, and exit with ``PREEMPTED_EXIT`` — a run loses at most the step it was in.
A second Ctrl-C aborts at once (``KeyboardInterrupt``): the user asked twice, and the last checkpoint stays whole.

Cluster schedulers (SLURM, Kubernetes, spot instances) send SIGTERM (SLURM can send SIGUSR1 ahead of time with
``--signal``) and kill the job seconds to minutes later. The handler only sets a flag; the loop reads it once per
optimizer step, where the model, optimizer and data position agree, and every process acts on it at the same step
(the flags are all-reduced, so a signal that reaches the processes at different moments still stops them together).
An evaluation during training in progress is cut short (the handler raises inside it, on the main process only) and
redone on resume. A second signal while the checkpoint is being written changes nothing: the write is atomic (whole
or absent, ``mmtune.checkpoint``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import torch

from mmtune.errors import PREEMPTED_EXIT, Preempted  # noqa: F401 — PREEMPTED_EXIT: public here too


class EvaluationInterrupted(BaseException):
    """Raised inside an evaluation during training when a preemption signal arrives. A ``BaseException``, like
    ``KeyboardInterrupt``: it can land anywhere in the evaluation, and a handler there that catches ``Exception`` (an
    image reader turning any failure into "unreadable image …") must not swallow it."""


class PreemptionWatch:
    """Install the handlers for the life of the loop (``with``); ``requested`` names the first signal received."""

    def __init__(self, signals: list[str], announce: bool = True):
        self.signals = [getattr(signal, name) for name in signals]
        self.announce = announce  # say what the signal does (the main process; every process receives Ctrl-C)
        self.requested: str | None = None
        self._interruptible = False
        self._previous: dict = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for number in self.signals:
                if number == signal.SIGINT and signal.getsignal(number) == signal.SIG_IGN:
                    continue  # a process started with Ctrl-C ignored (nohup, `&` in a script) keeps it so, as Python does
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.requested is not None and number == signal.SIGINT:  # Ctrl-C twice: the user wants out now
            self.__exit__()
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal.Signals(number).name
            if self.announce:
                again = " (Ctrl-C again aborts at once)" if number == signal.SIGINT else ""
                print(f"\nmmtune: {self.requested} received: finishing the step in flight, then a checkpoint{again}",
                      file=sys.stderr, flush=True)
        if self._interruptible:
            self._interruptible = False
            raise EvaluationInterrupted(self.requested)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """What runs inside (an evaluation during training) is cut short by a preemption signal."""
        if self.requested:
            raise EvaluationInterrupted(self.requested)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def agreed(self, accelerator) -> bool:
        """Whether any process received a preemption signal (all processes get the same answer)."""
        flag = self.requested is not None
        if accelerator.num_processes > 1:
            flag = bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum") > 0)
        return flag


def preempted_error(signal_name: str | None, step: int, checkpoint) -> Preempted:
    return Preempted(f"preempted ({signal_name or 'by another process'}) at step {step}: the step in flight was "
                     f"finished and saved to {checkpoint}; continue with train.resume_from=latest "
                     f"(exit status {PREEMPTED_EXIT})")
