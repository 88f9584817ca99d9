"""Audio reading: any wav soundfile can decode becomes float32 mono in [-1, 1] at the model's rate.

Every failure is an :class:`AudioError` whose message starts with the file's path, so a broken file in a
corpus of thousands is found at once instead of surfacing as a shape error deep inside a training step.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf

from ..errors import InputError


class AudioError(InputError):
    """A file that cannot be used as audio; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def audio_info(path: str | Path) -> sf._SoundFileInfo:
    """Read the header only (fast): sample rate, channels, frames. Raises AudioError for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(path, f"unreadable audio header ({err})") from None
    if info.frames == 0:
        raise AudioError(path, "no audio samples (0 frames)")
    if info.format in ("WAV", "WAVEX"):
        _check_wav_data_size(path)
    return info


def check_audio(path: str | Path) -> sf._SoundFileInfo:
    """:func:`audio_info` plus a full decode at the file's own rate, so a corpus is checked for
    undecodable, NaN/inf and silent files once, when it is prepared, not hours into training."""
    info = audio_info(path)
    load_audio(path, info.samplerate, resample=False)
    return info


def _check_wav_data_size(path: Path) -> None:
    """A wav cut short (a copy or download that stopped) still decodes: libsndfile reads what is there.
    The ``data`` chunk's declared size says how much should be there."""
    with open(path, "rb") as f:
        header = f.read(12)
        if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return  # RF64 and friends: no 32-bit sizes to compare
        while chunk := f.read(8):
            if len(chunk) < 8:
                break
            size = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                present = path.stat().st_size - f.tell()
                if size != 0xFFFFFFFF and present < size:
                    raise AudioError(
                        path,
                        f"truncated: the header declares {size} bytes of audio, the file holds {present}",
                    )
                return
            f.seek(size + size % 2, 1)  # chunks are word-aligned


def load_audio(path: str | Path, sample_rate: int = 16000, resample: bool = True) -> np.ndarray:
    """Decode ``path`` to a float32 mono waveform at ``sample_rate``.

    Channels are averaged; another rate is resampled with torchaudio (band-limited sinc) unless
    ``resample`` is false, in which case it is an error. NaN or infinite samples, and digital silence
    (every sample 0), are errors.
    """
    info = audio_info(path)
    if info.samplerate != sample_rate and not resample:
        raise AudioError(path, f"sample rate {info.samplerate} Hz, expected {sample_rate} Hz")
    return _decode(str(path), path, sample_rate)


def audio_from_bytes(data: bytes, name: str, sample_rate: int = 16000) -> np.ndarray:
    """:func:`load_audio` for the bytes of a whole audio file (an HTTP client's upload), resampled to
    ``sample_rate``; ``name`` stands for the file in error messages."""
    if not data:
        raise AudioError(name, "empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, sample_rate)


def _decode(source, name: str | Path, sample_rate: int) -> np.ndarray:
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(name, f"cannot decode audio ({err})") from None
    if data.shape[0] == 0:
        raise AudioError(name, "no audio samples (0 frames)")
    if not np.isfinite(data).all():
        raise AudioError(name, "contains NaN or infinite samples")
    if not data.any():
        raise AudioError(name, "silent: every sample is 0")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        import torch  # here, not at the top: reading manifests and headers should not load torch
        import torchaudio.functional as AF

        wave = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), rate, sample_rate).numpy()
    return np.ascontiguousarray(wave, dtype=np.float32)


def decode_batch(batch: dict[str, np.ndarray], sample_rate: int, resample: bool, crop: int | None) -> dict:
    """A Ray Data task over a batch of manifest rows: paths -> float32 mono waveforms at ``sample_rate``,
    cut to ``crop`` samples when given."""
    audio = np.empty(len(batch["path"]), dtype=object)  # ragged: one float32 array per utterance
    for i, path in enumerate(batch["path"]):
        audio[i] = load_audio(path, sample_rate, resample)[:crop]
    return {"utt_id": batch["utt_id"], "audio": audio}
