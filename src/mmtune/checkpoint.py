"""Checkpoints that are complete or absent, verified on resume, and never unpickled.

A checkpoint is written into a hidden ``.step-N.partial`` folder, flushed to disk, described by a manifest
(every file's size and SHA-256), and only then renamed to ``step-N``: a run killed mid-write (or a full disk)
leaves a partial folder that is never mistaken for a checkpoint. Resuming verifies the manifest; ``latest``
is the newest checkpoint that verifies, and every one skipped is reported with the reason.

Everything mmtune itself writes is JSON or tensors (``weights_only=True`` loads): the run position, the
data generator and the learning-rate schedule live in ``mmtune_state.json``; the methods' state in
``mmtune_methods.pt`` (tensors only). Nothing read on resume can run code.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mmtune.errors import CheckpointError, DiskFullError
from mmtune.files import NEARLY_FULL_BYTES, disk_is_full  # noqa: F401 — public here too

MANIFEST = "mmtune_manifest.json"
STATE_FILE = "mmtune_state.json"
LEGACY_STATE_FILE = "mmtune_state.pt"  # mmtune 0.1 checkpoints: their scheduler is a pickle, so they are refused
PARTIAL_SUFFIX = ".partial"


def newest_complete(checkpoints: Path) -> str:
    found = complete_checkpoints(checkpoints) if checkpoints.is_dir() else []
    return found[0].name if found else "none (no checkpoint was written yet)"


def disk_full_error(what: str, checkpoints: Path) -> DiskFullError:
    import errno

    return DiskFullError(errno.ENOSPC, f"no space left on device while writing {what}; nothing of it is kept. The "
                                       f"newest complete checkpoint is {newest_complete(checkpoints)}: free space, "
                                       "then continue with train.resume_from=latest")


@contextlib.contextmanager
def removed_unless_whole(partial: Path, what: str, checkpoints: Path) -> Iterator[None]:
    """Write ``partial`` inside: if anything fails, the partial folder is removed (never taken for complete; frees what
    it held), and a full disk becomes a ``DiskFullError`` naming ``what`` and the newest complete checkpoint."""
    try:
        yield
    except Exception as error:
        full = disk_is_full(error, partial.parent)
        shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise disk_full_error(what, checkpoints) from error
        raise


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int) -> None:
    """Describe every file of ``directory`` (size, SHA-256), after flushing each one to disk."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = directory / MANIFEST
    manifest.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    _fsync(manifest)
    _fsync(directory)


def verify(directory: Path) -> str | None:
    """None when ``directory`` is a complete checkpoint whose files match its manifest, else the problem."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (incomplete, or written by mmtune ≤ 0.1)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST} ({error})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


def finalize(partial: Path, final: Path, step: int) -> None:
    """Manifest the partial folder, then move it into place atomically (replacing a redone step)."""
    write_manifest(partial, step)
    if final.exists():  # the same step written again after a resume from an earlier checkpoint
        stale = final.with_name(final.name + ".replaced" + PARTIAL_SUFFIX)
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale)
    else:
        partial.rename(final)
    _fsync(final.parent)


def partial_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f".{step_dir_name(step)}{PARTIAL_SUFFIX}"


def remove_partials(checkpoints: Path) -> list[Path]:
    """Delete what killed runs left half-written; return what was removed."""
    removed = sorted(checkpoints.glob(f".*{PARTIAL_SUFFIX}")) if checkpoints.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """``step-N`` folders, newest first."""
    found = [p for p in checkpoints.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def find_checkpoint(checkpoints: Path, resume_from: str, say: Callable[[str], None] = print) -> Path:
    """The checkpoint to resume from: ``latest`` = the newest one that verifies; a path must verify itself."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_dir():
            raise CheckpointError(f"train.resume_from={resume_from}: no such checkpoint folder")
        problem = verify(path)
        if problem:
            raise CheckpointError(f"{path} can't be resumed: {problem}{_legacy_hint(path)}")
        return path
    candidates = complete_checkpoints(checkpoints)
    if not candidates:
        raise CheckpointError(f"train.resume_from=latest, but {checkpoints} holds no checkpoint")
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        say(f"skipping checkpoint {path}: {problem}{_legacy_hint(path)}")
    raise CheckpointError(f"no checkpoint in {checkpoints} verifies (each was reported above); "
                          "start again with train.overwrite=true")


def _legacy_hint(path: Path) -> str:
    if (path / LEGACY_STATE_FILE).is_file() and not (path / MANIFEST).is_file():
        return (" — written by mmtune 0.1, whose checkpoints hold pickles (which can run code when loaded); "
                "they are not resumed: start the run again")
    return ""


def save_run_state(directory: Path, position: dict, generator: torch.Generator, scheduler) -> None:
    state = {"position": position,
             "generator": base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii"),
             "scheduler": scheduler.state_dict()}
    (directory / STATE_FILE).write_text(json.dumps(state) + "\n")


def load_run_state(directory: Path) -> dict:
    """``{"position": {...}, "generator": ByteTensor, "scheduler": {...}}`` of a verified checkpoint."""
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text())
        state["generator"] = torch.frombuffer(bytearray(base64.b64decode(state["generator"])), dtype=torch.uint8)
        state["position"]["step"], state["scheduler"]["last_epoch"]  # noqa: B018 — the keys resume needs
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: unreadable run state ({type(error).__name__}: {error})") from None
    return state


def deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoint files hold besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_engine_files(directory: Path) -> None:
    """DeepSpeed loads its checkpoint files with ``weights_only=False`` (a pickle can run code). Before it does,
    read each of them the safe way — tensors, containers and DeepSpeed's own three plain classes only — and refuse
    a file that needs anything else, naming it. Tensors are memory-mapped, not read."""
    allowed = deepspeed_safe_globals()
    for path in sorted(Path(directory).rglob("*.pt")):
        if path.name.startswith("mmtune_"):
            continue  # mmtune's own files are always loaded with weights_only=True
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = next((line for line in lines if "GLOBAL" in line), lines[-1] if lines else type(error).__name__)
            raise CheckpointError(f"{path}: refused before DeepSpeed loads it (it would be unpickled with "
                                  f"weights_only=False): {reason}") from None
