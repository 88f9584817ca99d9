"""The artifact cache: every expensive output (features, GMP stores, later checkpoints) lives in a folder
named by a fingerprint of everything it depends on.

An artifact is complete only when its marker file exists, and the marker is written last, after every
file of the artifact has been written into a temporary folder that is then renamed into place. So:

* a crash mid-build leaves a ``.tmp-*`` folder that nothing reads (and the next build removes);
* the marker lists every file's size and SHA-256, computed once, where the files were written (a Ray
  Train worker, a Ray task): a routine load checks the marker and the sizes, so a truncated or missing file
  is rebuilt instead of trusted, without reading gigabytes back on the driver; :meth:`ArtifactCache.verify`
  (``gmpatl verify-cache``) recomputes every checksum, on demand;
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


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``folder``, as the marker lists them."""
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def recorded_checksums(folder: Path) -> dict[str, str] | None:
    """The SHA-256 of each file in ``folder`` as recorded by the marker of the artifact holding it (a
    stage's ``backbone/``), when it is one and the sizes still match; None otherwise."""
    try:
        marker = json.loads((folder.parent / MARKER).read_text())
    except (OSError, ValueError):
        return None
    prefix = f"{folder.name}/"
    found = {}
    for name, record in marker.get("files", {}).items():
        if name.startswith(prefix) and "/" not in name[len(prefix) :]:
            path = folder.parent / name
            if not path.is_file() or path.stat().st_size != record["size"]:
                return None
            found[name[len(prefix) :]] = record["sha256"]
    return found or None


@dataclass(frozen=True)
class Contents:
    """What a builder made, when it checksummed its files where it wrote them (see :func:`file_records`);
    a builder that returns plain metadata has them checksummed by the cache."""

    meta: dict[str, Any]
    files: dict[str, dict[str, Any]]


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

    def load(self, kind: str, key: str, verify: bool = False) -> Artifact | None:
        """The complete artifact, or None when it is missing, unfinished, truncated or altered.

        The marker and every file's size are checked; ``verify`` also recomputes every checksum (reads
        every byte: do it on demand, not on every load). A marker from before markers named their
        fingerprint counts as unfinished (the artifact is rebuilt).
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
        if self._damage(folder, marker["files"], verify):
            return None
        return Artifact(folder, marker["meta"])

    @staticmethod
    def _damage(folder: Path, files: dict[str, dict[str, Any]], checksums: bool) -> list[str]:
        """What no longer matches the marker: missing files, other sizes and (``checksums``) contents."""
        damage = []
        for name, expected in files.items():
            path = folder / name
            if not path.is_file():
                damage.append(f"{path}: missing")
            elif path.stat().st_size != expected["size"]:
                damage.append(f"{path}: {path.stat().st_size} bytes, the marker says {expected['size']}")
            elif checksums and file_sha256(path) != expected["sha256"]:
                damage.append(f"{path}: its SHA-256 is not the one the marker recorded")
        return damage

    def verify(self) -> tuple[int, dict[Path, list[str]]]:
        """Every complete artifact under the root checked in full (every checksum recomputed): how many
        were checked, and for each damaged one its folder and what is wrong. Unfinished builds (no marker)
        are not artifacts."""
        checked, damaged = 0, {}
        for marker_path in sorted(self.root.glob(f"*/*/{MARKER}")):
            folder = marker_path.parent
            try:
                files = json.loads(marker_path.read_text())["files"]
            except (OSError, ValueError, KeyError):
                damaged[folder] = [f"{marker_path}: unreadable marker"]
                continue
            checked += 1
            if damage := self._damage(folder, files, checksums=True):
                damaged[folder] = damage
        return checked, damaged

    def get_or_build(
        self, kind: str, key: str, build: Callable[[Path], dict[str, Any] | Contents]
    ) -> tuple[Artifact, bool]:
        """The complete artifact ``kind/key``, building it with ``build(tmp_folder) -> meta`` (or
        :class:`Contents`) if needed.

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
                made = build(tmp)
                meta, files = (made.meta, made.files) if isinstance(made, Contents) else (made, None)
                if files is None:
                    files = file_records(tmp)
                else:  # checksummed where it was written: check that it lists exactly what is here
                    on_disk = {
                        str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()
                    }
                    if on_disk != {n: r["size"] for n, r in files.items()}:
                        raise RuntimeError(f"{tmp}: the builder's file list does not match the folder")
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
