"""One fold of GMP-ATL, stage by stage, every stage reused from the artifact cache when its inputs match:

    split -> stage 1 -> stage-1 HuBERT features of the training folds -> GMPs -> stage 2 -> stage 3 -> test

The k-means and stage 2 see the training folds only (train + validation utterances), never the test fold,
unless ``gmp.transductive`` lets them see its audio (never its labels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .artifacts import Artifact, ArtifactCache, fingerprint
from .atomic import atomic_write_text
from .config import Config, dump_config
from .console import progress, say, step, task
from .cv import FoldSplit, final_split, fold_split
from .data.prepare import skipped_list_path
from .devices import concurrent_folds, resolve_devices
from .features import extract_features
from .gmp import build_gmps_on_cluster
from .inference import save_model_folder
from .plots import confusion_plot, training_curves
from .redact import scrub_tree
from .stages.stage1 import run_stage1
from .stages.stage2 import run_stage2
from .stages.stage3 import run_stage3
from .tracking import Tracker, flatten

STAGES = ("stage1", "stage2", "stage3")


@dataclass
class FoldResult:
    fold: Any
    war: float
    uar: float
    confusion: list[list[int]]
    test_utterances: int
    built: dict[str, bool]
    """Which steps this call computed (False: reused from the cache)."""
    artifacts: dict[str, Artifact]
    """Each step's artifact (folder and metadata: the stages' per-epoch history, the GMPs' inertia)."""


def run_fold(config: Config, manifest: pd.DataFrame, fold: Any, cache: ArtifactCache) -> FoldResult:
    with task(f"fold {fold}"):
        built, artifacts = train_stages(config, fold_split(config, manifest, fold), cache)
    test = artifacts["stage3"].meta["test"]
    return FoldResult(
        fold=fold,
        war=test["war"],
        uar=test["uar"],
        confusion=test["confusion"],
        test_utterances=test["utterances"],
        built=built,
        artifacts=artifacts,
    )


def train_stages(
    config: Config, split: FoldSplit, cache: ArtifactCache
) -> tuple[dict[str, bool], dict[str, Artifact]]:
    """Every stage on ``split`` (a CV fold, or a final model's whole corpus): which steps this call
    computed (False: reused from the cache) and each step's artifact. Each step shows in the progress
    view."""
    with step("stage1") as shown:
        stage1, built1 = run_stage1(config, split, cache)
        shown.reused = not built1
    if config.stage2.enabled:
        built, artifacts = _gmps_and_stage2(config, split, stage1, cache)
        backbone = artifacts["stage2"].path / "backbone"
    else:  # the "without GMPs" ablation: stage 3 fine-tunes the stage-1 HuBERT
        built, artifacts, backbone = {}, {}, stage1.path / "backbone"
    with step("stage3") as shown:
        stage3, built3 = run_stage3(config, split, backbone, cache)
        shown.reused = not built3
    return {"stage1": built1, **built, "stage3": built3}, {"stage1": stage1, **artifacts, "stage3": stage3}


def _gmps_and_stage2(
    config: Config, split: FoldSplit, stage1: Artifact, cache: ArtifactCache
) -> tuple[dict[str, bool], dict[str, Artifact]]:
    """The stage-1 HuBERT's features of the seen folds, their GMPs, and stage 2 trained on them."""
    seen = pd.concat([split.train, split.val, *([split.test] if config.gmp.transductive else [])])
    stage1_features = config.model_copy(
        update={
            "backbone": config.backbone.model_copy(
                update={"pretrained": str(stage1.path / "backbone"), "random_init": None}
            ),
            "extract": config.extract.model_copy(update={"layers": [config.gmp.layer]}),
        }
    )
    with step("features") as shown:
        features, built_features = extract_features(stage1_features, seen, cache)
        meta = features.artifact.meta
        shown.reused = not built_features
        shown.detail = f"{meta['utterances']} utterances, {meta['frames']} frames"
    with step("gmps") as shown:
        gmps, built_gmps = build_gmps_on_cluster(
            features, config.gmp.layer, config.gmp, config.experiment.seed, seen["utt_id"], cache
        )
        inertia = gmps.meta["inertia_per_frame"]
        shown.reused = not built_gmps
        shown.detail = "inertia/frame " + ", ".join(f"k={k} {v:.3f}" for k, v in inertia.items())
    with step("stage2") as shown:
        stage2, built2 = run_stage2(config, split, stage1.path / "backbone", gmps, cache)
        shown.reused = not built2
    built = {"features": built_features, "gmps": built_gmps, "stage2": built2}
    return built, {"gmps": gmps.artifact, "stage2": stage2}


