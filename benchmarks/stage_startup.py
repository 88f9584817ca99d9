"""A stage run's fixed cost at Ray Train's default worker-check interval (2 s) and at the demo's 0.25 s
(``train.poll_interval_s``), side by side in one run on one local cluster.

Each run is the demo's stage 1 for one epoch on fold 1 through the real Ray Train path (``fit``, 2 DDP
workers as in the demo); the two settings alternate, ``--repeats`` times each, after one warm-up run, so
both see the same machine. Training itself is the same work in every run: the difference is start-up and
shutdown, which the controller paces with its checks.

    .venv/bin/python benchmarks/stage_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics

from training import REPO, stage1_setup, timed_fit

SETTINGS = (2.0, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "benchmarks"))
    args = parser.parse_args()

    config, split, loop = stage1_setup(args.workdir, epochs=1)
    print(f"stage 1, 1 epoch, {len(split.train)} training utterances, {config.train.num_workers} workers")

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    timed_fit(config, loop, "warm-up", poll_interval_s=SETTINGS[1])  # first imports, worker pool
    walls: dict[float, list[float]] = {interval: [] for interval in SETTINGS}
    train_s: dict[float, list[float]] = {interval: [] for interval in SETTINGS}
    for repeat in range(args.repeats):
        for interval in SETTINGS:
            state, wall = timed_fit(config, loop, f"poll-{interval}-{repeat}", poll_interval_s=interval)
            walls[interval].append(wall)
            train_s[interval].append(state["history"][0]["train_seconds"])
    ray.shutdown()

    baseline = statistics.mean(walls[SETTINGS[0]])
    for interval in SETTINGS:
        wall = statistics.mean(walls[interval])
        print(
            f"poll_interval_s {interval:4.2f}  wall {wall:5.1f} s (runs: "
            f"{', '.join(f'{w:.1f}' for w in walls[interval])})  training loop "
            f"{statistics.mean(train_s[interval]):4.1f} s  ratio {baseline / wall:.2f}x"
        )


if __name__ == "__main__":
    main()
