"""Hyperparameter sweeps with Ray Tune: each trial is one config (the experiment with one point of
``sweep.space``) evaluated by :func:`gmpatl_ray.pipeline.run_cv` over the sweep's folds.

A trial is a Tune *function* trainable that fits Ray Train ``TorchTrainer``s (the Train V2 way). It
reports after every fold, so ASHA can stop a trial that trails after ``grace_folds`` folds; the objective
is the mean *validation* UAR (test scores are reported beside it, never used to rank). Trials that share
upstream settings share the stage cache: a sweep over stage-3 settings trains stage 1 and stage 2 once per
fold, and two trials that need the same missing stage at once build it once (the cache's file lock).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .artifacts import ArtifactCache
from .atomic import atomic_write_text
from .config import Config, SweepConfig, config_from_dict, set_field, with_absolute_paths
from .console import say
from .devices import resolve_devices, with_devices
from .pipeline import run_cv
from .report import PARAM_TAG
from .tracking import Tracker

OBJECTIVE = "mean_val_uar"
HEAD_RESOURCE = "node:__internal_head__"
"""Ray's built-in resource of the head node."""
SWEEP_TAG = "gmpatl.sweep"
DEVICES_FILE = "gmpatl-devices.json"
"""In the sweep's Tune folder: the devices ``auto`` was resolved to when the sweep started."""


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """``sweep.space`` as Tune search-space objects, keyed by dotted config field."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dim in sweep.space.items():
        if dim.grid is not None:
            space[key] = tune.grid_search(dim.grid)
        elif dim.choice is not None:
            space[key] = tune.choice(dim.choice)
        elif dim.uniform is not None:
            space[key] = tune.uniform(*dim.uniform)
        else:
            space[key] = tune.loguniform(*dim.loguniform)
    return space


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The experiment with one trial's values set (the sweep section dropped: a trial runs as written)."""
    raw = json.loads(json.dumps(base))
    raw.pop("sweep", None)
    for key, value in params.items():
        set_field(raw, key, value)
    return config_from_dict(raw, f"trial {params}")


def trial(params: dict[str, Any], base: dict[str, Any], manifest: pd.DataFrame, folds: list) -> None:
    """One trial: every fold through all stages, reporting the running means to Tune after each fold."""
    from ray import tune

    config = trial_config(base, params)
    if config.cv.max_concurrent_folds is None:  # the trials fill the cluster; a trial's folds take turns
        config = config.model_copy(update={"cv": config.cv.model_copy(update={"max_concurrent_folds": 1})})
    trial = tune.get_context().get_trial_name()
    tracker = Tracker(config.tracking.experiment, config.tracking.uri, config.experiment.output_dir)

    def report(table: pd.DataFrame) -> None:
        tune.report(
            {
                OBJECTIVE: float(table["val_uar"].mean()),
                "mean_test_uar": float(table["uar"].mean()),
                "mean_test_war": float(table["war"].mean()),
                "folds_done": len(table),
            }
        )

    run_cv(
        config,
        manifest,
        folds,
        ArtifactCache(config.experiment.cache_dir),
        tracker,
        run_name=trial,
        tags={SWEEP_TAG: base["experiment"]["name"], "gmpatl.trial": trial}
        | {f"{PARAM_TAG}{k}": str(v) for k, v in params.items()},
        on_fold=report,
        unique_name=True,
    )


def sweep_devices(config: Config, folder: Path, resume: bool) -> Config:
    """``config`` with ``auto`` devices resolved once per sweep: when it starts, from the cluster (and kept
    in ``folder``); on ``resume``, as they were then, so the trials Tune continues get what the first ones
    got though GPU nodes came or went meanwhile (the backend is part of the GMPs' fingerprint)."""
    saved = folder / DEVICES_FILE
    if not (resume and saved.is_file()):
        resolved = resolve_devices(config)
        folder.mkdir(parents=True, exist_ok=True)
        chosen = {"device": resolved.extract.device, "backend": resolved.gmp.backend}
        atomic_write_text(saved, json.dumps(chosen))
        return resolved
    chosen = json.loads(saved.read_text())
    extract = chosen["device"] if config.extract.device == "auto" else config.extract.device
    backend = chosen["backend"] if config.gmp.backend == "auto" else config.gmp.backend
    say(f"devices: extract.device={extract}, gmp.backend={backend} (as when the sweep started)")
    return with_devices(config, extract, backend)


def trial_lines():
    """A Tune callback that says a console line per trial result and failure (Tune's own status table
    goes to the run log)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            say(
                f"trial {trial.trial_id} {trial.config}: {result['folds_done']} fold(s), "
                f"mean val UAR {result[OBJECTIVE]:.1%}, mean test UAR {result['mean_test_uar']:.1%}"
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            say(f"trial {trial.trial_id} {trial.config}: failed (its error is in the run log)")

    return TrialLines()


def run_sweep(config: Config, manifest: pd.DataFrame, folds: list, resume: bool = False) -> pd.DataFrame:
    """Run (or, with ``resume``, continue) the sweep; returns one row per trial with its values, the
    objective and the test means."""
    from ray import tune

    # Paths and devices fixed here, once: every trial gets the same (trials run in folders of their own,
    # and an ``auto`` device decided per trial could differ between trials as GPU nodes come and go).
    config = with_absolute_paths(config)
    storage = Path(config.sweep.storage_path).resolve()
    path = storage / config.experiment.name
    config = sweep_devices(config, path, resume)
    sweep = config.sweep
    base = config.model_dump(mode="json")
    # Create the MLflow experiment here, once, rather than racing to create it from concurrent trials.
    Tracker(config.tracking.experiment, config.tracking.uri, config.experiment.output_dir)
    # Trials run on the head node (their stages' workers go wherever Ray places them): the MLflow server
    # listens on the head's 127.0.0.1 only, and the head's own resource keeps trials there.
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=base, manifest=manifest, folds=folds),
        {"CPU": sweep.cpus_per_trial, HEAD_RESOURCE: 0.001},
    )
    if resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        scheduler = (
            tune.schedulers.ASHAScheduler(
                time_attr="folds_done", max_t=len(folds), grace_period=sweep.grace_folds
            )
            if sweep.scheduler == "asha"
            else None
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode="max",
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials,
                scheduler=scheduler,
            ),
            run_config=tune.RunConfig(
                name=config.experiment.name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                callbacks=[trial_lines()],
            ),
        )
    results = tuner.fit()
    rows = []
    for result in results:  # errored trials too: a failed trial is listed, never dropped
        metrics = result.metrics or {}
        rows.append(
            {k: (result.config or {}).get(k) for k in sweep.space}
            | {"trial": Path(result.path).name if result.path else None, "status": _status(result)}
            | {m: metrics.get(m) for m in (OBJECTIVE, "mean_test_uar", "mean_test_war", "folds_done")}
        )
    table = pd.DataFrame(rows)
    return table.sort_values(OBJECTIVE, ascending=False, na_position="last").reset_index(drop=True)


def _status(result) -> str:
    if result.error is None:
        return "finished"
    return f"failed: {type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:200]}"