def run_cv(
    config: Config,
    manifest: pd.DataFrame,
    folds: list,
    cache: ArtifactCache,
    tracker: Tracker,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    on_fold: Callable[[pd.DataFrame], None] | None = None,
    unique_name: bool = False,
) -> pd.DataFrame:
    """Every fold, tracked in MLflow: a parent run (config, results table, summed confusion), a child run
    per fold (test metrics, confusion matrix, training curves, final model) and under it a run per stage
    (its settings and per-epoch metrics). ``on_fold`` gets the table so far after each fold (a sweep
    reports it to Tune). ``unique_name``: ``run_name`` names this CV alone (a sweep's trial), so even a
    finished run of that name is the same CV, rerun (a trial Tune restarts) and logged into, not beside.
    Returns the per-fold table; its ``attrs["mlflow_run"]`` is the parent run's id."""
    config = resolve_devices(config)  # once, so no fold (or trial) decides by the cluster of the moment
    emotions = config.data.emotions
    resolved = run_identity(config)
    name = run_name or f"cv-{config.experiment.name}"
    parent, resuming = _parent_run(tracker, name, resolved, tags or {}, unique_name)
    reports = reports_folder(config, tracker, parent)
    track_inputs(tracker, parent, config, resolved, reports)
    rows, total = [], np.zeros((len(emotions), len(emotions)), dtype=int)
    opened: dict[Any, tuple[str, bool]] = {}  # fold -> (its run, already fully logged), while it runs

    def open_fold(fold) -> None:
        fold_tags = {"gmpatl.kind": "fold", "gmpatl.fold": str(fold)}
        opened[fold] = _open_run(tracker, f"fold-{fold}", parent, fold_tags, resuming)

    try:
        with progress(f"cv {config.experiment.name}", [f"fold {f}" for f in folds], step_weights(config)):
            for fold, result in run_folds(config, manifest, folds, cache, open_fold):
                run, logged = opened.pop(fold)
                if not logged:
                    _track_fold(tracker, run, config, result, reports, resuming)
                    tracker.end(run)
                total += np.asarray(result.confusion)
                rows.append(
                    {
                        "fold": fold,
                        "war": result.war,
                        "uar": result.uar,
                        "val_uar": result.artifacts["stage3"].meta["best_val_uar"],
                        "test_utterances": result.test_utterances,
                        "reused": ",".join(k for k, built in result.built.items() if not built),
                    }
                )
                say(f"fold {fold}: WAR {result.war:.1%}  UAR {result.uar:.1%}")
                if on_fold:
                    on_fold(pd.DataFrame(rows))
    except BaseException:
        for failed in [*(run for run, _ in opened.values()), parent]:
            tracker.end(failed, "FAILED")
        raise
    table = pd.DataFrame(rows)
    summary = {
        "mean_war": table["war"].mean(),
        "mean_uar": table["uar"].mean(),
        "std_war": table["war"].std(ddof=0),
        "std_uar": table["uar"].std(ddof=0),
        "mean_val_uar": table["val_uar"].mean(),
    }
    tracker.metrics(parent, summary)
    csv = _write(reports / "cv_results.csv", table.to_csv(index=False, float_format="%.4f"))
    tracker.artifact(parent, csv)
    tracker.artifact(
        parent, _write(reports / "cv_results.md", table.to_markdown(index=False, floatfmt=".4f"))
    )
    tracker.artifact(
        parent,
        confusion_plot(
            total, emotions, f"all folds: UAR {summary['mean_uar']:.1%}", reports / "confusion_all.png"
        ),
    )
    tracker.end(parent)
    tracker.flush()  # a last try for anything that waited out a tracking outage
    table.attrs["mlflow_run"] = tracker.ids.get(parent, parent)
    table.attrs["reports"] = reports
    return table


