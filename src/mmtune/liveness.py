"""A dead or stuck process ends a multi-process run everywhere, with a message naming it.

Without this a process killed by the OOM killer, or a node lost, leaves the others waiting in a collective until
the backend's timeout (30 minutes with gloo) and then dying with an error that names no rank. mmtune:

- sets the process group's timeout to ``train.ddp_timeout`` (seconds; the Trainer's name, default 10 minutes);
- runs a heartbeat thread per process that bumps a counter in the rendezvous store (``MASTER_ADDR:MASTER_PORT``,
  its own connection) every second;
- turns a failed or timed-out collective into ``PeerLostError`` naming the ranks whose heartbeat stopped (a process
  that died, or one that is frozen: SIGSTOP, a hung driver) — or rank 0 when the store itself is gone, since rank 0
  hosts it. The checkpoints on disk are untouched: they are complete or absent (``mmtune.checkpoint``);
- lets the other processes wait for the main one's long work (evaluations run on the main process only) for as
  long as the main process's heartbeat goes on, not for a fixed timeout: an hour of evaluation is not a dead rank.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import torch

from mmtune.errors import PeerLostError

BEAT_SECONDS = 1.0
KEY = "mmtune/heartbeat/{rank}"
# Substrings of the errors a collective raises when a peer is gone or silent (gloo, NCCL, the store).
LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "timed out",
                   "Timed out", "Timeout", "Broken pipe", "NCCL communicator was aborted", "ProcessGroupNCCL")


def _store(timeout: float):
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not address or not port:
        return None
    return torch.distributed.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=timeout),
                                      wait_for_workers=False)


class Peers:
    """Heartbeats and the diagnosis of a lost peer for one multi-process run (a no-op with one process)."""

    runs = 0  # runs started in this process (the demo trains several in one process group): keys stay apart

    def __init__(self, accelerator, timeout: int):
        Peers.runs += 1
        self.run_number = Peers.runs
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.timeout = timeout
        self._stop = threading.Event()
        self._thread = None
        self._store = None
        self._waits = 0
        if self.world > 1:
            try:
                self._store = _store(timeout=10)
            except Exception:  # noqa: BLE001 — no store to reach (e.g. a file:// rendezvous): no names, same errors
                self._store = None
        if self._store is not None:
            self._thread = threading.Thread(target=self._beat, name="mmtune-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                self._store.set(KEY.format(rank=self.rank), str(count))
            except Exception:  # noqa: BLE001 — the store (rank 0) is gone: the main thread will find out
                return
            self._stop.wait(BEAT_SECONDS)

    def close(self) -> None:
        self._stop.set()

    def _beats(self) -> dict[int, str | None]:
        beats = {}
        for rank in range(self.world):
            key = KEY.format(rank=rank)
            beats[rank] = self._store.get(key).decode() if self._store.check([key]) else None
        return beats

    def silent_ranks(self, wait: float = 3 * BEAT_SECONDS) -> list[int]:
        """The other ranks whose heartbeat does not move within ``wait`` seconds; ``[0]`` when the store (hosted by
        rank 0) does not answer."""
        try:
            before = self._beats()
            time.sleep(wait)
            after = self._beats()
        except Exception:  # noqa: BLE001
            return [0] if self.rank != 0 else []
        return [r for r in range(self.world) if r != self.rank and (after[r] is None or after[r] == before[r])]

    def lost(self, error: BaseException, step: int, newest_checkpoint: str) -> PeerLostError | None:
        """A ``PeerLostError`` naming the silent ranks when ``error`` came from a peer that died or went silent."""
        if self.world == 1 or not looks_like_a_lost_peer(error):
            return None
        silent = self.silent_ranks() if self._store is not None else []
        if silent:
            who = ", ".join(f"rank {r}" + (" (it hosts the rendezvous store, which is gone)" if r == 0 else "")
                            for r in silent)
            what = f"{who} stopped answering"
        else:
            what = "another process stopped answering (every heartbeat still moves: a rank is stuck, not dead)"
        return PeerLostError(f"{what}, at step {step} of a {self.world}-process run; this process (rank {self.rank}) "
                             f"stops too. The newest complete checkpoint is {newest_checkpoint}; continue with "
                             f"train.resume_from=latest once every process can run. ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:200]})")

    def wait_for_main(self, accelerator) -> None:
        """Where the others wait for work the main process does alone (evaluations): as long as rank 0's heartbeat
        moves, then the usual barrier (immediate: everyone is there)."""
        if self.world > 1 and self._store is not None:
            self._waits += 1
            key = f"mmtune/main_done/{self.run_number}/{self._waits}"
            if self.rank == 0:
                self._store.set(key, "1")
            else:
                last, seen = None, time.time()
                while not self._store.check([key]):
                    beat = self._beats()[0]
                    if beat != last:
                        last, seen = beat, time.time()
                    elif time.time() - seen > self.timeout:
                        raise PeerLostError(f"rank 0 stopped answering (no heartbeat for {self.timeout} s) while "
                                            f"this process (rank {self.rank}) waited for its evaluation")
                    time.sleep(BEAT_SECONDS / 2)
        accelerator.wait_for_everyone()


def looks_like_a_lost_peer(error: BaseException) -> bool:
    distributed_error = getattr(torch.distributed, "DistError", ())
    if distributed_error and isinstance(error, distributed_error):
        return True
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in LOST_PEER_SIGNS)
