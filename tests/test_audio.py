"""Audio loading: formats converted to 16 kHz mono float32; every bad file named with its problem."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from gmpatl_ray.data.audio import AudioError, audio_info, check_audio, load_audio


def tone(rate: int, seconds: float = 0.5, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_pcm16_at_16k_is_read_exactly(tmp_path):
    path = tmp_path / "a.wav"
    pcm = (tone(16000) * 32767).astype(np.int16)
    sf.write(path, pcm, 16000, subtype="PCM_16")
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.shape == (8000,)
    np.testing.assert_allclose(wave, pcm / 32768.0, atol=1e-7)
    assert np.abs(wave).max() <= 1.0


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_rates_are_resampled_to_16k(tmp_path, rate):
    path = tmp_path / f"{rate}.wav"
    sf.write(path, tone(rate, freq=300.0), rate)
    wave = load_audio(path, sample_rate=16000)
    assert abs(len(wave) - 8000) <= 1
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 300.0) < 4  # the tone survives at its pitch


def test_other_rate_is_an_error_when_resampling_is_off(tmp_path):
    path = tmp_path / "b.wav"
    sf.write(path, tone(44100), 44100)
    with pytest.raises(AudioError, match=rf"{path}: sample rate 44100 Hz, expected 16000 Hz"):
        load_audio(path, resample=False)


def test_stereo_is_mixed_down(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = tone(16000), np.zeros(8000, dtype=np.float32)
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), left / 2, atol=1e-7)


@pytest.mark.parametrize("subtype", ["PCM_24", "FLOAT", "PCM_U8"])
def test_24bit_float_and_8bit_wavs(tmp_path, subtype):
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, tone(16000), 16000, subtype=subtype)
    np.testing.assert_allclose(load_audio(path), tone(16000), atol=1e-2 if subtype == "PCM_U8" else 1e-4)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match=rf"{tmp_path / 'nope.wav'}: file not found"):
        load_audio(tmp_path / "nope.wav")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=rf"{path}: empty file \(0 bytes\)"):
        load_audio(path)


def test_header_without_samples(tmp_path):
    path = tmp_path / "header_only.wav"
    sf.write(path, np.zeros(0, dtype=np.int16), 16000)
    with pytest.raises(AudioError, match=rf"{path}: no audio samples \(0 frames\)"):
        audio_info(path)


def test_garbage_is_unreadable(tmp_path):
    path = tmp_path / "garbage.wav"
    path.write_bytes(b"this is not a wav file at all" * 10)
    with pytest.raises(AudioError, match=rf"{path}: unreadable audio header"):
        load_audio(path)


def test_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    data = tone(16000)
    data[100] = np.nan
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=rf"{path}: contains NaN or infinite samples"):
        load_audio(path)


def test_truncated_data_is_caught_from_the_header(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, tone(16000, seconds=1.0), 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:20000])  # a copy that stopped half way: libsndfile still reads it
    with pytest.raises(
        AudioError,
        match=rf"{path}: truncated: the header declares 32000 bytes of audio, "
        "the file holds 19956",
    ):
        audio_info(path)


def test_infinite_samples(tmp_path):
    path = tmp_path / "inf.wav"
    data = tone(16000)
    data[7] = -np.inf
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=rf"{path}: contains NaN or infinite samples"):
        load_audio(path)


def test_digital_silence(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros((16000, 2), dtype=np.int16), 16000)
    with pytest.raises(AudioError, match=rf"{path}: silent: every sample is 0"):
        check_audio(path)
