"""A small synthetic emotional speech corpus in IEMOCAP's on-disk layout.

The demo runs the whole pipeline without the licensed corpus, so the corpus is written exactly where and
how the real release stores it (``SessionN/sentences/wav`` and ``SessionN/dialog/EmoEvaluation``) and is
read by the real IEMOCAP parser. The audio is additive source-filter speech: harmonics of a moving f0
shaped by per-syllable vowel formants, with consonant noise bursts. Emotions differ in prosody (pitch,
range, contour, rate, loudness, brightness), genders in pitch and formant scale and every speaker has
its own offsets, so emotion and gender are learnable and a held-out session has unseen speakers.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from gmpatl_ray.config import DemoCorpusConfig

MARKER = ".gmpatl-demo.json"
EMOTIONS = ("ang", "hap", "neu", "sad")
DROPPED = ("fru", "xxx", "sur", "oth", "fea", "dis")
DIALOGS = ("F_impro01", "M_impro02", "F_script01_1", "M_impro05b")
"""Suffixes after ``Ses0N``: the speaker letter here names the recording, not who talks (both do)."""
HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]"
WORDS = {
    "ang": "Anger",
    "hap": "Happiness",
    "exc": "Excited",
    "neu": "Neutral",
    "sad": "Sadness",
    "fru": "Frustration",
    "sur": "Surprise",
    "oth": "Other",
    "fea": "Fear",
    "dis": "Disgust",
}
DISAGREEING = ("Frustration", "Neutral", "Anger", "Sadness")
"""Rater words for 'xxx', IEMOCAP's label for utterances the raters did not agree on."""
SOUNDS_LIKE = {
    "exc": "hap",
    "fru": "ang",
    "xxx": "neu",
    "sur": "hap",
    "oth": "neu",
    "fea": "sad",
    "dis": "ang",
}
VAD = {"ang": (2.0, 4.0, 4.0), "hap": (4.0, 3.5, 3.0), "neu": (3.0, 2.5, 2.5), "sad": (2.0, 2.0, 2.0)}
VOWELS = np.array(
    [
        [730, 1090, 2440, 3400],
        [270, 2290, 3010, 3500],
        [300, 870, 2240, 3300],
        [530, 1840, 2480, 3500],
        [570, 840, 2410, 3400],
        [660, 1720, 2410, 3400],
    ],
    float,
)
"""Formants F1-F4 (Hz) of six adult male vowels (Peterson & Barney); a speaker scales them."""
BANDWIDTHS = np.array([80.0, 100.0, 150.0, 200.0])
"""Formant bandwidths (Hz) of the second-order resonances that make the vocal-tract envelope."""


@dataclass(frozen=True)
class Prosody:
    """How an emotion sounds: f0 as a multiple of the speaker's, pitch range in semitones, overall contour
    as a fraction of the range (positive rises), syllables per second, peak level and spectral tilt in
    dB/octave (near 0 is bright, very negative is dark)."""

    f0_scale: float
    range_st: float
    slope: float
    rate: float
    loudness: float
    tilt_db: float


PROSODY = {
    "ang": Prosody(f0_scale=1.4, range_st=7.0, slope=-0.3, rate=6.0, loudness=0.9, tilt_db=-3.0),
    "hap": Prosody(f0_scale=1.3, range_st=6.0, slope=0.6, rate=5.2, loudness=0.7, tilt_db=-6.0),
    "neu": Prosody(f0_scale=1.0, range_st=2.5, slope=-0.2, rate=4.3, loudness=0.45, tilt_db=-9.0),
    "sad": Prosody(f0_scale=0.85, range_st=1.2, slope=-0.8, rate=3.0, loudness=0.2, tilt_db=-13.0),
}


@dataclass(frozen=True)
class Speaker:
    """One actor's voice: base f0 (Hz), formant scale (x a male tract), rate factor, tilt offset (dB/oct)."""

    f0: float
    formant_scale: float
    rate: float
    tilt_db: float


