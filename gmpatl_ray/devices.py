"""Which devices extraction and k-means use, decided once per command from the config.

``extract.device`` and ``gmp.backend`` may say ``auto``; it is resolved here, once, when a command starts,
from the connected cluster, printed, and the resolved config is what every fold, trial and task gets. So
two trials of one sweep can never disagree (the backend is part of the GMPs' fingerprint, so they would
stop sharing GMPs and stage 2), and nothing changes device mid-run because GPU nodes scaled down. On an
autoscaling cluster whose GPU nodes may be at zero, say ``cuda`` and ``cuml`` (``configs/cluster.yaml``):
a GPU request waits for the autoscaler, it never falls back to the CPU.
"""

from __future__ import annotations

import importlib.util

from .config import Config
from .console import say


def cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0)


def extract_device(value: str) -> str:
    """``extract.device``, ``auto`` meaning ``cuda`` when the cluster has a GPU now."""
    if value != "auto":
        return value
    return "cuda" if cluster_gpus() >= 1 else "cpu"


def actor_plan(device: str, actors: int | None, threads_per_actor: int) -> tuple[str, int]:
    """A model's Ray Data actor pool (extraction, prediction): the device (``auto`` resolved here if a
    command left it) and the most actors: ``actors``, else one per GPU (at least one, for the autoscaler
    to bring up) or one per ``threads_per_actor`` CPU cores of the cluster now."""
    import ray

    device = extract_device(device)
    if actors is not None:
        return device, actors
    if device == "cuda":
        return device, max(1, int(cluster_gpus()))
    return device, max(1, int(ray.cluster_resources().get("CPU", 1) // threads_per_actor))


def kmeans_backend(value: str) -> str:
    """``gmp.backend``, ``auto`` meaning ``cuml`` when the cluster has a GPU now and cuML is installed."""
    if value != "auto":
        return value
    return "cuml" if cluster_gpus() >= 1 and importlib.util.find_spec("cuml") is not None else "faiss"


def resolve_devices(config: Config, announce: bool = True) -> Config:
    """``config`` with ``extract.device`` and ``gmp.backend`` ``auto`` replaced by what the connected
    cluster has now (printed); explicit values are kept as they are."""
    if "auto" not in (config.extract.device, config.gmp.backend):
        return config
    extract, gmp = extract_device(config.extract.device), kmeans_backend(config.gmp.backend)
    if announce:
        say(
            f"devices: extract.device={extract}, gmp.backend={gmp} (auto, resolved once from the cluster's "
            f"{cluster_gpus():g} GPUs now; state them in the config to wait for GPU nodes instead)",
        )
    return with_devices(config, extract, gmp)


def with_devices(config: Config, extract_device: str, backend: str) -> Config:
    """``config`` with ``extract.device`` and ``gmp.backend`` set."""
    return config.model_copy(
        update={
            "extract": config.extract.model_copy(update={"device": extract_device}),
            "gmp": config.gmp.model_copy(update={"backend": backend}),
        }
    )


def concurrent_folds(config: Config, folds: int) -> int:
    """``cv.max_concurrent_folds``, or (None) how many folds' stages the cluster's GPUs or CPUs fit now,
    between 1 and ``folds``."""
    import ray

    wanted = config.cv.max_concurrent_folds
    if wanted is None:
        train = config.train
        workers = max(1, train.num_workers)  # local mode (0) trains in the driver, on one worker's share
        if train.use_gpu:
            wanted = int(cluster_gpus() // workers)
        else:
            wanted = int(ray.cluster_resources().get("CPU", 1) // (workers * train.cpus_per_worker))
    return max(1, min(wanted, folds))
