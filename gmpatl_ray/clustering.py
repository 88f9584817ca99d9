"""k-means backends behind one small interface: fit centroids on a frame sample, assign labels.

* ``cuml``: RAPIDS cuML on a GPU (scalable k-means++ initialisation);
* ``faiss``: faiss Lloyd iterations on CPU from k-means++ seeds (the default without a GPU;
  ``benchmarks/kmeans.py`` compares it with fairseq's HuBERT k-means recipe);
* ``auto``: cuml when a GPU and cuML are there, else faiss.

Both fit on the sample they are given (the caller samples ``gmp.max_frames`` frames), and assignment is
exact nearest-centroid in float32 whatever the backend, so labels depend only on the centroids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import InputError

Backend = Literal["cuml", "faiss"]


def gpu_available() -> bool:
    try:
        import cuml  # noqa: F401
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # not installed, no driver, no device: all mean "no GPU k-means here"
        return False


def resolve_backend(name: str) -> Backend:
    if name == "auto":
        return "cuml" if gpu_available() else "faiss"
    if name == "cuml" and not gpu_available():
        raise InputError(
            "gmp.backend=cuml needs a CUDA GPU and cuML (pip install -e '.[gpu]'); use faiss or auto"
        )
    return name


@dataclass(frozen=True)
class KMeansFit:
    centroids: np.ndarray
    """k x dim float32."""
    inertia: float
    """Sum of squared distances of the fit sample to its nearest centroid."""
    seconds: float


def fit_kmeans(x: np.ndarray, k: int, iterations: int, seed: int, backend: Backend) -> KMeansFit:
    """Fit k centroids to the rows of ``x`` (float32)."""
    import time

    if k > len(x):
        raise InputError(f"gmp.scales: k={k} is larger than the {len(x)} frames available to fit it")
    x = np.ascontiguousarray(x, dtype=np.float32)
    start = time.perf_counter()
    centroids = _fit_cuml(x, k, iterations, seed) if backend == "cuml" else _fit_faiss(x, k, iterations, seed)
    seconds = time.perf_counter() - start
    _, distances = assign(x, centroids)
    return KMeansFit(centroids, float(distances.sum(dtype=np.float64)), seconds)


def _fit_faiss(x: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """k-means++ seeds (scikit-learn) from a subsample, then faiss Lloyd iterations on all of ``x``.

    faiss alone seeds at random, which can merge well-separated clusters; k-means++ seeds on
    ``max(8k, 2000)`` points avoid that (``tests/test_gmp.py``) and match fairseq's inertia at k=64 and 512
    on 768-dim HuBERT features (``benchmarks/kmeans.py``).
    """
    import faiss
    from sklearn.cluster import kmeans_plusplus

    rng = np.random.default_rng(seed)
    seeds_from = x[rng.choice(len(x), min(len(x), max(8 * k, 2000)), replace=False)]
    init, _ = kmeans_plusplus(seeds_from, k, random_state=seed)
    # faiss subsamples to max_points_per_centroid * k by default; the caller has already sampled.
    kmeans = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, max_points_per_centroid=len(x) // k + 1)
    kmeans.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def _fit_cuml(x: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    from cuml.cluster import KMeans

    kmeans = KMeans(
        n_clusters=k, init="scalable-k-means++", max_iter=iterations, random_state=seed, output_type="numpy"
    )
    kmeans.fit(x)
    return np.ascontiguousarray(kmeans.cluster_centers_, dtype=np.float32)


def assign(x: np.ndarray, centroids: np.ndarray, rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row and its squared distance: exact, float32, on the GPU when there is one."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
    c_sq = (c * c).sum(1)
    labels, distances = [], []
    for start in range(0, len(x), rows):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + rows], dtype=np.float32)).to(device)
        d2 = (xb * xb).sum(1, keepdim=True) - 2 * xb @ c.T + c_sq
        best, index = d2.min(1)
        labels.append(index.cpu().numpy())
        distances.append(best.clamp_min(0).cpu().numpy())
    return np.concatenate(labels), np.concatenate(distances)
