"""Ray Data feature extraction on a real local Ray cluster: frame alignment, batch invariance, long audio,
fingerprint reuse and invalidation, corrupt artifacts, bad configs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config

from gmpatl_ray.artifacts import ArtifactCache, fingerprint
from gmpatl_ray.data.audio import load_audio
from gmpatl_ray.features import chunk_bounds, extract_features, feature_inputs
from gmpatl_ray.models.backbone import BackboneError, frame_counts, hidden_state_index, load_backbone

pytestmark = pytest.mark.usefixtures("ray_cluster")


def reference_features(config, wave: np.ndarray, layer: int) -> np.ndarray:
    """The plain transformers forward pass of one waveform, alone: what the store must hold."""
    model = load_backbone(config.backbone, config.experiment.seed).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(wave)[None], output_hidden_states=True)
    return out.hidden_states[hidden_state_index(layer, model.config.num_hidden_layers)][0].numpy()


@pytest.mark.parametrize(("batch_size", "actors"), [(1, 1), (4, 2)])
def test_features_match_a_plain_forward_pass_frame_for_frame(small_corpus, tmp_path, batch_size, actors):
    folder, manifest = small_corpus
    config = small_config(
        folder,
        f"experiment.cache_dir={tmp_path}",
        f"extract.batch_size={batch_size}",
        f"extract.actors={actors}",
        "extract.layers=[-1, -2]",
    )
    store, built = extract_features(config, manifest, ArtifactCache(tmp_path))
    assert built and store.layers == [-1, -2] and store.dim == 32 and store.artifact.meta["actors"] == actors
    index = store.index().set_index("utt_id")
    assert set(index.index) == set(manifest["utt_id"])
    model = load_backbone(config.backbone, config.experiment.seed)
    rows = manifest.set_index("utt_id")
    for utt_id, frames in index["frames"].items():  # alignment: HuBERT's own frame count for the audio
        samples = len(load_audio(rows.at[utt_id, "path"]))
        assert frames == int(frame_counts(model, torch.tensor([samples]))[0])
    checked = 0
    for utt_id, x in store.iter_layer(-2):
        if checked < 6:  # padded batches give the same features as a lone utterance
            expected = reference_features(config, load_audio(rows.at[utt_id, "path"]), -2)
            np.testing.assert_allclose(x, expected, atol=2e-2, rtol=1e-2)
            checked += 1
        assert x.dtype == np.float16 and x.shape == (index.at[utt_id, "frames"], 32)
    assert store.artifact.meta["audio_s"] == pytest.approx(manifest["duration_s"].sum(), abs=0.1)


def test_long_audio_is_chunked_frame_exactly_or_cropped(small_corpus, tmp_path):
    folder, manifest = small_corpus
    longest = manifest.sort_values("duration_s").iloc[-1]
    one = manifest[manifest["utt_id"] == longest["utt_id"]]
    whole = small_config(folder, "extract.max_duration_s=60")
    chunked = small_config(folder, "extract.max_duration_s=1.0")
    cropped = small_config(folder, "extract.max_duration_s=1.0", "extract.long_audio=crop")
    cache = ArtifactCache(tmp_path)
    frames = {}
    for name, config in [("whole", whole), ("chunked", chunked), ("cropped", cropped)]:
        store, built = extract_features(config, one, cache)
        assert built, name  # the cut is part of the fingerprint
        ((_, frames[name]),) = store.iter_layer(-2)
    wave = load_audio(longest["path"])
    assert len(frames["chunked"]) == len(frames["whole"]) > 150
    np.testing.assert_allclose(frames["whole"], reference_features(whole, wave, -2), atol=2e-2, rtol=1e-2)
    (start, end), *_ = chunk_bounds(len(wave), 16000, 320, 400)  # the first chunk, computed on its own
    first = reference_features(chunked, wave[start:end], -2)
    np.testing.assert_allclose(frames["chunked"][: len(first)], first, atol=2e-2, rtol=1e-2)
    assert len(frames["cropped"]) == 49  # 1 s of audio
    np.testing.assert_allclose(
        frames["cropped"], reference_features(cropped, wave[:16000], -2), atol=2e-2, rtol=1e-2
    )


@pytest.mark.parametrize("samples", [400, 15761, 16000, 16079, 16080, 33333, 480000])
def test_chunk_frames_add_up_to_the_whole(samples):
    """Every chunk yields frames, and together exactly the whole waveform's; a tail of 81..399 samples
    after the last full chunk (15761..16079 here) holds no frame of the whole and gets no chunk."""
    model = load_backbone(small_config(Path("/unused")).backbone)
    bounds = chunk_bounds(samples, 16000, 320, 400)
    per_chunk = [int(frame_counts(model, torch.tensor([b - a]))[0]) for a, b in bounds]
    whole = int(frame_counts(model, torch.tensor([samples]))[0])
    assert sum(per_chunk) == whole and min(per_chunk) >= 1
    assert bounds[0][0] == 0 and (whole - 1) * 320 + 400 <= bounds[-1][1] <= samples  # the last frame's end
    assert all(b - a <= 16000 for a, b in bounds)


def test_a_tail_shorter_than_a_frame_does_not_crash_extraction_one_at_a_time(tmp_path):
    """16079 samples in chunks of at most 1 s: 49 frames in one chunk, and a tail that used to be a chunk of
    its own, (15680, 16079): no frame, and too short for HuBERT's CNN ("Kernel size can't be greater than
    actual input size" in a forward pass of batch size 1)."""
    from gmpatl_ray.features import HubertExtractor

    config = small_config(tmp_path, "extract.max_duration_s=1.0", "extract.batch_size=1")
    extractor = HubertExtractor(config.backbone, 0, [-2], config.extract, "cpu", 16000)
    wave = np.random.default_rng(0).standard_normal(16079).astype(np.float32) * 0.1
    out = extractor({"utt_id": np.array(["u"]), "audio": [wave]})
    assert out["frames"].tolist() == [49]
    features = np.frombuffer(out["layer-2"][0], dtype=np.float16).reshape(49, 32)
    np.testing.assert_allclose(features, reference_features(config, wave[:15760], -2), atol=2e-2, rtol=1e-2)


