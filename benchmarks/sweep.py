"""Sweep cost with and without the stage cache, side by side in one run.

The sweep of ``configs/sweep.yaml`` (stage-3 margin x scale, 4 trials) on the demo corpus, over the folds
given. With the cache (what ``gmpatl sweep`` does): one Ray Tune sweep whose trials share the stage cache,
so stage 1, the GMPs and stage 2 are built once per fold. Without it (the baseline): the same 4 trial
configs, each with a cache of its own, so every trial trains every stage. Stage executions are counted as
Ray Train runs; wall time includes everything (Tune, extraction, k-means, MLflow).

    .venv/bin/python benchmarks/sweep.py [--folds 1] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmpatl_ray.artifacts import ArtifactCache  # noqa: E402
from gmpatl_ray.config import load_config  # noqa: E402
from gmpatl_ray.data.prepare import load_or_prepare  # noqa: E402
from gmpatl_ray.pipeline import run_cv  # noqa: E402
from gmpatl_ray.sweep import run_sweep, trial_config  # noqa: E402
from gmpatl_ray.tracking import Tracker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("stage1", "stage2", "stage3")


def counted(storage: Path) -> dict[str, int]:
    return {stage: len(list(storage.glob(f"{stage}-*"))) for stage in STAGES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", default="1", help="comma-separated folds (default 1)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every stage")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "benchmarks"))
    args = parser.parse_args()
    folds = [int(f) for f in args.folds.split(",")]
    epochs = [f"{stage}.optim.epochs={args.epochs}" for stage in STAGES]

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        config = load_config(
            REPO / "configs" / "sweep.yaml",
            [
                f"data.root={args.workdir}/IEMOCAP_demo",
                f"data.manifest={args.workdir}/manifest.csv",
                f"experiment.output_dir={scratch / 'cached'}",
                "tracking.log_model=false",
                "train.keep_run_folders=true",  # stage executions are counted as Ray Train run folders
                *epochs,
            ],
        )
        manifest = load_or_prepare(config.data)
        print(f"sweep of configs/sweep.yaml: 4 trials, folds {folds}, {args.epochs} epoch(s) per stage")

        started = time.perf_counter()
        run_sweep(config, manifest, folds)
        cached_s, cached = time.perf_counter() - started, counted(scratch / "cached" / "ray_train")

        started = time.perf_counter()
        base = config.model_dump(mode="json")
        for i, margin in enumerate(config.sweep.space["stage3.margin"].grid):
            for j, scale in enumerate(config.sweep.space["stage3.scale"].grid):
                out = scratch / "uncached" / f"trial{i}{j}"
                trial = trial_config(
                    base,
                    {
                        "stage3.margin": margin,
                        "stage3.scale": scale,
                        "experiment.output_dir": str(out),
                        "experiment.cache_dir": str(out / "cache"),  # a cache of its own
                        "train.storage_path": str(out / "ray_train"),  # and runs of its own (no resume)
                    },
                )
                tracker = Tracker(trial.tracking.experiment, None, out)
                run_cv(trial, manifest, folds, ArtifactCache(trial.experiment.cache_dir), tracker)
        uncached_s = time.perf_counter() - started
        trials = list((scratch / "uncached").iterdir())
        uncached = {stage: sum(counted(t / "ray_train")[stage] for t in trials) for stage in STAGES}
    ray.shutdown()

    for name, seconds, runs in (("no stage cache", uncached_s, uncached), ("stage cache", cached_s, cached)):
        executions = "  ".join(f"{stage} {runs[stage]}" for stage in STAGES)
        print(f"{name:15s} {seconds:7.1f} s  stage executions: {executions}  total {sum(runs.values())}")
    print(
        f"stage cache: {uncached_s / cached_s:.2f}x faster, "
        f"{sum(uncached.values()) / sum(cached.values()):.2f}x fewer stage executions"
    )


if __name__ == "__main__":
    main()
