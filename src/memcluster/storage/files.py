"""Small file-system helpers shared by the WAL, snapshots and the catalog."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path.

    On a directory it makes a create, rename or unlink inside it durable; without it, a crash
    may forget that a just-written file exists.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