def generate_demo_corpus(root: Path, cfg: DemoCorpusConfig, sample_rate: int = 16000) -> Path:
    """Write the corpus under root (root/Session1 ... root/SessionN); return root.

    Built in a temporary sibling and renamed into place, so a crash never leaves a half corpus at root.
    An existing root is reused only when its marker records this exact config and rate; an empty folder
    counts as absent. Anything else is the user's data and is never overwritten.
    """
    root = Path(root)
    wanted = {"config": cfg.model_dump(), "sample_rate": sample_rate}
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):
        if _marker(root) == wanted:
            return root
        raise _exists_error(root)
    _remove_stale_temps(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        for session in range(1, cfg.sessions + 1):
            _write_session(tmp / f"Session{session}", cfg, session, sample_rate)
        (tmp / MARKER).write_text(json.dumps(wanted, indent=2) + "\n")
        try:
            os.replace(tmp, root)
        except OSError as e:  # another process finished first: fine if it wrote the same corpus
            if _marker(root) != wanted:
                raise _exists_error(root) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _exists_error(root: Path) -> FileExistsError:
    return FileExistsError(
        f"{root} exists and is not a demo corpus generated with this config "
        "and sample rate; delete it or choose another folder (data.root)"
    )


def _marker(root: Path) -> Any:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_temps(root: Path) -> None:
    """Temp folders are never trusted: remove ours (pid reused) and those whose process is gone."""
    if not root.parent.is_dir():
        return
    prefix = f".{root.name}.tmp-"
    for path in root.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        pid = path.name.removeprefix(prefix)
        if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def _speaker(seed: int, session: int, gender: str) -> Speaker:
    """Gender sets the pitch and formant scale; the draw gives each speaker its own voice."""
    rng = np.random.default_rng([seed, 0, session, "FM".index(gender)])
    f0 = rng.uniform(200, 220) if gender == "F" else rng.uniform(110, 125)
    scale = rng.uniform(1.13, 1.22) if gender == "F" else rng.uniform(0.96, 1.04)
    return Speaker(f0=f0, formant_scale=scale, rate=rng.uniform(0.9, 1.1), tilt_db=rng.uniform(-2, 2))


def _speaker_labels(cfg: DemoCorpusConfig, session: int, gender: str) -> list[str]:
    """Four emotions (every second happy one written as 'exc') and the dropped labels, cycled corpus-wide."""
    labels = [
        "exc" if e == "hap" and i % 2 else e for e in EMOTIONS for i in range(cfg.utterances_per_emotion)
    ]
    first = (2 * (session - 1) + "FM".index(gender)) * cfg.dropped_per_speaker
    return labels + [DROPPED[(first + i) % len(DROPPED)] for i in range(cfg.dropped_per_speaker)]


def _write_session(folder: Path, cfg: DemoCorpusConfig, session: int, sr: int) -> None:
    """Deal each speaker's shuffled labels over the dialogs, then interleave the two speakers' turns."""
    rng = np.random.default_rng([cfg.seed, 1, session])
    turns: list[list[tuple[str, str]]] = [[] for _ in DIALOGS]
    for gender in "FM":
        labels = _speaker_labels(cfg, session, gender)
        rng.shuffle(labels)
        for d, dialog_turns in enumerate(turns):
            dialog_turns += [(gender, label) for label in labels[d :: len(DIALOGS)]]
    speakers = {g: _speaker(cfg.seed, session, g) for g in "FM"}
    made = {"F": 0, "M": 0}  # per speaker and session, the index that seeds each utterance
    evaluation = folder / "dialog" / "EmoEvaluation"
    (evaluation / "Categorical").mkdir(parents=True)
    for suffix, dialog_turns in zip(DIALOGS, turns, strict=True):
        dialog = f"Ses0{session}{suffix}"
        (folder / "sentences" / "wav" / dialog).mkdir(parents=True)
        blocks, categorical = [], []
        cursor = int(rng.integers(10_000, 40_000))  # in units of 1e-4 s, so the text adds up exactly
        counts = {"F": 0, "M": 0}
        for i in rng.permutation(len(dialog_turns)):
            gender, label = dialog_turns[i]
            utt_id = f"{dialog}_{gender}{counts[gender]:03d}"
            utt_rng = np.random.default_rng([cfg.seed, 2, session, "FM".index(gender), made[gender]])
            counts[gender] += 1
            made[gender] += 1
            n = round(utt_rng.uniform(cfg.min_duration_s, cfg.max_duration_s) * sr)
            audio = synthesise(utt_rng, speakers[gender], PROSODY[SOUNDS_LIKE.get(label, label)], n, sr)
            sf.write(folder / "sentences" / "wav" / dialog / f"{utt_id}.wav", audio, sr, subtype="PCM_16")
            end = cursor + round(n / sr * 10_000)
            blocks.append(_evaluation_block(utt_rng, utt_id, label, cursor / 10_000, end / 10_000))
            word = DISAGREEING[0] if label == "xxx" else WORDS[label].replace("Neutral", "Neutral state")
            categorical.append(f"{utt_id} :{word}; ()\n")
            cursor = end + int(rng.integers(3_000, 20_000))
        (evaluation / f"{dialog}.txt").write_text(HEADER + "\n\n" + "\n".join(blocks) + "\n")
        (evaluation / "Categorical" / f"{dialog}_e2_cat.txt").write_text("".join(categorical))


def _evaluation_block(rng: np.random.Generator, utt_id: str, label: str, start: float, end: float) -> str:
    """Summary line plus rater lines as in EmoEvaluation; the summary VAD is the raters' mean."""
    words = DISAGREEING if label == "xxx" else [WORDS[label]] * 4
    vad = np.clip(np.rint(np.array(VAD[SOUNDS_LIKE.get(label, label)]) + rng.normal(0, 0.6, (3, 3))), 1, 5)
    mean = ", ".join(f"{v:.4f}" for v in vad.mean(axis=0))
    lines = [f"[{start:.4f} - {end:.4f}]\t{utt_id}\t{label}\t[{mean}]"]
    lines += [f"C-{r}:\t{w};\t()" for r, w in zip(("E2", "E3", "E4", "F1"), words, strict=True)]
    for rater, (v, a, d) in zip(("E3", "E4", "F1"), vad, strict=True):
        lines.append(f"A-{rater}:\tval {v:.0f}; act {a:.0f}; dom  {d:.0f};\t()")
    return "\n".join(lines) + "\n"


def synthesise(rng: np.random.Generator, speaker: Speaker, prosody: Prosody, n: int, sr: int) -> np.ndarray:
    """One utterance of n samples: voiced syllables with consonant bursts, short silences at both ends.

    Control tracks (f0, formants, envelope) live on a 5 ms frame grid; only the harmonic sum runs per
    sample, vectorised over harmonics.
    """
    hop = sr // 200
    t = np.arange(n // hop + 2) * hop / sr
    pad = min(0.15, n / sr / 8)
    start, stop = rng.uniform(pad / 3, pad), n / sr - rng.uniform(pad / 3, pad)
    rate = prosody.rate * speaker.rate * rng.uniform(0.85, 1.15)
    k = max(1, round((stop - start) * rate))
    lengths = rng.uniform(0.7, 1.3, k)
    edges = start + np.concatenate([[0.0], np.cumsum(lengths)]) / lengths.sum() * (stop - start)
    onset = rng.uniform(0.2, 0.35, k)  # share of each syllable taken by its consonant
    nuclei = edges[:-1] + (0.5 + onset / 2) * np.diff(edges)

    syllable = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, k - 1)
    in_vowel = ((t - edges[syllable]) / np.diff(edges)[syllable] - onset[syllable]) / (1 - onset[syllable])
    voicing = (in_vowel > 0) & (in_vowel < 1) & (t >= start) & (t < stop)
    envelope = voicing * np.sin(np.pi * np.clip(in_vowel, 0, 1)) ** 0.7 * rng.uniform(0.6, 1.0, k)[syllable]
    vowels = VOWELS[rng.integers(len(VOWELS), size=k)] * speaker.formant_scale
    formants = np.stack([np.interp(t, nuclei, vowels[:, j]) for j in range(vowels.shape[1])], axis=1)

    f0 = _pitch(rng, t, nuclei, (t - start) / (stop - start), speaker.f0 * prosody.f0_scale, prosody)
    freqs = f0[:, None] * np.arange(1, int(0.45 * sr / f0.min()) + 1)
    tilt = prosody.tilt_db + speaker.tilt_db + rng.normal(0, 1.5)
    amps = _spectrum(freqs, formants, tilt) * (freqs < 0.45 * sr) * envelope[:, None]
    voiced = _render(f0, amps, hop, sr, n)
    audio = voiced / max(np.abs(voiced).max(), 1e-9) + _consonants(rng, edges, onset, n, sr)
    audio += 1e-3 * rng.standard_normal(n)  # a faint noise floor, so silences are not digital zero
    return audio / np.abs(audio).max() * prosody.loudness * rng.uniform(0.8, 1.05)


def _pitch(
    rng: np.random.Generator,
    t: np.ndarray,
    nuclei: np.ndarray,
    progress: np.ndarray,
    base: float,
    prosody: Prosody,
) -> np.ndarray:
    """f0 per frame around base: the emotion's global slope, an accent per syllable and jitter (semitones)."""
    span = prosody.range_st * rng.uniform(0.7, 1.3)
    accents = np.interp(t, nuclei, rng.uniform(-0.5, 0.5, len(nuclei)))
    knots = np.arange(0.0, t[-1] + 0.04, 0.02)
    jitter = np.interp(t, knots, rng.normal(0, 0.15, len(knots)))
    semitones = span * (prosody.slope * (np.clip(progress, 0, 1) - 0.5) + accents) + jitter
    return base * np.exp(rng.normal(0, 0.06)) * 2 ** (semitones / 12)


def _spectrum(freqs: np.ndarray, formants: np.ndarray, tilt_db: float) -> np.ndarray:
    """Gain at each harmonic: a cascade of second-order formant resonances (1 at DC) times the source tilt."""
    f, fk = freqs[:, :, None], formants[:, None, :]
    resonances = fk**2 / np.sqrt((fk**2 - f**2) ** 2 + (f * BANDWIDTHS) ** 2)
    return resonances.prod(axis=2) * (freqs / 100) ** (tilt_db / 6.02)


def _render(f0: np.ndarray, amps: np.ndarray, hop: int, sr: int, n: int) -> np.ndarray:
    """Sum the harmonics of the f0 track; amplitudes interpolate linearly between frames via two matmuls."""
    frames, harmonics = amps.shape
    f0_per_sample = np.interp(np.arange((frames - 1) * hop), np.arange(frames) * hop, f0)
    phase = np.mod(2 * np.pi * np.cumsum(f0_per_sample) / sr, 2 * np.pi).astype(np.float32)
    sines = np.sin(phase[:, None] * np.arange(1, harmonics + 1, dtype=np.float32))
    sines = sines.reshape(frames - 1, hop, harmonics)
    a = amps.astype(np.float32)[:, :, None]
    w = np.arange(hop, dtype=np.float32) / hop
    return ((1 - w) * (sines @ a[:-1])[..., 0] + w * (sines @ a[1:])[..., 0]).ravel()[:n]


def _consonants(
    rng: np.random.Generator, edges: np.ndarray, onset: np.ndarray, n: int, sr: int
) -> np.ndarray:
    """Band-pass noise bursts (fricative- or stop-like) in most syllable onsets; the rest start on a vowel."""
    noise = np.zeros(n)
    for s in np.flatnonzero(rng.random(len(onset)) < 0.7):
        lo = int(edges[s] * sr)
        hi = int((edges[s] + onset[s] * (edges[s + 1] - edges[s])) * sr)
        centre = rng.choice([0.1, 0.2, 0.28, 0.36]) * sr  # 1.6, 3.2, 4.5 and 5.8 kHz at 16 kHz
        band = np.exp(-0.5 * ((np.fft.rfftfreq(hi - lo, 1 / sr) - centre) / (centre / 4)) ** 2)
        burst = np.fft.irfft(np.fft.rfft(rng.standard_normal(hi - lo)) * band, hi - lo)
        noise[lo:hi] = burst * np.hanning(hi - lo) * rng.uniform(0.1, 0.3) / np.abs(burst).max()
    return noise
