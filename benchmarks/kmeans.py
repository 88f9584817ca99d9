"""k-means: the CPU backend against fairseq's HuBERT ``simple_kmeans`` settings, side by side in one run.

Both cluster the same 768-dim features (layer -3 of a base-size random HuBERT over the demo corpus) with the
same threads; inertia is measured the same way for both (exact nearest centroid over all frames).
fairseq's recipe is scikit-learn's MiniBatchKMeans with k-means++ init, max_iter 100, batch_size 10000,
tol 0, max_no_improvement 100, n_init 20, reassignment_ratio 0.

    .venv/bin/python benchmarks/kmeans.py [--scales 64 512] [--iterations 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmpatl_ray.artifacts import ArtifactCache  # noqa: E402
from gmpatl_ray.clustering import assign, fit_kmeans  # noqa: E402
from gmpatl_ray.config import load_config  # noqa: E402
from gmpatl_ray.data.prepare import load_or_prepare  # noqa: E402
from gmpatl_ray.features import extract_features  # noqa: E402
from gmpatl_ray.gmp import torch_threads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def fairseq_kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(
        n_clusters=k,
        init="k-means++",
        max_iter=100,
        batch_size=10000,
        tol=0.0,
        max_no_improvement=100,
        n_init=20,
        reassignment_ratio=0.0,
        compute_labels=False,
        random_state=seed,
    )
    return model.fit(x).cluster_centers_.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "benchmarks"))
    args = parser.parse_args()

    config = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.root={args.workdir}/IEMOCAP_demo",
            f"data.manifest={args.workdir}/manifest.csv",
            "backbone.random_init={}",
            "gmp.layer=-3",
        ],
    )
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    store, _ = extract_features(config, load_or_prepare(config.data), ArtifactCache(f"{args.workdir}/cache"))
    ray.shutdown()
    x = np.concatenate([f for _, f in store.iter_layer(-3)]).astype(np.float32)
    torch_threads(os.cpu_count() or 1)
    print(f"{x.shape[0]} frames x {x.shape[1]} dims, {os.cpu_count()} threads")
    header = ("k", "ours s", "fairseq s", "speed-up", "ours inertia", "fairseq inertia", "ratio")
    print("{:>6} {:>8} {:>10} {:>9} {:>14} {:>16} {:>7}".format(*header))
    for k in args.scales:
        ours = fit_kmeans(x, k, args.iterations, seed=0, backend="faiss")
        start = time.perf_counter()
        centres = fairseq_kmeans(x, k, seed=0)
        fairseq_s = time.perf_counter() - start
        fairseq_inertia = float(assign(x, centres)[1].sum(dtype=np.float64))
        print(
            f"{k:>6} {ours.seconds:8.1f} {fairseq_s:10.1f} {fairseq_s / ours.seconds:8.1f}x "
            f"{ours.inertia:14.4g} {fairseq_inertia:16.4g} {ours.inertia / fairseq_inertia:7.3f}"
        )


if __name__ == "__main__":
    main()
