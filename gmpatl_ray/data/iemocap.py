"""IEMOCAP recipe: ``IEMOCAP_full_release`` on disk -> manifest.

It follows the real release exactly:

* labels come only from ``Session{N}/dialog/EmoEvaluation/*.txt`` (the ``Categorical/``, ``Attribute/`` and
  ``Self-evaluation/`` subfolders hold per-rater files in other formats and are not read);
* a summary line is ``[start - end]<TAB>utt_id<TAB>label<TAB>[V, A, D]``; the rater lines under it
  (``C-E2:``, ``A-E3:``, ``C-F1:``...) and the ``%`` header are not utterances;
* the wav is ``Session{N}/sentences/wav/<dialog>/<utt_id>.wav`` with ``dialog = utt_id.rsplit('_', 1)[0]``
  (dialogs may carry a/b suffixes, ``Ses03M_impro05b``, or a part number, ``Ses01F_script02_2``);
* the speaker's gender is the first letter of the last ``_`` token: ``Ses01F_impro01_M000`` is the male
  actor of session 1 (``Ses01F`` only says who wore the motion-capture markers).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .audio import AudioError, check_audio
from .manifest import COLUMNS, MIN_DURATION_S, Problem

LABELS = ("ang", "hap", "exc", "neu", "sad", "fru", "sur", "fea", "dis", "oth", "xxx")
"""Every label an IEMOCAP summary line can carry; anything else is a malformed file."""

FULL_RELEASE = {
    "emotion": {"ang": 1103, "hap": 1636, "neu": 1708, "sad": 1084},
    "gender": {"F": 2649, "M": 2882},
    "session": {1: 1085, 2: 1023, 3: 1151, 4: 1031, 5: 1241},
}
"""The 4-class counts of the full release (exc merged into hap): 5531 utterances."""

_SUMMARY = re.compile(
    r"^\[(?P<start>\d+(?:\.\d+)?) - (?P<end>\d+(?:\.\d+)?)\]"
    r"\t(?P<utt_id>[^\t]+)\t(?P<label>[^\t]+)\t\[[^\]]*\]$"
)
_RATER = re.compile(r"^[A-Z]-[A-Z]+\d*:")
_UTT_ID = re.compile(r"^Ses(?P<session>0[1-5])[FM]_.+_(?P<gender>[FM])\d{3}$")


@dataclass
class IemocapScan:
    """What the parser found: the manifest, every problem, and what was dropped by label."""

    manifest: pd.DataFrame
    problems: list[Problem]
    dropped: Counter = field(default_factory=Counter)


def parse_emo_evaluation(path: Path) -> tuple[list[tuple[str, str, str]], list[Problem]]:
    """Summary lines of one EmoEvaluation file as ``(utt_id, label, where)``, plus malformed lines."""
    entries, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        where = f"{path}:{number}"
        text = line.rstrip("\r\n")
        if not text.strip() or text.startswith("%") or _RATER.match(text):
            continue
        match = _SUMMARY.match(text.rstrip())
        if not match:
            problems.append(
                Problem(
                    where,
                    f"malformed line {text[:80]!r}: expected "
                    "'[start - end]<TAB>utt_id<TAB>label<TAB>[V, A, D]' or a rater line",
                )
            )
            continue
        utt_id, label = match["utt_id"], match["label"]
        if label not in LABELS:
            problems.append(Problem(where, f"unknown emotion label {label!r} for {utt_id}", utt_id))
        elif not _UTT_ID.match(utt_id):
            problems.append(
                Problem(where, f"utterance id {utt_id!r} is not of the form SesNNG_<dialog>_G000", utt_id)
            )
        elif utt_id.rsplit("_", 1)[0] != path.stem:
            problems.append(
                Problem(where, f"utterance {utt_id} does not belong to dialog {path.stem}", utt_id)
            )
        else:
            entries.append((utt_id, label, where))
    return entries, problems


def scan_iemocap(root: str | Path, emotions: list[str], merge: dict[str, str]) -> IemocapScan:
    """Parse every session under ``root`` into a manifest of the kept utterances and a list of problems.

    Utterances with a problem (missing or unreadable wav, duplicate id, ...) are not in the manifest; the
    caller decides whether problems fail the run or are reported and skipped.
    """
    root = Path(root).expanduser().resolve()
    sessions = sorted(p for p in root.glob("Session[1-5]") if p.is_dir())
    if not sessions:
        return IemocapScan(
            pd.DataFrame(columns=COLUMNS),
            [Problem(str(root), "no Session1..Session5 folders: not an IEMOCAP release root", fatal=True)],
        )
    rows, problems, dropped, seen = [], [], Counter(), {}
    for session_dir in sessions:
        session = int(session_dir.name.removeprefix("Session"))
        label_dir = session_dir / "dialog" / "EmoEvaluation"
        # Only the top level: hidden files (macOS '._' copies) and subfolders are not label files.
        label_files = sorted(p for p in label_dir.glob("*.txt") if not p.name.startswith("."))
        if not label_files:
            problems.append(Problem(str(label_dir), "no EmoEvaluation/*.txt label files"))
        for label_file in label_files:
            entries, file_problems = parse_emo_evaluation(label_file)
            problems += file_problems
            for utt_id, label, where in entries:
                if int(utt_id[3:5]) != session:
                    problems.append(
                        Problem(where, f"utterance {utt_id} listed under {session_dir.name}", utt_id)
                    )
                    continue
                if utt_id in seen:
                    problems.append(
                        Problem(where, f"duplicate utterance id {utt_id} (first at {seen[utt_id]})", utt_id)
                    )
                    continue
                seen[utt_id] = where
                emotion = merge.get(label, label)
                if emotion not in emotions:
                    dropped[label] += 1
                    continue
                dialog = utt_id.rsplit("_", 1)[0]
                wav = session_dir / "sentences" / "wav" / dialog / f"{utt_id}.wav"
                try:
                    info = check_audio(wav)
                except AudioError as err:
                    problems.append(Problem(err.path, f"{err.problem} (labelled at {where})", utt_id))
                    continue
                if info.frames / info.samplerate < MIN_DURATION_S:
                    problems.append(Problem(str(wav), "shorter than one HuBERT frame (25 ms)", utt_id))
                    continue
                gender = utt_id.rsplit("_", 1)[1][0]
                rows.append(
                    (
                        utt_id,
                        str(wav),
                        session,
                        f"Ses{session:02d}{gender}",
                        gender,
                        emotion,
                        info.frames / info.samplerate,
                    )
                )
    manifest = pd.DataFrame(rows, columns=COLUMNS)
    # Utterances listed twice are dropped entirely: which copy holds the right label is unknown.
    duplicates = {p.utt_id for p in problems if p.message.startswith("duplicate")}
    manifest = manifest[~manifest["utt_id"].isin(duplicates)].reset_index(drop=True)
    return IemocapScan(manifest, problems, dropped)


def full_release_mismatches(manifest: pd.DataFrame) -> list[str]:
    """How a manifest's counts differ from the full release's (empty when they all match)."""
    mismatches = []
    for column, expected in FULL_RELEASE.items():
        got = manifest[column].value_counts().to_dict()
        for key, count in expected.items():
            if got.get(key, 0) != count:
                mismatches.append(
                    f"{column} {key}: {got.get(key, 0)} utterances, the full release has {count}"
                )
        mismatches += [f"{column} {key}: not in the full release" for key in sorted(set(got) - set(expected))]
    return mismatches
