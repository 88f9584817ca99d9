"""The demo corpus: IEMOCAP's real layout and text format, determinism, safe reuse and audible emotions."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gmpatl_ray.config import DemoCorpusConfig
from gmpatl_ray.data.demo import DROPPED, EMOTIONS, MARKER, WORDS, generate_demo_corpus
from gmpatl_ray.data.iemocap import scan_iemocap

SMALL = DemoCorpusConfig(sessions=2, utterances_per_emotion=3, dropped_per_speaker=2)
TINY = DemoCorpusConfig(sessions=2, utterances_per_emotion=1, dropped_per_speaker=1)
SUMMARY = re.compile(
    r"^\[(\d+\.\d{4}) - (\d+\.\d{4})\]\t((Ses0\d[FM]_(?:impro|script)\d\d(?:_\d)?[ab]?)_([FM])(\d{3}))"
    r"\t([a-z]{3})\t\[(\d\.\d{4}), (\d\.\d{4}), (\d\.\d{4})\]$"
)
CATEGORY = re.compile(r"^C-(E2|E3|E4|F1):\t([A-Za-z]+);\t\(\)$")
ATTRIBUTE = re.compile(r"^A-(E3|E4|F1):\tval [1-5]; act [1-5]; dom  [1-5];\t\(.*\)$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", SMALL)


def read_turns(root: Path) -> list[dict]:
    """Every summary line, read the way an IEMOCAP parser does (top-level EmoEvaluation files only)."""
    turns = []
    for txt in sorted(root.glob("Session*/dialog/EmoEvaluation/*.txt")):
        for line in txt.read_text().splitlines():
            if m := SUMMARY.match(line):
                session = txt.parents[2].name
                turns.append(
                    {
                        "session": session,
                        "dialog": m[4],
                        "utt": m[3],
                        "gender": m[5],
                        "label": m[7],
                        "start": float(m[1]),
                        "end": float(m[2]),
                        "file": txt.name,
                        "wav": root / session / "sentences" / "wav" / m[4] / f"{m[3]}.wav",
                    }
                )
    return turns


def acoustics(path: Path) -> dict[str, float]:
    """Median autocorrelation f0 of voiced frames, RMS and voiced onsets per second of a wav."""
    x, sr = sf.read(path)
    win, hop = int(0.04 * sr), int(0.01 * sr)
    frames = x[np.arange(0, len(x) - win, hop)[:, None] + np.arange(win)]
    rms = np.sqrt((frames**2).mean(axis=1))
    loud = rms > 0.25 * rms.max()
    centred = frames[loud] - frames[loud].mean(axis=1, keepdims=True)
    ac = np.fft.irfft(np.abs(np.fft.rfft(centred, 2 * win)) ** 2)[:, :win]
    lags = ac[:, sr // 400 : sr // 60] / ac[:, :1]
    periodic = lags.max(axis=1) > 0.5
    first_peak = np.argmax(lags >= 0.9 * lags.max(axis=1, keepdims=True), axis=1) + sr // 400
    voiced = np.zeros(len(frames), bool)
    voiced[np.flatnonzero(loud)[periodic]] = True
    onsets = voiced[0] + np.sum(voiced[1:] & ~voiced[:-1])
    active = np.flatnonzero(rms > 0.05 * rms.max())
    return {
        "f0": float(np.median(sr / first_peak[periodic])),
        "rms": float(np.sqrt((x**2).mean())),
        "rate": float(onsets / ((active[-1] - active[0] + 1) * 0.01)),
    }


def test_layout_and_label_counts(corpus: Path) -> None:
    turns = read_turns(corpus)
    assert sorted(p.name for p in corpus.iterdir()) == [MARKER, "Session1", "Session2"]
    assert json.loads((corpus / MARKER).read_text()) == {"config": SMALL.model_dump(), "sample_rate": 16000}
    assert {t["wav"] for t in turns} == set(corpus.glob("Session*/sentences/wav/*/*.wav"))
    assert len(turns) == 2 * 2 * (4 * 3 + 2)
    for t in turns:
        assert t["session"] == f"Session{t['dialog'][4]}" and t["file"] == f"{t['dialog']}.txt"
        info = sf.info(t["wav"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    for session in ("Session1", "Session2"):
        n = session[-1]
        dialogs = {t["dialog"] for t in turns if t["session"] == session}
        assert dialogs == {f"Ses0{n}{d}" for d in ("F_impro01", "M_impro02", "F_script01_1", "M_impro05b")}
        assert list((corpus / session / "dialog" / "EmoEvaluation" / "Categorical").glob("*_e2_cat.txt"))
        for gender in "FM":
            labels = Counter(t["label"] for t in turns if t["session"] == session and t["gender"] == gender)
            assert {e: labels[e] for e in ("ang", "neu", "sad")} == {"ang": 3, "neu": 3, "sad": 3}
            assert (labels["hap"], labels["exc"]) == (2, 1)
            assert sum(labels[d] for d in DROPPED) == 2 and set(labels) <= {*EMOTIONS, "exc", *DROPPED}
        for dialog in dialogs:
            for gender in "FM":  # both speakers talk in every dialog, numbered from 000 without gaps
                ids = [t["utt"] for t in turns if t["dialog"] == dialog and t["gender"] == gender]
                assert sorted(ids) == [f"{dialog}_{gender}{i:03d}" for i in range(len(ids))] and ids


def test_the_iemocap_parser_reads_it_cleanly(corpus: Path) -> None:
    scan = scan_iemocap(corpus, list(EMOTIONS), {"exc": "hap"})
    assert scan.problems == []
    assert sum(scan.dropped.values()) == 2 * 2 * 2 and set(scan.dropped) <= set(DROPPED)
    counts = scan.manifest.groupby(["session", "gender", "emotion"]).size()
    assert len(counts) == 2 * 2 * 4 and set(counts) == {3}


def test_evaluation_text_matches_the_release_format(corpus: Path) -> None:
    for txt in corpus.glob("Session*/dialog/EmoEvaluation/*.txt"):
        header, blank, *rest = txt.read_text().split("\n")
        assert header == "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]" and blank == ""
        blocks = "\n".join(rest).strip("\n").split("\n\n")
        previous_end = 0.0
        for block in blocks:
            summary, *raters = block.split("\n")
            m = SUMMARY.match(summary)
            assert m, summary
            start, end, label = float(m[1]), float(m[2]), m[7]
            assert previous_end < start < end
            previous_end = end
            categories = [CATEGORY.match(line) for line in raters[:4]]
            assert all(categories) and [c[1] for c in categories] == ["E2", "E3", "E4", "F1"]
            if label != "xxx":
                assert {c[2] for c in categories} == {WORDS[label]}
            assert len(raters) == 7 and all(ATTRIBUTE.match(line) for line in raters[4:])
    categorical = (corpus / "Session1/dialog/EmoEvaluation/Categorical/Ses01F_impro01_e2_cat.txt").read_text()
    line_format = re.compile(r"^Ses01F_impro01_[FM]\d{3} :[A-Za-z ]+; \(\)$")
    assert all(line_format.match(line) for line in categorical.splitlines())


def test_summary_times_match_wav_durations(corpus: Path) -> None:
    for t in read_turns(corpus):
        info = sf.info(t["wav"])
        assert abs((t["end"] - t["start"]) - info.frames / info.samplerate) <= 5e-5 + 1e-9
        assert SMALL.min_duration_s <= info.duration <= SMALL.max_duration_s


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path: Path) -> None:
    first = generate_demo_corpus(tmp_path / "a", TINY)
    again = generate_demo_corpus(tmp_path / "b", TINY)
    other = generate_demo_corpus(tmp_path / "c", TINY.model_copy(update={"seed": 1}))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    wavs_a, wavs_c = sorted(first.rglob("*.wav")), sorted(other.rglob("*.wav"))
    assert len(wavs_a) == len(wavs_c)
    assert all(a.read_bytes() != c.read_bytes() for a, c in zip(wavs_a, wavs_c, strict=True))


def test_existing_corpus_is_reused_and_never_overwritten(tmp_path: Path) -> None:
    root = generate_demo_corpus(tmp_path / "corpus", TINY)
    wav = next(root.rglob("*.wav"))
    stamp = wav.stat().st_mtime_ns
    (root / "sentinel").write_text("mine")
    assert generate_demo_corpus(tmp_path / "corpus", TINY) == root
    assert wav.stat().st_mtime_ns == stamp and (root / "sentinel").read_text() == "mine"
    for other, rate in ((TINY.model_copy(update={"seed": 7}), 16000), (TINY, 8000)):
        with pytest.raises(FileExistsError, match=re.escape(str(root))) as error:
            generate_demo_corpus(root, other, rate)
        assert "delete it or choose another" in str(error.value)
    (tmp_path / "user-data").mkdir()
    (tmp_path / "user-data" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="user-data"):
        generate_demo_corpus(tmp_path / "user-data", TINY)
    assert (tmp_path / "user-data" / "notes.txt").read_text() == "keep"


def test_leftover_temp_folders_are_not_trusted(tmp_path: Path) -> None:
    crashed = [tmp_path / f".corpus.tmp-{pid}" for pid in (os.getpid(), 999_999_999, "x")]
    for leftover in crashed:
        (leftover / "Session1").mkdir(parents=True)
        (leftover / MARKER).write_text(json.dumps({"config": TINY.model_dump(), "sample_rate": 16000}))
    running = tmp_path / f".corpus.tmp-{os.getppid()}"  # a live process may be generating right now
    running.mkdir()
    (tmp_path / "corpus").mkdir()  # an empty folder counts as absent
    root = generate_demo_corpus(tmp_path / "corpus", TINY)
    assert len(read_turns(root)) == 2 * 2 * (4 + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corpus", running.name])


def test_emotion_and_gender_are_audible(corpus: Path) -> None:
    measured: dict[tuple[str, str], list[dict[str, float]]] = {}
    for t in read_turns(corpus):
        if t["label"] in (*EMOTIONS, "exc"):
            key = (t["label"].replace("exc", "hap"), t["gender"])
            measured.setdefault(key, []).append(acoustics(t["wav"]))

    def values(key: str, emotions: tuple[str, ...] = EMOTIONS, genders: str = "FM") -> list[float]:
        return [m[key] for e in emotions for g in genders for m in measured[e, g]]

    def mean(key: str, emotion: str, genders: str = "FM") -> float:
        return float(np.mean(values(key, (emotion,), genders)))

    for emotion in EMOTIONS:  # within an emotion, every female utterance is higher than every male one
        assert min(values("f0", (emotion,), "F")) > max(values("f0", (emotion,), "M"))
    assert np.mean(values("f0", genders="F")) > 1.5 * np.mean(values("f0", genders="M"))
    for gender in "FM":
        assert mean("f0", "ang", gender) > 1.3 * mean("f0", "neu", gender) > 1.3 * mean("f0", "sad", gender)
        assert mean("f0", "hap", gender) > 1.2 * mean("f0", "neu", gender)
    assert mean("rms", "ang") > mean("rms", "hap") > mean("rms", "neu") > mean("rms", "sad")
    assert mean("rms", "ang") > 1.8 * mean("rms", "sad")
    assert min(mean("rate", "ang"), mean("rate", "hap")) > mean("rate", "neu") > mean("rate", "sad") + 0.8
    for quieter, louder in (("hap", "ang"), ("neu", "hap"), ("sad", "neu")):  # neighbours overlap in loudness
        assert max(values("rms", (quieter,))) > min(values("rms", (louder,)))