def step_weights(config: Config) -> dict[str, float]:
    """A fold's steps for the progress view, weighted by their epochs (features and GMPs: one each)."""
    stage2 = {"features": 1, "gmps": 1, "stage2": config.stage2.optim.epochs} if config.stage2.enabled else {}
    return {"stage1": config.stage1.optim.epochs, **stage2, "stage3": config.stage3.optim.epochs}


def reports_folder(config: Config, tracker: Tracker, run: str) -> Path:
    """Where a CV's (or final model's) tables and figures are written before they are logged:
    ``<output_dir>/reports/<run id>`` (the ``offline-`` handle of a run started while MLflow was away), a
    folder of the run's own, so runs side by side on one output folder (sweep trials, two users' CVs) never
    upload each other's files."""
    return Path(config.experiment.output_dir) / "reports" / tracker.ids.get(run, run)


def run_folds(
    config: Config, manifest: pd.DataFrame, folds: list, cache: ArtifactCache, start: Callable[[Any], None]
) -> Iterator[tuple[Any, FoldResult]]:
    """Each fold's result, in fold order, with up to ``cv.max_concurrent_folds`` folds running at once
    (:func:`concurrent_folds`): a thread per running fold waits on its stages, which run on the cluster's
    workers like any fold's. ``start(fold)`` runs in this thread just before a fold starts. If a fold
    fails, no new one starts; those already running finish (their stages are cached for the rerun)."""
    width = concurrent_folds(config, len(folds))
    if width == 1:
        for fold in folds:
            start(fold)
            yield fold, run_fold(config, manifest, fold, cache)
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    say(f"cv: up to {width} folds at once")
    futures: dict[Any, Any] = {}
    with ThreadPoolExecutor(width, thread_name_prefix="fold") as pool:

        def fill() -> None:
            while len(futures) < len(folds) and sum(not f.done() for f in futures.values()) < width:
                fold = folds[len(futures)]
                start(fold)
                futures[fold] = pool.submit(run_fold, config, manifest, fold, cache)

        fill()
        for fold in folds:
            while not futures[fold].done():
                wait([f for f in futures.values() if not f.done()], return_when=FIRST_COMPLETED)
                if not any(f.done() and f.exception() for f in futures.values()):
                    fill()
            yield fold, futures[fold].result()


def run_identity(config: Config) -> dict[str, Any]:
    """The config as a CV or final run records it (params, and the fingerprint an interrupted run is
    resumed by): everything but the sweep (a trial's own values are in it), ``predict``, which only
    ``gmpatl predict`` reads, and ``cv``, which changes how folds run, not what they give; without secrets,
    so none is logged and a changed password is the same run."""
    return scrub_tree(config.model_dump(mode="json", exclude={"sweep", "predict", "cv"}))


def track_inputs(tracker: Tracker, run: str, config: Config, resolved: dict, reports: Path) -> None:
    """What a CV run was given: the flattened config and its fingerprint, ``config.yaml`` (both without
    secrets), and the list of utterances ``prepare --on-error skip`` left out of the manifest (so a run's
    data gaps travel with it), copied into the run's reports first like everything a run logs."""
    tracker.params(run, flatten(resolved) | {"config_fingerprint": fingerprint(resolved)})
    tracker.artifact(run, _write(reports / "config.yaml", dump_config(config, redacted=True)))
    skipped = skipped_list_path(Path(config.data.manifest))
    if skipped.is_file():
        lines = skipped.read_text()
        tracker.artifact(run, _write(reports / skipped.name, lines))
        tracker.metrics(run, {"skipped_utterances": len(lines.splitlines())})


