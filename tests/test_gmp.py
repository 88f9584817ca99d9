"""Multi-scale k-means pseudo-labels: known clusters recovered, labels aligned with frames, sampling,
reuse and invalidation, bad scales, and the quality report's numbers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from gmpatl_ray.artifacts import Artifact, ArtifactCache
from gmpatl_ray.clustering import assign, fit_kmeans, gpu_available
from gmpatl_ray.devices import resolve_devices
from gmpatl_ray.errors import InputError
from gmpatl_ray.features import FeatureStore, extraction_plan
from gmpatl_ray.gmp import build_gmps, build_gmps_on_cluster, submit_gmps
from gmpatl_ray.gmp_report import backbone_name, label_quality, purity


def blobs(k: int, n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 20, (k, dim))
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(0, 1, (n, dim))).astype(np.float32), truth


def test_faiss_kmeans_recovers_known_clusters():
    x, truth = blobs(16, 8000, 24)
    fit = fit_kmeans(x, 16, iterations=25, seed=0, backend="faiss")
    labels, _ = assign(x, fit.centroids)
    assert purity(labels, truth) > 0.97 and purity(truth, labels) > 0.97
    assert fit.inertia / len(x) == pytest.approx(24, rel=0.25)  # the noise: unit variance per dimension


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU and cuML")
def test_cuml_kmeans_matches_faiss():
    x, truth = blobs(64, 50000, 64)
    gpu = fit_kmeans(x, 64, 20, 0, "cuml")
    cpu = fit_kmeans(x, 64, 20, 0, "faiss")
    assert purity(assign(x, gpu.centroids)[0], truth) > 0.97
    assert gpu.inertia <= cpu.inertia * 1.01


def test_assign_is_exact_nearest_centroid():
    x, _ = blobs(8, 500, 6, seed=1)
    centroids = x[:8] + 0.5
    labels, d2 = assign(x, centroids)
    brute = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, brute.argmin(1))
    np.testing.assert_allclose(d2, brute.min(1), rtol=1e-4, atol=1e-3)


def test_purity_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    classes = np.array(["a", "a", "b", "b", "b", "a"])
    assert purity(labels, classes) == pytest.approx((2 + 2 + 1) / 6)


@pytest.fixture(scope="module")
def features(small_features):
    config, manifest, store, _ = small_features
    return config, manifest, store


def test_every_frame_gets_a_label_at_every_scale(features, tmp_path):
    config, manifest, store = features
    gmps, built = build_gmps_on_cluster(store, -2, config.gmp, 0, None, ArtifactCache(tmp_path))
    assert built and gmps.scales == [4, 8] and gmps.meta["backend"] == "faiss"
    frames = store.index().set_index("utt_id")["frames"]
    seen = 0
    for (utt_id, labels), (feat_id, x) in zip(gmps.iter_labels(), store.iter_layer(-2), strict=True):
        assert utt_id == feat_id
        for k in (4, 8):
            assert len(labels[k]) == frames[utt_id]  # aligned with HuBERT's frames
            assert labels[k].min() >= 0 and labels[k].max() < k
            np.testing.assert_array_equal(labels[k], assign(x.astype(np.float32), gmps.centroids(k))[0])
        seen += 1
    assert seen == len(manifest)
    assert gmps.centroids(8).shape == (8, 32)
    assert gmps.meta["sampled_frames"] == gmps.meta["fit_frames"] == frames.sum()
    assert gmps.meta["inertia"]["8"] < gmps.meta["inertia"]["4"]


def test_reuse_and_invalidation(features, tmp_path):
    config, manifest, store = features
    cache = ArtifactCache(tmp_path)
    first, built = build_gmps(store, -2, config.gmp, 0, None, cache)
    again, rebuilt = build_gmps(store, -2, config.gmp, 0, None, cache)
    assert built and not rebuilt and again.path == first.path
    train = manifest.loc[manifest["session"] != 1, "utt_id"]
    fold, built = build_gmps(store, -2, config.gmp, 0, train, cache)
    assert built and fold.path != first.path and fold.meta["fit_utterances"] == len(train)
    sampled, built = build_gmps(store, -2, config.gmp.model_copy(update={"max_frames": 1000}), 0, None, cache)
    assert built and sampled.meta["sampled_frames"] == 1000
    seeded, built = build_gmps(store, -2, config.gmp, 1, None, cache)
    assert built and seeded.path != first.path


@pytest.mark.parametrize("max_frames", [1_000_000, 300])
def test_the_gmps_do_not_depend_on_the_order_of_the_stores_files(features, tmp_path, max_frames):
    """The same features in files named in the reverse order (Ray Data names them anew on every
    extraction): the same k-means sample, hence the same centroids and labels (all frames, or 300)."""
    config, _, store = features
    copy = tmp_path / "reordered" / store.path.name
    shutil.copytree(store.path, copy)
    files = sorted((copy / "parquet").glob("*.parquet"))
    assert len(files) > 1
    for i, f in enumerate(reversed(files)):
        f.rename(f.with_name(f"{i:03d}-{f.name}"))
    reordered = FeatureStore(Artifact(copy, store.artifact.meta))
    ids = [u for u, _ in store.iter_layer(-2)]
    assert [u for u, _ in reordered.iter_layer(-2)] != ids  # the reading order did change
    gmp = config.gmp.model_copy(update={"max_frames": max_frames})
    first, _ = build_gmps(store, -2, gmp, 0, None, ArtifactCache(tmp_path / "a"))
    second, _ = build_gmps(reordered, -2, gmp, 0, None, ArtifactCache(tmp_path / "b"))
    for k in gmp.scales:
        np.testing.assert_array_equal(first.centroids(k), second.centroids(k))
    assert dict(first.iter_labels()).keys() == dict(second.iter_labels()).keys()
    labels = dict(second.iter_labels())
    for utt_id, by_scale in first.iter_labels():
        for k in gmp.scales:
            np.testing.assert_array_equal(by_scale[k], labels[utt_id][k])


def test_k_larger_than_the_frames_fails_naming_the_field(features, tmp_path):
    config, manifest, store = features
    too_many = config.gmp.model_copy(update={"scales": [4, 100000]})
    with pytest.raises(InputError, match=r"gmp.scales: k=100000 is larger than the \d+ frames available"):
        build_gmps_on_cluster(store, -2, too_many, 0, None, ArtifactCache(tmp_path))
    with pytest.raises(InputError, match="fit utterances are not in the feature store"):
        build_gmps(store, -2, config.gmp, 0, ["nope"], ArtifactCache(tmp_path))


def test_quality_report_rows(features, tmp_path):
    config, manifest, store = features
    gmps, _ = build_gmps(store, -2, config.gmp, 0, None, ArtifactCache(tmp_path))
    table = label_quality(gmps, manifest, backbone_name(config))
    assert list(table["scale"]) == [4, 8] and (table["layer"] == -2).all()
    assert (table["backbone"] == "random hubert 3x32").all()
    for column in ("purity_emotion", "nmi_emotion", "purity_gender", "nmi_gender"):
        assert table[column].between(0, 1).all()
    assert (table["purity_emotion"] >= 0.25).all() and (
        table["purity_gender"] >= 0.5
    ).all()  # >= majority share


@pytest.mark.skipif(gpu_available(), reason="checks the message shown without a GPU")
def test_cuml_without_a_gpu_is_refused():
    from gmpatl_ray.clustering import resolve_backend

    with pytest.raises(InputError, match="gmp.backend=cuml needs a CUDA GPU and cuML"):
        resolve_backend("cuml")
    assert resolve_backend("auto") == "faiss"


def test_opening_something_that_is_not_a_gmp_store(tmp_path):
    from gmpatl_ray.gmp import GMPStore

    (tmp_path / "gmp" / "abc").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not a complete GMP store"):
        GMPStore.open(tmp_path / "gmp" / "abc")


def test_a_cuml_fit_waits_for_a_gpu_instead_of_falling_back_to_the_cpu(features, tmp_path):
    """On a cluster with no GPU now (an autoscaling one whose GPU nodes are at zero), a stated ``cuml``
    backend is a task that waits for a GPU; nothing is fitted on the CPU meanwhile. The same fit with
    ``faiss`` takes a second or two here."""
    import ray

    config, _, store = features
    cuml = config.gmp.model_copy(update={"backend": "cuml"})
    pending = submit_gmps(store, -2, cuml, 0, None, ArtifactCache(tmp_path / "cuml"))
    try:
        assert ray.wait([pending], timeout=8)[0] == []
        assert not list(tmp_path.glob("cuml/gmp/*/_COMPLETE.json"))
    finally:
        ray.cancel(pending, force=True)
    on_cpu = submit_gmps(store, -2, config.gmp, 0, None, ArtifactCache(tmp_path / "faiss"))
    assert ray.wait([on_cpu], timeout=60)[0] == [on_cpu]
    assert ray.get(on_cpu)[0].meta["backend"] == "faiss"


def test_auto_devices_are_resolved_once_from_the_cluster_and_stated_ones_kept(features, capsys):
    config, _, _ = features
    resolved = resolve_devices(config)
    assert (resolved.extract.device, resolved.gmp.backend) == ("cpu", "faiss")  # this cluster has no GPU
    assert "extract.device=cpu, gmp.backend=faiss (auto, resolved once" in capsys.readouterr().out
    stated = config.model_copy(
        update={
            "extract": config.extract.model_copy(update={"device": "cuda"}),
            "gmp": config.gmp.model_copy(update={"backend": "cuml"}),
        }
    )
    assert resolve_devices(stated) == stated and capsys.readouterr().out == ""
    unsized = stated.extract.model_copy(update={"actors": None})
    assert extraction_plan(unsized) == ("cuda", 1)  # no GPU now: one GPU actor, waiting for a GPU node
