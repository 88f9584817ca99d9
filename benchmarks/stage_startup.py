"""Where a short stage run's wall time goes: a table of its parts, from the stage's own clock.

Each run is the demo's stage 1 for one epoch on fold 1 through the real Ray Train path (``fit``, the demo's
2 DDP workers and ``train.poll_interval_s``), ``--repeats`` times after one warm-up run, on one local
cluster. Rank 0 stamps when its training function starts, when the model is built, when DDP and the data
loader are ready, how long the loop, validation and checkpoint reports took, and when it finishes
(``meta["timing"]`` of every stage artifact); the driver adds the submit and return times. The driver's
own imports (``import gmpatl_ray.pipeline`` in a fresh interpreter) are measured beside them.

    .venv/bin/python benchmarks/stage_startup.py [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from training import REPO, stage1_setup, timed_fit

PARTS = {
    "start": "controller, worker group and process group, worker imports",
    "model_build": "model build (HuBERT from its folder, heads)",
    "ddp_and_loader": "DDP wrap, datasets and data loader",
    "training_loop": "training loop",
    "validation": "validation",
    "checkpoints": "checkpoint save and report (persisted to storage)",
    "other_epoch_work": "rest of the epochs (metric all-reduce, bookkeeping)",
    "final_model_and_finish": "best model saved, finish (stage-3 test), placement",
    "shutdown_and_result": "worker group shutdown, result back to the driver",
}


def driver_imports() -> float:
    code = "import time; t = time.perf_counter(); import gmpatl_ray.pipeline; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "benchmarks"))
    args = parser.parse_args()

    config, split, loop = stage1_setup(args.workdir, epochs=1)
    print(f"stage 1, 1 epoch, {len(split.train)} training utterances, {args.workers} worker(s)")
    imports = statistics.mean(driver_imports() for _ in range(args.repeats))

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = {"num_workers": args.workers, "cpus_per_worker": 2 // args.workers}
    timed_fit(config, loop, "warm-up", **settings)  # first imports, worker pool
    runs = [timed_fit(config, loop, f"parts-{i}", **settings)[0].meta["timing"] for i in range(args.repeats)]
    ray.shutdown()

    wall = statistics.mean(run["wall"] for run in runs)
    print(f"{'part':<62} {'seconds':>8} {'share':>6}")
    print(f"{'driver imports (import gmpatl_ray.pipeline, once per process)':<62} {imports:8.1f}")
    for key, label in PARTS.items():
        seconds = statistics.mean(run[key] for run in runs)
        print(f"{label:<62} {seconds:8.1f} {seconds / wall:6.0%}")
    walls = ", ".join(f"{run['wall']:.1f}" for run in runs)
    print(f"{'stage run wall time (fit call to result)':<62} {wall:8.1f}   (runs: {walls})")


if __name__ == "__main__":
    main()
