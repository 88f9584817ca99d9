"""A fake IEMOCAP_full_release written in the real release's exact layout, traps included.

Written here by hand (not with the project's demo writer) so the parser is checked against the format
itself. The full-size variant reproduces the real 4-class counts: 5531 utterances, ang 1103, hap 1636
(595 hap + 1041 exc), neu 1708, sad 1084; F 2649, M 2882; sessions 1085/1023/1151/1031/1241.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

# Per-session 4-class counts of the real release (hap includes exc).
SESSION_COUNTS = {
    1: {"ang": 229, "hap": 278, "neu": 384, "sad": 194},
    2: {"ang": 137, "hap": 327, "neu": 362, "sad": 197},
    3: {"ang": 240, "hap": 286, "neu": 320, "sad": 305},
    4: {"ang": 327, "hap": 303, "neu": 258, "sad": 143},
    5: {"ang": 170, "hap": 442, "neu": 384, "sad": 245},
}
FEMALE_TOTAL = 2649
DROPPED_LABELS = ("fru", "xxx", "sur", "fea", "dis", "oth")
RATER = {
    "ang": "Anger",
    "hap": "Happiness",
    "exc": "Excited",
    "neu": "Neutral",
    "sad": "Sadness",
    "fru": "Frustration",
    "xxx": "Other",
    "sur": "Surprise",
    "fea": "Fear",
    "dis": "Disgust",
    "oth": "Other",
}
# Dialog names with the release's quirks: a/b suffixes and scripted part numbers.
DIALOGS = ("impro01", "impro02", "impro05a", "impro05b", "script01_1", "script01_2", "script02_2", "impro07")
WAV_SAMPLES = 400  # 25 ms: prepare decodes every file, so keep them short


def utterance_plan(session_counts=SESSION_COUNTS, female_total=FEMALE_TOTAL) -> list[tuple[int, str, str]]:
    """(session, gender, label) for every kept utterance, with the real marginals."""
    cells = [(s, e, n) for s, counts in session_counts.items() for e, n in counts.items()]
    total = sum(n for _, _, n in cells)
    females = [n * female_total // total for _, _, n in cells]
    for i in range(female_total - sum(females)):  # hand out the rounding remainder
        females[i % len(cells)] += 1
    plan = []
    for (session, emotion, n), nf in zip(cells, females, strict=True):
        for i in range(n):
            label = emotion
            if emotion == "hap":
                label = "exc" if i % 8 < 5 else "hap"  # about 5/8 of IEMOCAP's happy are 'excited'
            plan.append((session, "F" if i < nf else "M", label))
    return plan


def write_release(root: Path, plan, dropped_per_session: int = 6, traps: bool = True) -> Path:
    """Write label files and wavs for ``plan``; returns root. Dropped-label utterances get wavs too."""
    hum = (np.sin(np.arange(WAV_SAMPLES) / 8) * 300).astype(np.int16)  # quiet, but not digital silence
    by_session: dict[int, list[tuple[str, str]]] = {}
    for session, gender, label in plan:
        by_session.setdefault(session, []).append((gender, label))
    for session, utts in by_session.items():
        utts = utts + [
            ("MF"[i % 2], DROPPED_LABELS[i % len(DROPPED_LABELS)]) for i in range(dropped_per_session)
        ]
        dialogs: dict[str, list[str]] = {}
        counters: dict[tuple[str, str], int] = {}
        sdir = root / f"Session{session}"
        for i, (gender, label) in enumerate(utts):
            owner = "FM"[i % 2]  # who wore the markers: independent of the speaker's gender
            dialog = f"Ses{session:02d}{owner}_{DIALOGS[(i // 2) % len(DIALOGS)]}"
            n = counters[(dialog, gender)] = counters.get((dialog, gender), -1) + 1
            utt_id = f"{dialog}_{gender}{n:03d}"
            start = 1.5 + 3 * len(dialogs.get(dialog, []))
            block = [
                f"[{start:.4f} - {start + 2.3456:.4f}]\t{utt_id}\t{label}\t[2.5000, 3.0000, 2.5000]",
                f"C-E2:\t{RATER[label]};\t()",
                f"C-E3:\t{RATER[label]};\tNeutral;\t()",
                f"C-{gender}1:\t{RATER[label]};\t()",
                "A-E3:\tval 3; act 2; dom  2;\t()",
                f"A-{gender}1:\tval 3; act 3; dom  3;\t(note)",
            ]
            dialogs.setdefault(dialog, []).append("\n".join(block))
            wav_dir = sdir / "sentences" / "wav" / dialog
            wav_dir.mkdir(parents=True, exist_ok=True)
            sf.write(wav_dir / f"{utt_id}.wav", hum, 16000, subtype="PCM_16")
        label_dir = sdir / "dialog" / "EmoEvaluation"
        label_dir.mkdir(parents=True, exist_ok=True)
        for j, (dialog, blocks) in enumerate(dialogs.items()):
            text = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n" + "\n\n".join(blocks) + "\n"
            newline = "\r\n" if traps and j == 0 else "\n"  # one file with Windows line ends
            (label_dir / f"{dialog}.txt").write_bytes(text.replace("\n", newline).encode())
        if traps:
            _write_traps(sdir, next(iter(dialogs)), dialogs[next(iter(dialogs))][0])
    return root


def _write_traps(sdir: Path, dialog: str, first_block: str) -> None:
    """Files a careless parser would read: per-rater subfolders, a macOS resource fork, unlabelled wavs."""
    label_dir = sdir / "dialog" / "EmoEvaluation"
    utt_id = first_block.split("\t")[1]
    for sub, line in [
        ("Categorical", f"{utt_id} :Neutral state; ()"),
        ("Attribute", f"{utt_id} :val 3; act 2; dom  2; ()"),
        ("Self-evaluation", first_block),
    ]:  # summary-shaped lines: recursion would double-count
        (label_dir / sub).mkdir(exist_ok=True)
        (label_dir / sub / f"{dialog}_e2_cat.txt").write_text(line + "\n")
    (label_dir / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07Mac OS X        \x00\x02")
    extra = sdir / "sentences" / "wav" / dialog / f"{dialog}_X999.wav"  # a wav no label file names
    sf.write(extra, np.zeros(WAV_SAMPLES, dtype=np.int16), 16000, subtype="PCM_16")
    (sdir / "dialog" / "wav").mkdir(parents=True, exist_ok=True)
    sf.write(sdir / "dialog" / "wav" / f"{dialog}.wav", np.zeros(WAV_SAMPLES, dtype=np.int16), 16000)
