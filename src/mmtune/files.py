"""Writing files without surprises: atomic replacement, never through a planted link, safe names."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, content: str | Callable[[IO[str]], None]) -> Path:
    """Write ``path`` through a temporary file created exclusively beside it (a random name: nothing planted
    can be followed), then rename it into place — which replaces a link at ``path`` instead of writing
    through it, and never leaves a half-written file under the real name."""
    path = Path(path)
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
