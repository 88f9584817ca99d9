"""GMPs: multi-scale k-means pseudo-labels of one HuBERT layer, one label per frame per scale.

A GMP store holds, for every utterance of the feature store it was made from, one label sequence per
scale, exactly as long as the utterance's HuBERT frame sequence (the targets stage 2 trains on), plus the
centroids of every scale (so labels can be recomputed or given to new audio) and the fit's inertia.
k-means fits on a uniform sample of at most ``gmp.max_frames`` frames of the fit utterances (training
sessions only, unless the caller says otherwise); then every frame is labelled in streamed batches, so
memory is bounded by the sample, not the corpus.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .artifacts import Artifact, ArtifactCache, fingerprint
from .clustering import assign, fit_kmeans, resolve_backend
from .config import GMPConfig
from .errors import InputError
from .features import FeatureStore

KIND = "gmp"
LABELS_FILE = "labels.parquet"


def scale_column(k: int) -> str:
    return f"k{k}"


@dataclass(frozen=True)
class GMPStore:
    artifact: Artifact

    @classmethod
    def open(cls, path: str | Path) -> GMPStore:
        """A complete store by its folder (e.g. on a training worker)."""
        path = Path(path)
        artifact = ArtifactCache(path.parent.parent).load(path.parent.name, path.name, verify=False)
        if artifact is None:
            raise FileNotFoundError(f"{path}: not a complete GMP store")
        return cls(artifact)

    @property
    def path(self) -> Path:
        return self.artifact.path

    @property
    def scales(self) -> list[int]:
        return self.artifact.meta["scales"]

    @property
    def meta(self) -> dict[str, Any]:
        return self.artifact.meta

    def centroids(self, k: int) -> np.ndarray:
        return np.load(self.path / f"centroids_{k}.npy")

    def iter_labels(self) -> Iterator[tuple[str, dict[int, np.ndarray]]]:
        """(utt_id, {k: int array of one label per frame}) for every utterance."""
        table = pq.ParquetFile(self.path / LABELS_FILE)
        for batch in table.iter_batches(batch_size=256):
            ids = batch.column("utt_id").to_pylist()
            columns = {k: batch.column(scale_column(k)) for k in self.scales}
            for i, utt_id in enumerate(ids):
                yield utt_id, {k: columns[k][i].values.to_numpy() for k in self.scales}


def build_gmps(
    features: FeatureStore,
    layer: int,
    gmp: GMPConfig,
    seed: int,
    fit_utts: Iterable[str] | None,
    cache: ArtifactCache,
) -> tuple[GMPStore, bool]:
    """The GMP store of ``layer``: k-means at ``gmp.scales`` fit on ``fit_utts`` (None: all), every
    utterance labelled. Reused when the same inputs were clustered before; returns (store, built)."""
    backend = resolve_backend(gmp.backend)
    fit, fit_frames = _fit_plan(features, fit_utts, gmp)
    inputs = {
        "features": features.path.name,
        "layer": layer,
        "scales": gmp.scales,
        "backend": backend,
        "max_frames": gmp.max_frames,
        "iterations": gmp.iterations,
        "seed": seed,
        "fit": fingerprint(sorted(fit)),
    }

    def build(folder: Path) -> dict[str, Any]:
        torch_threads(os.cpu_count() or 1)
        sample = _sample_frames(features, layer, fit, fit_frames, gmp.max_frames, seed)
        fits = {k: fit_kmeans(sample, k, gmp.iterations, seed, backend) for k in gmp.scales}
        for k, result in fits.items():
            np.save(folder / f"centroids_{k}.npy", result.centroids)
        start = time.perf_counter()
        _label_everything(features, layer, {k: f.centroids for k, f in fits.items()}, folder / LABELS_FILE)
        return {
            "inputs": inputs,
            "scales": gmp.scales,
            "layer": layer,
            "backend": backend,
            "fit_utterances": len(fit),
            "fit_frames": fit_frames,
            "sampled_frames": len(sample),
            "inertia": {str(k): f.inertia for k, f in fits.items()},
            "inertia_per_frame": {str(k): f.inertia / len(sample) for k, f in fits.items()},
            "fit_seconds": {str(k): f.seconds for k, f in fits.items()},
            "label_seconds": time.perf_counter() - start,
        }

    artifact, built = cache.get_or_build(KIND, fingerprint(inputs), build)
    return GMPStore(artifact), built


def _fit_plan(features: FeatureStore, fit_utts: Iterable[str] | None, gmp: GMPConfig):
    """The fit utterances and their frame count; fails early on missing utterances or impossible scales."""
    index = features.index()
    fit = set(index["utt_id"]) if fit_utts is None else set(fit_utts)
    missing = fit - set(index["utt_id"])
    if missing:
        raise InputError(
            f"{len(missing)} fit utterances are not in the feature store, e.g. {sorted(missing)[:3]}"
        )
    fit_frames = int(index.loc[index["utt_id"].isin(fit), "frames"].sum())
    available = min(fit_frames, gmp.max_frames)
    for k in gmp.scales:
        if k > available:
            raise InputError(
                f"gmp.scales: k={k} is larger than the {available} frames available to fit it "
                f"({len(fit)} utterances, gmp.max_frames={gmp.max_frames})"
            )
    return fit, fit_frames


def build_gmps_on_cluster(
    features: FeatureStore,
    layer: int,
    gmp: GMPConfig,
    seed: int,
    fit_utts: Iterable[str] | None,
    cache: ArtifactCache,
) -> tuple[GMPStore, bool]:
    """:func:`build_gmps` as a Ray task (:func:`submit_gmps`), waited for."""
    import ray

    return ray.get(submit_gmps(features, layer, gmp, seed, fit_utts, cache))


def submit_gmps(
    features: FeatureStore,
    layer: int,
    gmp: GMPConfig,
    seed: int,
    fit_utts: Iterable[str] | None,
    cache: ArtifactCache,
):
    """Start :func:`build_gmps` as a Ray task: on a GPU worker for cuML, waiting for one if there is none
    yet (never falling back to the CPU), so the driver (head) only waits. ``gmp.backend`` is normally
    resolved by the command already (:mod:`gmpatl_ray.devices`); ``auto`` here means a GPU if the cluster
    has one now. Returns the task's ObjectRef."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .devices import kmeans_backend

    _fit_plan(features, fit_utts, gmp)  # impossible scales fail here, not inside the task
    gmp = gmp.model_copy(update={"backend": kmeans_backend(gmp.backend)})
    num_gpus = 1 if gmp.backend == "cuml" else 0
    # Scheduled on the cluster, not inside the caller's placement group (a Tune trial's holds no CPU).
    task = ray.remote(
        num_cpus=1,
        num_gpus=num_gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )(build_gmps)
    return task.remote(features, layer, gmp, seed, None if fit_utts is None else sorted(fit_utts), cache)


