"""``gmpatl prepare``: whatever ``data.source`` names -> a checked manifest at ``data.manifest``.

One policy for bad input, whatever the corpus: ``on_error: fail`` lists every problem and writes nothing;
``on_error: skip`` writes the manifest without the bad utterances and keeps the list of what was skipped
beside it (``<manifest>.skipped.txt``), so nothing disappears unreported.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..atomic import atomic_write_text
from ..config import ConfigError, DataConfig
from .demo import generate_demo_corpus
from .iemocap import full_release_mismatches, scan_iemocap
from .manifest import (
    ManifestError,
    Problem,
    check_manifest,
    complete_manifest,
    read_manifest,
    write_manifest,
)


@dataclass
class Prepared:
    manifest: pd.DataFrame
    path: Path
    problems: list[Problem] = field(default_factory=list)
    """Problems found and skipped (empty unless ``on_error: skip``)."""
    dropped: Counter = field(default_factory=Counter)
    """Utterances left out because their label is not one of ``data.emotions``, by label."""
    skipped_path: Path | None = None


def skipped_list_path(manifest_path: Path) -> Path:
    return manifest_path.with_name(manifest_path.stem + ".skipped.txt")


def prepare(data: DataConfig, strict: bool = False) -> Prepared:
    """Build, check and atomically write the manifest; raise ManifestError per the ``on_error`` policy."""
    out = Path(data.manifest)
    if strict and data.source != "iemocap":
        raise ConfigError("--strict compares against the full IEMOCAP release: it needs data.source iemocap")
    if data.source == "manifest":
        where = str(Path(data.csv).expanduser())
        table = _read_user_csv(where)
        manifest, problems = complete_manifest(table, where)
        if not any(p.fatal for p in problems):
            unreadable = {p.utt_id for p in problems}  # already reported; no duration to check
            problems += check_manifest(manifest[~manifest["utt_id"].isin(unreadable)], data.emotions, where)
        dropped = Counter()
        context = where
    else:
        root = Path(data.root).expanduser()
        if data.source == "demo":
            generate_demo_corpus(root, data.demo, data.sample_rate)
        scan = scan_iemocap(root, data.emotions, data.merge)
        manifest, problems, dropped = scan.manifest, scan.problems, scan.dropped
        context = str(root)

    fatal = [p for p in problems if p.fatal]
    if fatal or (problems and data.on_error == "fail"):
        raise ManifestError(fatal or problems, context)
    if problems:
        bad = {p.utt_id for p in problems if p.utt_id is not None}
        keep = ~manifest["utt_id"].isin(bad) & manifest["utt_id"].notna()
        manifest = manifest[keep].reset_index(drop=True)
    if manifest.empty:
        raise ManifestError([Problem(context, "no usable utterances left")], context)
    if strict and (mismatches := full_release_mismatches(manifest)):
        raise ManifestError([Problem(context, m) for m in mismatches], f"{context} (--strict)")

    skipped = skipped_list_path(out)
    if problems:
        atomic_write_text(skipped, "".join(f"{p}\n" for p in problems))
    else:
        skipped.unlink(missing_ok=True)  # a stale list from an earlier run would describe other data
    write_manifest(manifest, out)
    return Prepared(manifest, out, problems, dropped, skipped if problems else None)


def _read_user_csv(where: str) -> pd.DataFrame:
    path = Path(where)
    if not path.is_file():
        raise ManifestError([Problem(where, "file not found")], where)
    table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    if "duration_s" in table.columns:
        table["duration_s"] = pd.to_numeric(table["duration_s"], errors="coerce")
    for column in ("session", "fold"):
        if column in table.columns:
            table[column] = _maybe_int(table[column])
    return table


def _maybe_int(column: pd.Series) -> pd.Series:
    """Session and fold ids stay text unless every one is a whole number (so ``1`` and ``01`` agree)."""
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.notna().all() and (numeric % 1 == 0).all():
        return numeric.astype(int)
    return column


def load_or_prepare(data: DataConfig) -> pd.DataFrame:
    """The checked manifest at ``data.manifest``, running :func:`prepare` first when it does not exist.

    The demo corpus is always prepared (a second or two): its generator reuses the corpus only when it was
    made with this ``data.demo``, so a changed demo config never meets a stale manifest."""
    if data.source == "demo" or not Path(data.manifest).is_file():
        prepare(data)
    return read_manifest(data.manifest, data.emotions)
