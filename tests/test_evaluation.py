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


def frame_index_gmps(cache_root, rows, scales):
    """A GMP store whose label of frame t is t mod k at every scale k: with a scale above the longest
    utterance's frames, a piece's labels say which frames of its utterance they are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gmpatl_ray.artifacts import ArtifactCache
    from gmpatl_ray.gmp import LABELS_FILE, GMPStore

    frames = [whole_frames(sf.info(r["path"]).frames) for r in rows]

    def build(folder):
        table = {"utt_id": [r["utt_id"] for r in rows]}
        for k in scales:
            table[f"k{k}"] = pa.array([list(np.arange(n) % k) for n in frames], type=pa.list_(pa.int16()))
        pq.write_table(pa.table(table), folder / LABELS_FILE)
        return {"scales": scales}

    artifact, _ = ArtifactCache(cache_root).get_or_build("gmp", "frame-index", build)
    return GMPStore(artifact)


def whole_frames(samples: int) -> int:
    return (samples - 400) // 320 + 1


@pytest.fixture
def stage2_validation(split, tmp_path):
    """The split as stage 2's validation set, labelled by frame index, chunked at 2 s, 4 s passes."""
    from gmpatl_ray.models.backbone import load_backbone
    from gmpatl_ray.stages import stage2

    for i, row in enumerate(split):
        row["utt_id"] = f"u{i}"
    base = ["stage2.proj_dim=16", "gmp.scales=[4, 2048]", "train.eval_max_duration_s=2"]
    config = small_config(tmp_path, *base, "train.eval_batch_s=4")
    load_backbone(config.backbone).save_pretrained(tmp_path / "hubert")
    gmps = frame_index_gmps(tmp_path / "cache", split, config.gmp.scales)
    loop = {"backbone_dir": str(tmp_path / "hubert"), "gmp_dir": str(gmps.path), "val": split}
    return stage2, config, loop, base


def test_stage2_validation_gives_every_chunk_its_own_frames_labels(stage2_validation):
    """Each piece of a pass carries the labels of exactly its frames: the 30 s utterance's chunks start at
    multiples of 99 frames (2 s chunks), the others at 0; every frame is scored once; masks stay off the
    padding."""
    stage2, config, loop, _ = stage2_validation
    data = stage2.dataset(config, loop, loop["val"], train=False)
    starts = []
    for batch, mask in stage2.validation_batches(loop, config, data, torch.device("cpu")):
        lengths = [whole_frames(n) for n in batch["lengths"].tolist()]
        assert mask.shape == batch["k4"].shape and not (mask & (batch["k4"] == -100)).any()
        for i, n in enumerate(lengths):
            first = int(batch["k2048"][i, 0])
            assert batch["k2048"][i, :n].tolist() == list(range(first, first + n))
            assert batch["k4"][i, :n].tolist() == [t % 4 for t in range(first, first + n)]
            assert (batch["k2048"][i, n:] == -100).all()
            starts.append((first, n))
    long_frames = whole_frames(int(LONG_S * 16000))
    assert sorted(start for start, _ in starts if start > 0) == list(range(99, long_frames, 99))
    assert sum(start == 0 for start, _ in starts) == 7  # each utterance's first piece
    assert sum(n for _, n in starts) == sum(whole_frames(int(s * 16000)) for s in [*SHORT_S, LONG_S])


def test_stage2_validation_loss_does_not_depend_on_the_grouping(stage2_validation, tmp_path):
    """``train.eval_batch_s`` is not part of the stage's fingerprint, so it must not change which epoch is
    kept: masks are drawn per piece (utterance and first frame), not per pass."""
    stage2, config, loop, base = stage2_validation
    model = stage2.build_model(config, loop)
    grouped = stage2.evaluate(model, loop, config)["loss"]
    wider = small_config(tmp_path, *base, "train.eval_batch_s=40")
    assert stage2.evaluate(model, loop, wider)["loss"] == pytest.approx(grouped, rel=1e-5)


def test_stage2_reads_audio_as_the_data_section_says(stage2_validation):
    """An 8 kHz file among the validation utterances: resampled by default, refused with
    ``data.resample: false``."""
    from gmpatl_ray.data.audio import AudioError

    stage2, config, loop, _ = stage2_validation
    row = loop["val"][0]
    wave, _ = sf.read(row["path"], dtype="float32")
    sf.write(row["path"], wave[::2], 8000)
    assert len(stage2.dataset(config, loop, loop["val"], train=False)[0][0]) == len(wave)
    strict = config.model_copy(update={"data": config.data.model_copy(update={"resample": False})})
    with pytest.raises(AudioError, match=f"{row['path']}: sample rate 8000 Hz, expected 16000 Hz"):
        stage2.dataset(strict, loop, loop["val"], train=True)[0]
