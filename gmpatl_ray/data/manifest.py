"""The manifest: one row per utterance, the only thing every later step reads about a corpus.

Columns (README, "Bring your own corpus"):

=============  ==============================================================================
utt_id         unique id
path           audio file; relative paths are resolved against the manifest's folder
session        recording session; leave-one-session-out folds come from it
speaker        speaker id (defaults to session + gender for your own CSV)
gender         F or M (the stage-1 auxiliary target)
emotion        one of ``data.emotions``
duration_s     seconds (read from the header when your CSV leaves it out)
fold           optional: when present, folds come from it instead of ``session``
=============  ==============================================================================

Checks collect every problem before failing, so one run lists all broken rows instead of the first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..atomic import atomic_path
from ..errors import InputError
from .audio import AudioError, audio_info, check_audio

COLUMNS = ("utt_id", "path", "session", "speaker", "gender", "emotion", "duration_s")
REQUIRED_INPUT_COLUMNS = ("utt_id", "path", "gender", "emotion")
GENDERS = ("F", "M")
MIN_DURATION_S = 0.025
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""What a ``session`` or ``fold`` value may be: it names report files and MLflow runs and is searched
for in MLflow filters, so no path separators, quotes or spaces."""
"""Shorter audio gives no HuBERT frame (the CNN's receptive field is 400 samples at 16 kHz)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where (file, line or row) and what."""

    where: str
    message: str
    utt_id: str | None = None
    fatal: bool = False
    """The input as a whole is unusable (e.g. missing columns): there is nothing to skip to."""

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ManifestError(InputError):
    """The corpus or manifest has problems; ``problems`` lists all of them."""

    def __init__(self, problems: Sequence[Problem], context: str):
        self.problems = list(problems)
        lines = [f"{context}: {len(self.problems)} problem(s)"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def fold_column(manifest: pd.DataFrame) -> str:
    """Folds come from a ``fold`` column when the manifest has one, else from ``session``."""
    return "fold" if "fold" in manifest.columns else "session"


def folds(manifest: pd.DataFrame) -> list:
    return sorted(manifest[fold_column(manifest)].unique().tolist())


def check_manifest(manifest: pd.DataFrame, emotions: Iterable[str], where: str) -> list[Problem]:
    """Every problem in a manifest table: columns, empty cells, duplicate ids, labels, genders, durations.

    ``manifest`` keeps the index it was read with, so problems name CSV lines even for a filtered table.
    """
    missing = [c for c in COLUMNS if c not in manifest.columns]
    if missing:
        return [
            Problem(
                where, f"missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}", fatal=True
            )
        ]
    problems: list[Problem] = []
    emotions = set(emotions)
    for row in manifest.itertuples():
        at = f"{where}:{row.Index + 2}"  # the table's index is its CSV line minus 2 (header, 0-based)
        empty = [c for c in COLUMNS if pd.isna(getattr(row, c)) or str(getattr(row, c)).strip() == ""]
        if empty:
            problems.append(Problem(at, f"empty {', '.join(empty)}", _utt(row)))
            continue
        if row.emotion not in emotions:
            problems.append(
                Problem(
                    at, f"unknown emotion {row.emotion!r}, expected one of {sorted(emotions)}", row.utt_id
                )
            )
        if row.gender not in GENDERS:
            problems.append(Problem(at, f"gender {row.gender!r}, expected F or M", row.utt_id))
        for column in ("session", "fold"):
            value = getattr(row, column, None)
            if value is not None and not SAFE_NAME.fullmatch(str(value)):
                problems.append(
                    Problem(
                        at,
                        f"{column} {value!r} is not a safe name: up to 64 letters, digits, '_', '.' or '-', "
                        "starting with a letter or digit (it names files and MLflow runs)",
                        row.utt_id,
                    )
                )
        if not _positive_number(row.duration_s):
            problems.append(
                Problem(at, f"duration_s {row.duration_s!r} is not a positive number", row.utt_id)
            )
        elif float(row.duration_s) < MIN_DURATION_S:
            problems.append(
                Problem(
                    at, f"duration_s {row.duration_s} is shorter than one HuBERT frame (25 ms)", row.utt_id
                )
            )
    duplicated = manifest["utt_id"][manifest["utt_id"].duplicated(keep=False)]
    for utt_id, rows in duplicated.groupby(duplicated).groups.items():
        lines = ", ".join(str(r + 2) for r in rows)
        problems.append(Problem(where, f"duplicate utt_id {utt_id!r} on lines {lines}", utt_id))
    return problems


def _utt(row) -> str | None:
    return None if pd.isna(row.utt_id) else str(row.utt_id)


def _positive_number(value) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def check_audio_files(manifest: pd.DataFrame, decode: bool) -> list[Problem]:
    """Every audio file checked: missing, empty, unreadable and truncated files become problems, and
    with ``decode`` (when a corpus is prepared) also undecodable, NaN/inf and silent ones."""
    problems = []
    check = check_audio if decode else audio_info
    for row in manifest.itertuples(index=False):
        try:
            check(row.path)
        except AudioError as err:
            problems.append(Problem(err.path, err.problem, row.utt_id))
    return problems


def read_manifest(path: str | Path, emotions: Iterable[str], check_files: bool = True) -> pd.DataFrame:
    """Load a manifest written by ``gmpatl prepare``; raises ManifestError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            [Problem(str(path), "manifest not found (run `gmpatl prepare` first)")], str(path)
        )
    manifest = _read_table(path)
    problems = check_manifest(manifest, emotions, str(path))
    if not problems:
        manifest = manifest.assign(path=[str(_resolve(p, path.parent)) for p in manifest["path"]])
        if check_files:
            problems = check_audio_files(manifest, decode=False)
    if problems:
        raise ManifestError(problems, str(path))
    return manifest


def complete_manifest(table: pd.DataFrame, where: str) -> tuple[pd.DataFrame, list[Problem]]:
    """Turn your own CSV into a full manifest: resolve paths, default speaker, read missing durations.

    Returns the manifest and the problems found; rows with a problem are kept so that
    :func:`check_manifest` and the caller's ``on_error`` policy decide.
    """
    where_dir = Path(where).parent
    missing = [c for c in REQUIRED_INPUT_COLUMNS if c not in table.columns]
    if "session" not in table.columns and "fold" not in table.columns:
        missing.append("session or fold")
    if missing:
        return table, [Problem(where, f"missing column(s) {', '.join(missing)}", fatal=True)]
    table = table.copy()
    table["path"] = [str(_resolve(p, where_dir)) if isinstance(p, str) and p else p for p in table["path"]]
    if "session" not in table.columns:
        table["session"] = table["fold"]
    if "speaker" not in table.columns:
        table["speaker"] = table["session"].astype(str) + table["gender"].astype(str)
    problems: list[Problem] = []
    if "duration_s" not in table.columns:
        durations = []
        for row in table.itertuples(index=False):
            try:
                info = check_audio(row.path)
                durations.append(info.frames / info.samplerate)
            except AudioError as err:
                problems.append(Problem(err.path, err.problem, row.utt_id))
                durations.append(float("nan"))
        table["duration_s"] = durations
    else:
        problems += check_audio_files(table, decode=True)
    extra = [c for c in table.columns if c not in COLUMNS]
    return table[list(COLUMNS) + extra], problems


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(
        path, dtype={"utt_id": str, "path": str, "speaker": str, "gender": str, "emotion": str}
    )


def write_manifest(manifest: pd.DataFrame, path: str | Path) -> Path:
    """Write atomically as CSV, or Parquet when ``path`` ends in .parquet."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            manifest.to_parquet(tmp, index=False)
        else:
            manifest.to_csv(tmp, index=False, float_format="%.4f")
    return path


def summary(manifest: pd.DataFrame) -> dict[str, dict]:
    """Counts by emotion, gender and fold (session unless a fold column exists)."""
    return {
        "emotion": manifest["emotion"].value_counts().sort_index().to_dict(),
        "gender": manifest["gender"].value_counts().sort_index().to_dict(),
        fold_column(manifest): manifest[fold_column(manifest)].value_counts().sort_index().to_dict(),
    }


def format_summary(manifest: pd.DataFrame, title: str) -> str:
    hours = manifest["duration_s"].sum() / 3600
    lines = [f"{title}: {len(manifest)} utterances, {hours:.2f} h of audio"]
    for name, counts in summary(manifest).items():
        lines.append(f"  {name:<8} " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines)
