"""The floor of one Ray Train run: a one-worker TorchTrainer whose training function does nothing, then one
that only imports torch, then one that only imports what every stage's worker imports (the backbone's
module, so torch, transformers and the model classes), side by side in one local 2-CPU cluster; and, for
comparison, Ray Train without its torch backend (a plain DataParallelTrainer) on the first two functions.

What a stage run costs above the last row is its own work (model build, loop, validation, checkpoints);
the rows themselves are paid by every Ray Train run whatever it trains: the controller's and the worker's
process start, their imports and the process group. The test suite's ~29 Ray Train runs (tests about
faults, DDP, sweeps and jobs, which need a real worker group) pay it each.

    .venv/bin/python benchmarks/ray_train_floor.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmpatl_ray.training import POLL_INTERVAL_ENV  # noqa: E402

RUNS = {
    "nothing": ("torch", None),
    "import torch": ("torch", "torch"),
    "import the backbone module (torch, transformers)": ("torch", "gmpatl_ray.models.backbone"),
    "no torch backend: nothing": ("plain", None),
    "no torch backend: import torch": ("plain", "torch"),
}
"""Row label: (trainer, module the training function imports)."""


def train_function(module: str | None):
    def train() -> None:
        if module:
            __import__(module)

    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ[POLL_INTERVAL_ENV] = "0.25"  # as configs/demo.yaml (train.poll_interval_s)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    trainers = {"torch": TorchTrainer, "plain": DataParallelTrainer}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    walls: dict[str, list[float]] = {label: [] for label in RUNS}
    with tempfile.TemporaryDirectory() as storage:

        def fit(name: str, trainer: str, module: str | None) -> float:
            started = time.perf_counter()
            trainers[trainer](
                train_function(module),
                scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(storage_path=storage, name=name),
            ).fit()
            return time.perf_counter() - started

        fit("warm-up", "torch", None)  # the worker pool, the page cache
        for i in range(args.repeats):
            for j, (label, (trainer, module)) in enumerate(RUNS.items()):
                walls[label].append(fit(f"run-{i}-{j}", trainer, module))
    ray.shutdown()

    print(f"one-worker Ray Train runs, median of {args.repeats}, poll interval 0.25 s")
    for label, runs in walls.items():
        shown = ", ".join(f"{w:.1f}" for w in runs)
        print(f"{label:<52} {statistics.median(runs):6.1f} s  (runs: {shown})")


if __name__ == "__main__":
    main()
