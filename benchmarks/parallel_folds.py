"""A CV's folds one after another against side by side (``cv.max_concurrent_folds``), in one run.

Both CVs are the demo's (``configs/demo.yaml``) over the same folds, each stage on one 1-CPU worker so
two folds' stages fit this machine's cores at once, each CV in a stage cache of its own (nothing is
reused) and untracked by any server but an embedded store of its own. The folds' results are the same
either way (``tests/test_pipeline.py`` checks it bit for bit); what changes is the wall time. With
``--ddp-baseline`` the first CV is instead the demo as it ships: each stage on 2 DDP workers of 1 CPU,
so on 2 CPUs one fold at a time (different shards, so different numbers per fold).

    .venv/bin/python benchmarks/parallel_folds.py [--folds 1 2] [--width 2] [--ddp-baseline]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gmpatl_ray.artifacts import ArtifactCache  # noqa: E402
from gmpatl_ray.config import load_config  # noqa: E402
from gmpatl_ray.data.prepare import load_or_prepare  # noqa: E402
from gmpatl_ray.pipeline import run_cv  # noqa: E402
from gmpatl_ray.tracking import Tracker  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--ddp-baseline", action="store_true")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "benchmarks"))
    args = parser.parse_args()
    baseline_workers = 2 if args.ddp_baseline else 1

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    walls, tables = {}, {}
    for width, workers in ((1, baseline_workers), (args.width, 1)):
        with tempfile.TemporaryDirectory() as here:
            config = load_config(
                REPO / "configs" / "demo.yaml",
                [
                    f"data.root={args.workdir}/IEMOCAP_demo",
                    f"data.manifest={args.workdir}/manifest.csv",
                    f"experiment.output_dir={here}/out",
                    f"experiment.cache_dir={here}/cache",
                    f"train.storage_path={here}/ray",
                    f"train.num_workers={workers}",
                    "train.cpus_per_worker=1",
                    "tracking.log_model=false",
                    f"cv.max_concurrent_folds={width}",
                ],
            )
            manifest = load_or_prepare(config.data)
            started = time.perf_counter()
            tables[width] = run_cv(
                config,
                manifest,
                args.folds,
                ArtifactCache(config.experiment.cache_dir),
                Tracker("parallel-folds", None, f"{here}/out"),
            )
            walls[width] = time.perf_counter() - started
    ray.shutdown()
    same = tables[1][["war", "uar"]].equals(tables[args.width][["war", "uar"]])
    baseline = f"{baseline_workers} 1-CPU worker(s)"
    print(f"demo CV, folds {args.folds}, one 1-CPU worker per stage side by side")
    print(f"one fold at a time, {baseline} per stage  {walls[1]:7.1f} s")
    print(
        f"{args.width} folds at a time, 1 1-CPU worker per stage  {walls[args.width]:7.1f} s  "
        f"ratio {walls[1] / walls[args.width]:.2f}x  (same WAR and UAR per fold: {same})"
    )


if __name__ == "__main__":
    main()
