"""Validation and test passes bounded by padded audio seconds, whatever the training batch size: a split
holding one utterance far longer than the rest is evaluated in frame-exact chunks, the rest in length-
grouped batches, each utterance with the frames of a lone forward pass where it fits one."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import small_config

from gmpatl_ray.evaluation import EvalLimits, emotion_scores, groups, utterance_frames
from gmpatl_ray.features import chunk_bounds
from gmpatl_ray.models.backbone import frame_counts
from gmpatl_ray.stages import stage1

SHORT_S = [1.0, 1.9, 1.3, 2.0, 1.6, 1.1]
LONG_S = 30.0


@pytest.fixture
def split(tmp_path):
    """Six utterances of 1-2 s and one of 30 s, with their manifest durations."""
    rng = np.random.default_rng(0)
    rows = []
    for i, seconds in enumerate([*SHORT_S[:3], LONG_S, *SHORT_S[3:]]):
        path = tmp_path / f"u{i}.wav"
        sf.write(path, (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32), 16000)
        rows.append({"path": str(path), "emotion": i % 4, "gender": i % 2, "duration_s": seconds})
    return rows


def test_groups_are_bounded_longest_first_and_a_long_utterance_is_alone():
    limits = EvalLimits(16000, True, batch_samples=4 * 16000, chunk_samples=2 * 16000)
    durations = [*SHORT_S[:3], LONG_S, *SHORT_S[3:]]
    found = groups(durations, limits)
    assert found[0] == [3]  # the long one first, alone
    assert sorted(i for group in found for i in group) == list(range(7))
    for group in found[1:]:
        assert len(group) * max(durations[i] for i in group) <= 4
        assert [durations[i] for i in group] == sorted((durations[i] for i in group), reverse=True)


def test_a_long_utterance_is_chunked_and_short_ones_get_their_lone_frames(split, tmp_path):
    config = small_config(
        tmp_path,
        "train.eval_batch_s=4",
        "train.eval_max_duration_s=2",
        "stage1.lstm_hidden=8",
        "stage1.proj_dim=8",
    )
    limits = EvalLimits.of(config)
    model = stage1.build_model(config).eval()
    widths = []  # (batch, samples) of every forward pass: what the first CNN layer is given
    first_conv = model.backbone.feature_extractor.conv_layers[0].conv
    first_conv.register_forward_pre_hook(
        lambda _m, args: widths.append((args[0].shape[0], args[0].shape[-1]))
    )

    def lone(wave: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            hidden, frames = model.frames(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
        return hidden[0, : int(frames[0])]

    with torch.no_grad():
        found = {
            row: frames
            for done in utterance_frames(model.frames, split, limits, 320, 400, torch.device("cpu"))
            for row, frames in done
        }
    assert sorted(found) == list(range(7))
    assert len(widths) >= 4 and all(batch * samples <= limits.batch_samples for batch, samples in widths), (
        widths
    )
    assert max(batch for batch, _ in widths) > 1  # short utterances do share passes
    waves = [sf.read(r["path"], dtype="float32")[0] for r in split]
    for row, frames in found.items():
        if row != 3:
            torch.testing.assert_close(frames, lone(waves[row]), rtol=1e-4, atol=1e-5)
    long, joined = waves[3], found[3]
    assert len(joined) == int(frame_counts(model.backbone, torch.tensor([len(long)]))[0])
    for a, b in chunk_bounds(len(long), limits.chunk_samples, 320, 400):
        chunk = lone(long[a:b])
        torch.testing.assert_close(joined[a // 320 : a // 320 + len(chunk)], chunk, rtol=1e-4, atol=1e-5)

    scores = emotion_scores(model, lambda h, n: model.heads(h, n)[0], split, limits)
    with torch.no_grad():
        expected = [
            int(model.heads(found[i][None], torch.tensor([len(found[i])]))[0].argmax()) for i in range(7)
        ]
    assert scores["predicted"] == expected and scores["truth"] == [r["emotion"] for r in split]


def test_chunks_must_fit_an_evaluation_batch():
    from gmpatl_ray.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match="train: .*eval_max_duration_s \\(30.0\\) must not exceed eval_batch_s"
    ):
        load_config(None, ["train.eval_batch_s=20", "train.eval_max_duration_s=30"])