def _parent_run(
    tracker: Tracker, name: str, resolved: dict, tags: dict[str, str], unique_name: bool, kind: str = "cv"
) -> tuple[str, bool]:
    """The CV's parent run (or a final model's run: ``kind``) and whether it takes over an earlier one: a
    run of this name and config
    fingerprint that did not finish (its driver was killed, or it failed) is resumed, so rerunning an
    interrupted CV leaves one run tree; a finished one is left alone and a new run starts, unless the
    name is unique to this CV."""
    tags = {"gmpatl.kind": kind, "gmpatl.config_fingerprint": fingerprint(resolved), **tags}
    found = tracker.find(name, None, tags)
    if found is None or (found[1] == "FINISHED" and not unique_name):
        return tracker.start(name, tags=tags), False
    if found[1] != "FINISHED":
        tracker.resume(found[0])
    return found[0], True


def _open_run(
    tracker: Tracker, name: str, parent: str, tags: dict[str, str], resuming: bool
) -> tuple[str, bool]:
    """The child run ``name`` and whether it is already fully logged. Under a resumed parent, an earlier
    run of that name is reused (finished: left as it is; interrupted: resumed), never duplicated."""
    found = tracker.find(name, parent, {}) if resuming else None
    if found is None:
        return tracker.start(name, parent=parent, tags=tags), False
    run, status = found
    if status == "FINISHED":
        return run, True
    tracker.resume(run)
    return run, False


def _track_fold(
    tracker: Tracker, run: str, config: Config, result: FoldResult, reports: Path, resuming: bool
) -> None:
    """A fold's run: test metrics, figures and per-utterance predictions, the GMPs' inertia, the model,
    and a run per stage."""
    fold, artifacts = result.fold, result.artifacts
    inertia = artifacts["gmps"].meta["inertia_per_frame"] if "gmps" in artifacts else {}
    tracker.metrics(
        run,
        {
            "test_war": result.war,
            "test_uar": result.uar,
            "best_val_uar": artifacts["stage3"].meta["best_val_uar"],
            **{f"gmp_inertia_per_frame_k{k}": v for k, v in inertia.items()},
        },
    )
    title = f"fold {fold}: UAR {result.uar:.1%}"
    tracker.artifact(
        run,
        confusion_plot(result.confusion, config.data.emotions, title, reports / f"confusion_fold{fold}.png"),
    )
    predictions = artifacts["stage3"].meta["test"].get("predictions")  # absent in stages cached before
    if predictions:
        table = pd.DataFrame({"utt_id": list(predictions), "predicted": list(predictions.values())})
        tracker.artifact(run, _write(reports / f"predictions_fold{fold}.csv", table.to_csv(index=False)))
    _track_training(tracker, run, config, f"fold {fold}", result.built, artifacts, reports, resuming)


