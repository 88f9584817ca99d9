"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

Everything the project writes that a later step trusts (manifests, reports, and later features, GMP stores,
checkpoints) goes through here, so a crash mid-write leaves at most a ``.tmp-*`` file that nothing reads.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only be read by setting it, which
    would briefly give other threads' new files the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` (or ``mkdir``) would give: what the umask lets the group that shares the
    storage read. Temporary files are made owner-only (0600), so a renamed one gets this mode first."""
    return (0o777 if directory else 0o666) & ~umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``, with
    the mode a plain ``open`` would have given it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.fchmod(fd, shared_mode())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
