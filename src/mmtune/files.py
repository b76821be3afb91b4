"""Writing files without surprises: atomic replacement, never through a planted link, safe names."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from mmtune.errors import DiskFullError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# A write that failed leaving less than this free is taken as a full disk: torch.save reports ENOSPC as
# "unexpected pos 576 vs 534", safetensors as a SafetensorError, neither as an OSError with its errno.
NEARLY_FULL_BYTES = 16 << 20


def disk_is_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder``, came from a full disk (or an exhausted quota)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(cause) or "os error 28" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def naming_a_full_disk(what: str | Path, folder: str | Path) -> Iterator[None]:
    """A full disk inside becomes a ``DiskFullError`` that names what was being written (an ``[Errno 28]`` says
    nothing of which file, and a run writes many: the synthetic world, image caches, evaluations, the report)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if disk_is_full(error, Path(folder)):
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {what}: free space there "
                                              "and run the command again") from error
        raise


def atomic_write(path: str | Path, content: str | Callable[[IO[str]], None]) -> Path:
    """Write ``path`` through a temporary file created exclusively beside it (a random name: nothing planted
    can be followed), then rename it into place — which replaces a link at ``path`` instead of writing
    through it, and never leaves a half-written file under the real name."""
    path = Path(path)
    with naming_a_full_disk(path, path.parent):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                content(handle) if callable(content) else handle.write(content)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def safe_file_name(name: str) -> str:
    """A file name made from ``name`` (a task name from a record) that can't leave its folder: separators,
    ``..`` and other characters become ``_``; a name that had to change gets a short hash so two different
    names never collide."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "task"
    if cleaned == name:
        return name
    return f"{cleaned[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