def _track_training(
    tracker: Tracker,
    run: str,
    config: Config,
    label: str,
    built: dict[str, bool],
    artifacts: dict[str, Artifact],
    reports: Path,
    resuming: bool,
) -> None:
    """What a fold's and a final model's runs share: the training curves, the model as an MLflow pyfunc
    model at artifact path ``model`` (also kept as a local model folder, ``<output_dir>/models/<run>``),
    and under the run a run per stage with its settings and per-epoch metrics."""
    stages = [stage for stage in STAGES if stage in artifacts]  # stage 2 is absent when disabled
    histories = {stage: artifacts[stage].meta["history"] for stage in stages}
    slug = label.replace(" ", "")
    tracker.artifact(run, training_curves(histories, label, reports / f"curves_{slug}.png"))
    if config.tracking.log_model:
        folder = model_folder(config, run)
        save_model_folder(folder, artifacts["stage3"].path, config)
        tracker.artifact(run, folder, "model")
    prefix = run_prefix(label)
    for stage in stages:
        meta = artifacts[stage].meta
        workers = meta.get("workers", [])  # where each rank ran (stages cached before this was recorded)
        tags = {
            "gmpatl.kind": "stage",
            "gmpatl.stage": stage,
            "gmpatl.fold": label.removeprefix("fold "),
            "gmpatl.reused": str(not built[stage]).lower(),
            "gmpatl.resumed_at_epochs": ",".join(map(str, meta["resumed_at_epochs"])),
            "gmpatl.workers": " ".join(f"{w['rank']}:{w['device']}@{w['hostname']}" for w in workers),
        }
        child, logged = _open_run(tracker, f"{prefix}-{stage}", run, tags, resuming)
        if logged:
            continue
        section = getattr(config, stage).model_dump(mode="json")
        tracker.params(child, flatten({stage: section}) | {"fingerprint": artifacts[stage].path.name})
        tracker.history(child, histories[stage])
        timing = meta.get("timing", {})  # where the stage run's time went
        seconds = {f"seconds_{part}": v for part, v in timing.items() if not part.endswith("_at")}
        tracker.metrics(child, {"best_epoch": meta["best_epoch"], "steps": meta["steps"], **seconds})
        tracker.end(child)


def run_prefix(label: str) -> str:
    """``fold 1`` -> ``fold-1``; ``final`` -> ``final``: the stage runs' name prefix."""
    return label.replace(" ", "-")


def model_folder(config: Config, run: str) -> Path:
    """Where a run's model folder is kept: ``<output_dir>/models/<run id>``."""
    return Path(config.experiment.output_dir) / "models" / run


@dataclass
class FinalResult:
    run: str
    """The MLflow run (``gmpatl.kind=final``); ``offline-...`` while MLflow is unreachable."""
    best_val_uar: float
    model: Path | None
    """The local model folder (None with ``tracking.log_model: false``)."""
    registered: str | None
    """``NAME/VERSION`` in the model registry, once registered."""


def run_final(config: Config, manifest: pd.DataFrame, cache: ArtifactCache, tracker: Tracker) -> FinalResult:
    """``gmpatl train``: every stage on the whole corpus (validation carved out as in CV, for the best
    epoch), through the same stage cache and Ray Train path as a CV fold; one MLflow run with the model,
    registered as a new version of ``tracking.register_model`` when set. An interrupted run of the same
    config is resumed, as a CV's is."""
    config = resolve_devices(config)
    resolved = run_identity(config)
    run, resuming = _parent_run(tracker, f"final-{config.experiment.name}", resolved, {}, False, "final")
    reports = reports_folder(config, tracker, run)
    track_inputs(tracker, run, config, resolved, reports)
    try:
        split = final_split(config, manifest)
        tracker.metrics(run, {"train_utterances": len(split.train), "val_utterances": len(split.val)})
        with progress(f"final {config.experiment.name}", ["final"], step_weights(config)), task("final"):
            built, artifacts = train_stages(config, split, cache)
        best = artifacts["stage3"].meta["best_val_uar"]
        tracker.metrics(run, {"best_val_uar": best})
        _track_training(tracker, run, config, "final", built, artifacts, reports, resuming)
        registered = None
        if config.tracking.register_model:
            registered = tracker.register(run, "model", config.tracking.register_model)
    except BaseException:
        tracker.end(run, "FAILED")
        raise
    tracker.end(run)
    tracker.flush()
    model = model_folder(config, run) if config.tracking.log_model else None
    return FinalResult(tracker.ids.get(run, run), best, model, registered)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