def test_the_store_summary_reads_no_feature(tmp_path):
    """A store of 64 utterances x 2 MB of features in 4 files: counting it reads the small columns only (it
    used to read a whole feature column into the driver, gigabytes at IEMOCAP scale). Measured as the peak
    of Arrow's memory pool in a fresh process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frames, dim = 1000, 1024
    for part in range(4):
        blobs = [np.full((frames, dim), i, dtype=np.float16).tobytes() for i in range(16)]
        table = pa.table(
            {
                "utt_id": [f"u{part}_{i}" for i in range(16)],
                "frames": np.full(16, frames, dtype=np.int64),
                "dim": np.full(16, dim, dtype=np.int64),
                "audio_s": np.full(16, 20.0),
                "layer-3": pa.array(blobs, type=pa.binary()),
            }
        )
        pq.write_table(table, tmp_path / f"part{part}.parquet")
    code = (
        "import json, sys, pyarrow as pa; from gmpatl_ray.features import store_summary; "
        "print(json.dumps([store_summary(sys.argv[1]), pa.default_memory_pool().max_memory()]))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary, peak = json.loads(result.stdout.splitlines()[-1])
    assert summary == {"dim": dim, "utterances": 64, "frames": 64 * frames, "audio_s": 64 * 20.0}
    one_utterance = frames * dim * 2
    assert peak < one_utterance, f"peak {peak / 2**20:.1f} MiB: features were read"


def test_rerun_reuses_and_changes_invalidate(small_corpus, small_features):
    folder, _ = small_corpus
    config, manifest, store, cache = small_features
    again, built = extract_features(config, manifest, cache)
    assert not built and again.path == store.path
    assert store.path.name == fingerprint(feature_inputs(config, manifest))  # what names the store

    changed = {  # each one names another store, so the cache builds it anew
        "layer": (small_config(folder, "gmp.layer=-1"), manifest),
        "utterances": (config, manifest.iloc[:-1]),
        "seed (another random backbone)": (small_config(folder, "experiment.seed=1"), manifest),
        "cut": (small_config(folder, "extract.max_duration_s=1.0"), manifest),
    }
    for what, (other, rows) in changed.items():
        assert fingerprint(feature_inputs(other, rows)) != store.path.name, what
    unchanged = small_config(folder, "extract.batch_size=1", "extract.actors=2")  # no value changes
    assert fingerprint(feature_inputs(unchanged, manifest)) == store.path.name


def test_a_truncated_store_is_rebuilt_not_trusted(small_features, tmp_path):
    config, manifest, complete, _ = small_features
    cache = ArtifactCache(tmp_path)
    copy = cache.folder("features", complete.path.name)
    shutil.copytree(complete.path, copy)
    shard = sorted((copy / "parquet").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rebuilt, built = extract_features(config, manifest, cache)
    assert built and rebuilt.path == copy
    assert sum(1 for _ in rebuilt.iter_layer(-2)) == len(manifest)


def test_layer_out_of_range_fails_before_any_work(small_corpus, tmp_path):
    folder, manifest = small_corpus
    config = small_config(folder, "gmp.layer=-4")  # the tiny backbone has 3 layers
    with pytest.raises(BackboneError, match="layer -4 is out of range .* 3 transformer layers: use -1 .. -3"):
        extract_features(config, manifest, ArtifactCache(tmp_path))
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())
