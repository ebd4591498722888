"""Writes that a crash or a power cut leaves whole: a file is written beside its target, synced, and renamed into
place, so a reader finds the old contents or the new, never a part."""
from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (CIFS before Linux 4.17, some FUSE ones) cannot sync a folder: their renames are then
        # as durable as they make them, and a save must not fail over it. A file that cannot be synced still fails.
        if not (path.is_dir() and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)):
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    replace_durably(tmp, path)


def replace_durably(tmp: Path, path: Path) -> None:
    """Put the written file `tmp` in place of `path`: its contents on disk first, then the rename."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
