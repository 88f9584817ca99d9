"""The floor of one Ray Train run: a one-worker TorchTrainer whose training function does nothing, then one
that only imports torch, then one that only imports what every stage's worker imports (the backbone's
module, so torch, transformers and the model classes), side by side in one local 2-CPU cluster; and, for
comparison, Ray Train without its torch backend (a plain DataParallelTrainer) on the first two functions.

What a stage run costs above the last row is its own work (model build, loop, validation, checkpoints);
the rows themselves are paid by every Ray Train run whatever it trains: the controller's and the worker's
process start, their imports and the process group. The test suite's ~29 Ray Train runs (tests about
faults, DDP, sweeps and jobs, which need a real worker group) pay it each.

Then the CPU those runs take, by process: every process on the machine is sampled while more runs of the
"import torch" function go, and the CPU seconds each used (until its last sample) are summed by its
name (``ray::TrainController``, ``ray::RayTrainWorker``, ...), per run. On a machine whose cores are
busy, as the suite's are, CPU seconds are what a run costs the runs beside it.

    .venv/bin/python benchmarks/ray_train_floor.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

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


def process_name(cmdline: list[str]) -> str:
    """``ray::TrainController`` for Ray's workers (without the method they run at the moment,
    ``ray::TrainController.run``), the program's name otherwise (with its script for Python)."""
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split(".")[0]
    name = Path(cmdline[0]).name
    if name.startswith("python"):
        script = next((arg for arg in cmdline[1:] if not arg.startswith("-")), "")
        name = f"{name} {Path(script).name}"
    return name


class CpuByProcess:
    """While open, the CPU seconds (user + system) of every process on the machine, sampled every 50 ms,
    by process name (:func:`process_name`). The sampling itself is counted in the process that opened it."""

    def __init__(self) -> None:
        self._first: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._names: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for process in psutil.process_iter(["cmdline", "cpu_times", "create_time", "name"]):
                info = process.info
                if info["cpu_times"] is None or info["create_time"] is None:
                    continue
                key = (process.pid, info["create_time"])
                used = info["cpu_times"].user + info["cpu_times"].system
                self._first.setdefault(key, used)
                self._last[key] = used
                if info["cmdline"]:  # a process that has exited keeps the name it ran under
                    self._names[key] = process_name(info["cmdline"])
                else:
                    self._names.setdefault(key, info["name"] or "?")
            time.sleep(0.05)

    def __enter__(self) -> CpuByProcess:
        self._thread.start()
        time.sleep(0.2)  # a first sample of what runs already: only what it uses from now on counts
        return self

    def __exit__(self, *_) -> None:
        time.sleep(2.0)  # the last run's processes exit
        self._stop.set()
        self._thread.join()

    def by_name(self) -> dict[str, float]:
        seconds: dict[str, float] = defaultdict(float)
        for key, used in self._last.items():
            seconds[self._names.get(key, "?")] += used - self._first[key]
        return dict(seconds)


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
        with CpuByProcess() as cpu:
            started = time.perf_counter()
            for i in range(args.repeats):
                fit(f"cpu-{i}", "torch", "torch")
            cpu_wall = (time.perf_counter() - started) / args.repeats
    ray.shutdown()

    print(f"one-worker Ray Train runs, median of {args.repeats}, poll interval 0.25 s")
    for label, runs in walls.items():
        shown = ", ".join(f"{w:.1f}" for w in runs)
        print(f"{label:<52} {statistics.median(runs):6.1f} s  (runs: {shown})")

    seconds = {name: used / args.repeats for name, used in cpu.by_name().items()}
    total = sum(seconds.values())
    print(
        f"\nCPU seconds per one-worker run that imports torch (mean of {args.repeats}; wall {cpu_wall:.1f} s)"
    )
    for name, used in sorted(seconds.items(), key=lambda item: -item[1]):
        if used >= 0.05:
            print(f"{name:<52} {used:6.2f} s  {used / total:4.0%}")
    print(f"{'all processes':<52} {total:6.2f} s")


if __name__ == "__main__":
    main()
