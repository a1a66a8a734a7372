"""Atomic file writes: a temporary file in the same folder, flushed to disk, then renamed over the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping


def _umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_many(files: Mapping[str, bytes]) -> None:
    """Write every file to a temporary sibling first; only when all are written, rename each into place.

    An error while writing leaves every target as it was and removes the temporary files. Files get the
    permissions the umask gives a new file (as ``open`` would), not the owner-only ones of a temporary file.
    """
    mode = 0o666 & ~_umask()
    staged: list[tuple[str, str]] = []
    try:
        for path, data in files.items():
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
            staged.append((tmp, path))
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