def torch_threads(n: int) -> None:
    """Ray starts workers with one thread; k-means and labelling should use the cores they run on."""
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _sample_frames(
    features: FeatureStore, layer: int, fit: set[str], total: int, max_frames: int, seed: int
) -> np.ndarray:
    """A uniform sample without replacement of ``max_frames`` of the fit frames (all when fewer), float32,
    in utterance-id order. The store's files come in the order of their names, which Ray Data makes anew
    on every extraction, so reading order would make the sample, and k-means, differ between two runs of
    the same config."""
    take = (
        np.sort(np.random.default_rng(seed).choice(total, max_frames, replace=False))
        if total > max_frames
        else None
    )
    index = features.index().set_index("utt_id")["frames"].loc[sorted(fit)]
    offsets = dict(zip(index.index, np.cumsum(index.to_numpy()) - index.to_numpy(), strict=True))
    parts = {}
    for utt_id, x in features.iter_layer(layer, fit):
        if take is None:
            parts[utt_id] = x
        else:
            offset = offsets[utt_id]
            lo, hi = np.searchsorted(take, [offset, offset + len(x)])
            parts[utt_id] = x[take[lo:hi] - offset]
    return np.concatenate([parts[u] for u in sorted(parts)]).astype(np.float32)


def _label_everything(
    features: FeatureStore, layer: int, centroids: dict[int, np.ndarray], out: Path
) -> None:
    """Label every frame of every utterance, streaming batches of utterances into one Parquet file."""
    schema = pa.schema(
        [("utt_id", pa.string()), ("frames", pa.int32())]
        + [(scale_column(k), pa.list_(pa.int16() if k <= 32767 else pa.int32())) for k in centroids]
    )
    with pq.ParquetWriter(out, schema) as writer:
        batch: list[tuple[str, np.ndarray]] = []
        for item in features.iter_layer(layer):
            batch.append(item)
            if sum(len(x) for _, x in batch) >= 65536:
                writer.write_table(_labelled(batch, centroids, schema))
                batch = []
        if batch:
            writer.write_table(_labelled(batch, centroids, schema))


def _labelled(
    batch: list[tuple[str, np.ndarray]], centroids: dict[int, np.ndarray], schema: pa.Schema
) -> pa.Table:
    frames = np.concatenate([x for _, x in batch]).astype(np.float32)
    lengths = np.array([len(x) for _, x in batch], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns: dict[str, Any] = {"utt_id": [u for u, _ in batch], "frames": lengths}
    for k, c in centroids.items():
        labels, _ = assign(frames, c)
        value_type = schema.field(scale_column(k)).type.value_type
        columns[scale_column(k)] = pa.ListArray.from_arrays(
            offsets, pa.array(labels.astype(value_type.to_pandas_dtype()))
        )
    return pa.table(columns, schema=schema)
