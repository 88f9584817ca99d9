"""The artifact cache: every expensive output (features, GMP stores, later checkpoints) lives in a folder
named by a fingerprint of everything it depends on.

An artifact is complete only when its marker file exists, and the marker is written last, after every
file of the artifact has been written into a temporary folder that is then renamed into place. So:

* a crash mid-build leaves a ``.tmp-*`` folder that nothing reads (and the next build removes);
* a truncated or altered file is caught by the sizes and checksums in the marker, and the artifact is
  rebuilt instead of trusted;
* two runs that need the same missing artifact take a file lock: the second waits and reuses the first's;
* the marker names the fingerprint it was built for, and a folder holding another fingerprint's artifact
  (copied or moved by hand) is refused with :class:`ArtifactMismatch` rather than used for this config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .atomic import atomic_write_text
from .errors import InputError

MARKER = "_COMPLETE.json"


def fingerprint(inputs: Any) -> str:
    """A short stable hash of JSON-serialisable inputs (key order does not matter)."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactMismatch(InputError):
    """A cache folder whose marker says it was built for another fingerprint than its name."""


@dataclass(frozen=True)
class Artifact:
    """A complete artifact: its folder and the metadata its builder recorded."""

    path: Path
    meta: dict[str, Any]


class ArtifactCache:
    """Fingerprinted artifacts under ``root/<kind>/<fingerprint>/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()  # absolute: Ray workers do not run in the driver's directory

    def folder(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def load(self, kind: str, key: str, verify: bool = True) -> Artifact | None:
        """The complete artifact, or None when it is missing, unfinished, truncated or altered.

        Sizes are always checked; ``verify`` also recomputes every file's checksum (reads it all). A
        marker from before markers named their fingerprint counts as unfinished (the artifact is rebuilt).
        """
        folder = self.folder(kind, key)
        try:
            marker = json.loads((folder / MARKER).read_text())
        except (OSError, ValueError):
            return None
        if marker.get("key") is None:
            return None
        if marker["key"] != key or marker["kind"] != kind:
            raise ArtifactMismatch(
                f"{folder}: holds the {marker['kind']} built for fingerprint {marker['key']}, not {kind} "
                f"{key} (another config's artifact, copied here?); refusing it. Remove the folder to rebuild."
            )
        for name, expected in marker["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != expected["size"]:
                return None
            if verify and file_sha256(path) != expected["sha256"]:
                return None
        return Artifact(folder, marker["meta"])

    def get_or_build(
        self, kind: str, key: str, build: Callable[[Path], dict[str, Any]]
    ) -> tuple[Artifact, bool]:
        """The complete artifact ``kind/key``, building it with ``build(tmp_folder) -> meta`` if needed.

        Returns the artifact and whether this call built it. Building happens under a file lock; a process
        that waited for the lock reuses what the holder built. ``build`` writes only inside ``tmp_folder``.
        """
        found = self.load(kind, key)
        if found is not None:
            return found, False
        final = self.folder(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            found = self.load(kind, key)
            if found is not None:
                return found, False
            for stale in final.parent.glob(f".{key}.tmp-*"):  # left by a crashed build: never trusted
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                meta = build(tmp)
                files = {
                    str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                    for p in sorted(tmp.rglob("*"))
                    if p.is_file()
                }
                atomic_write_text(
                    tmp / MARKER,
                    json.dumps({"kind": kind, "key": key, "files": files, "meta": meta}, indent=1),
                )
                if final.exists():  # an unfinished or corrupt earlier build
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return Artifact(final, meta), True
