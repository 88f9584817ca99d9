"""Stage-1 training throughput with 1 and 2 DDP workers (Ray Train, gloo), side by side in one run.

Both runs train the same stage-1 model (the demo's HuBERT, or HuBERT base's sizes with ``--base``) on the
same utterances (fold 1's training sessions of the demo corpus) with the same global batch, epochs and
seed, on the same cores: one worker with all the threads against one single-threaded worker per core.
Throughput is training utterances per second over the epochs after the first (the training loop alone,
as ``train_utterances_per_s`` in every epoch's metrics); wall time includes worker start-up and validation.

    .venv/bin/python benchmarks/training.py [--epochs 3] [--base]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmpatl_ray.config import load_config  # noqa: E402
from gmpatl_ray.cv import fold_split  # noqa: E402
from gmpatl_ray.data.prepare import load_or_prepare  # noqa: E402
from gmpatl_ray.training import emotion_rows, fit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def stage1_setup(workdir: str, epochs: int, base: bool = False) -> tuple:
    """The demo config (HuBERT base's sizes with ``base``), fold 1's split and stage 1's loop inputs."""
    config = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.root={workdir}/IEMOCAP_demo",
            f"data.manifest={workdir}/manifest.csv",
            f"stage1.optim.epochs={epochs}",
            *(["backbone.random_init={}"] if base else []),
        ],
    )
    split = fold_split(config, load_or_prepare(config.data), 1)
    emotions = config.data.emotions
    loop = {
        "config": None,
        "train": emotion_rows(split.train, emotions),
        "val": emotion_rows(split.val, emotions),
    }
    return config, split, loop


def timed_fit(config, loop: dict, name: str, **train_settings) -> tuple[dict, float]:
    """Stage 1 through the real Ray Train path (``fit``) with ``train_settings`` changed; (state, wall s)."""
    train = config.train.model_copy(update={"max_failures": 0, **train_settings})
    run = config.model_copy(update={"train": train})
    with tempfile.TemporaryDirectory() as storage:
        (Path(storage) / "out").mkdir()  # rank 0 writes the kept model here (the cache build folder)
        started = time.perf_counter()
        state = fit(
            "gmpatl_ray.stages.stage1",
            "stage1",
            loop | {"config": run.model_dump(mode="json"), "out": str(Path(storage) / "out")},
            train.model_copy(update={"storage_path": storage}),
            name=name,
        )
        return state, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--base", action="store_true", help="HuBERT base's sizes instead of the demo's")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "benchmarks"))
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    config, split, loop = stage1_setup(args.workdir, args.epochs, args.base)
    audio_s = split.train["duration_s"].sum()
    size = "HuBERT base size" if args.base else "demo HuBERT"
    print(
        f"stage 1, {len(split.train)} training utterances ({audio_s:.0f} s of audio), {size}, "
        f"global batch {config.stage1.optim.batch_size}, {args.epochs} epochs, {cores} cores"
    )

    import ray

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    results = {}
    for workers in (1, cores):
        state, wall = timed_fit(
            config, loop, f"bench-{workers}", num_workers=workers, cpus_per_worker=cores // workers
        )
        steady = [h["train_utterances_per_s"] for h in state.meta["history"][1:]] or [
            state.meta["history"][0]["train_utterances_per_s"]
        ]
        results[workers] = (sum(steady) / len(steady), wall, state.meta["history"][-1]["train_loss"])
    ray.shutdown()

    one, _, _ = results[1]
    for workers, (rate, wall, loss) in results.items():
        threads = cores // workers
        print(
            f"{workers} worker(s) x {threads} thread(s)  {rate:6.2f} utterances/s  "
            f"wall {wall:6.1f} s  last train loss {loss:.3f}  ratio {rate / one:.2f}x"
        )


if __name__ == "__main__":
    main()
