"""One fold end to end on a real local Ray cluster: all three stages, test metrics, and the stage cache
(a change to stage 3's margin reruns stage 3 alone, and leaves no checkpoint behind); the calling process
never holds a model: training, validation, the kept model's files and the test scores are the Ray Train
workers' work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import DRIVER_WORK, TINY_TRAINING, model_work_here, small_config
from mlflow import MlflowClient

from gmpatl_ray.artifacts import ArtifactCache
from gmpatl_ray.pipeline import run_cv, run_fold
from gmpatl_ray.tracking import Tracker
from gmpatl_ray.training import saved_weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

MODEL_CODE = ("transformers.modeling_utils", "transformers.models.hubert.modeling_hubert", "sklearn")
"""Modules only a process that builds or scores a model needs; seconds to import."""


def test_a_driver_imports_no_model_code():
    """A driver (`gmpatl`, a submitted job, a Tune trial) runs the pipeline and the sweep but builds no
    model, so it does not pay for importing transformers' modelling code or scikit-learn: the Ray Train
    workers and Ray Data actors import them where the models are."""
    code = (
        "import sys, gmpatl_ray.cli, gmpatl_ray.pipeline, gmpatl_ray.sweep\n"
        f"print(sorted({{p for p in {MODEL_CODE!r} for m in sys.modules if m.startswith(p)}}))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", found.stdout


def test_a_fold_runs_all_stages_and_reuses_them(small_corpus, trained_fold, tmp_path):
    folder, manifest = small_corpus
    cache, first = trained_fold  # built from an empty cache, once for the session
    assert all(first.built.values()), first.built
    assert 0 <= first.uar <= 1 and 0 <= first.war <= 1
    assert first.test_utterances == (manifest["session"] == 1).sum()
    assert sum(map(sum, first.confusion)) == first.test_utterances

    config = small_config(folder, f"train.storage_path={tmp_path / 'ray'}", *TINY_TRAINING)
    margin = config.model_copy(update={"stage3": config.stage3.model_copy(update={"margin": 0.35})})
    with model_work_here() as work:  # what this (the driver's) process does of a model's work
        second = run_fold(margin, manifest, 1, ArtifactCache(cache))
    assert work == [] and DRIVER_WORK["trained_fold"] == [], (work, DRIVER_WORK)  # stage 3; all of a fold
    (worker,) = second.artifacts["stage3"].meta["workers"]
    assert worker["rank"] == 0 and worker["device"] == "cpu" and worker["cwd"] != os.getcwd()
    timing = second.artifacts["stage3"].meta["timing"]  # where the stage run's wall time went
    parts = {k: v for k, v in timing.items() if k != "wall" and not k.endswith("_at")}
    assert all(v >= -0.01 for v in parts.values()) and timing["training_loop"] > 0, timing
    assert sum(parts.values()) == pytest.approx(timing["wall"], abs=0.01)
    assert second.test_utterances == first.test_utterances and 0 <= second.uar <= 1
    assert second.built == {
        "stage1": False,
        "features": False,
        "gmps": False,
        "stage2": False,
        "stage3": True,
    }
    assert second.artifacts["stage1"].path == first.artifacts["stage1"].path
    # The stage 3 it trained is in the cache, so its Ray Train checkpoints are gone.
    assert (tmp_path / "ray").is_dir() and not any((tmp_path / "ray").iterdir())


def test_folds_run_side_by_side_give_what_they_give_one_after_another(small_corpus, tmp_path):
    """Two folds at once (`cv.max_concurrent_folds=2`, one 1-CPU worker per stage on the session's 2 CPUs)
    against the same CV one fold after another, each in a cache of its own: the same table, the same
    stage fingerprints and bit-for-bit the same weights, the same MLflow run tree; and the folds' stages
    did overlap in time. The one-after-another CV runs its stages in Ray Train's local mode (one process,
    no worker group to start), which trains bit for bit what one worker trains
    (``test_local_mode_trains_the_same_stage_as_one_worker``)."""
    folder, manifest = small_corpus
    quick = [
        *TINY_TRAINING,
        "train.cpus_per_worker=1",
        "stage2.enabled=false",  # stages 1 and 3 show it; stage 2 is one more stage of the same kind
        "stage1.optim.epochs=2",
        "stage3.optim.epochs=1",
    ]
    results = {}
    for width, workers in ((1, 0), (2, 1)):
        here = tmp_path / f"width{width}"
        config = small_config(
            folder,
            f"experiment.output_dir={here / 'out'}",
            f"experiment.cache_dir={here / 'cache'}",
            f"train.storage_path={here / 'ray'}",
            f"cv.max_concurrent_folds={width}",
            f"train.num_workers={workers}",
            *quick,
        )
        tracker = Tracker("folds", None, here / "out")
        table = run_cv(config, manifest, [1, 2], ArtifactCache(here / "cache"), tracker)
        client = MlflowClient(tracking_uri=tracker.uri)
        runs = client.search_runs([tracker.experiment_id])
        tree = sorted((r.info.run_name, r.info.status, r.data.tags.get("gmpatl.fold", "")) for r in runs)
        stages = {
            (fold, stage): ArtifactCache(here / "cache").load(stage, fingerprint)
            for r in runs
            if r.data.tags.get("gmpatl.kind") == "stage"
            for fold, stage, fingerprint in [
                (r.data.tags["gmpatl.fold"], r.data.tags["gmpatl.stage"], r.data.params["fingerprint"])
            ]
        }
        results[width] = (table, tree, stages)

    (sequential, tree_1, stages_1), (parallel, tree_2, stages_2) = results[1], results[2]
    columns = ["fold", "war", "uar", "val_uar", "test_utterances"]
    assert parallel[columns].equals(sequential[columns])
    assert tree_2 == tree_1 and len(tree_1) == 7  # cv, 2 folds, 2 stages each
    assert stages_2.keys() == stages_1.keys()
    for key, artifact in stages_1.items():
        assert stages_2[key].path.name == artifact.path.name, key  # the same fingerprint
        mine, theirs = saved_weights(stages_2[key].path), saved_weights(artifact.path)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), key
    one, two = (stages_2[(fold, "stage1")].meta["timing"] for fold in ("1", "2"))
    assert one["submitted_at"] < two["done_at"] and two["submitted_at"] < one["done_at"]  # side by side


def test_local_mode_trains_the_same_stage_as_one_worker(small_corpus, trained_fold, tmp_path):
    """`train.num_workers=0` (Ray Train's local mode: the training function in this process) gives bit
    for bit the stage 1 the session's trained fold got from one Ray Train worker, in a cache of its own."""
    from gmpatl_ray.cv import fold_split
    from gmpatl_ray.stages.stage1 import run_stage1

    folder, manifest = small_corpus
    _, first = trained_fold
    storage = f"train.storage_path={tmp_path / 'ray'}"
    config = small_config(folder, storage, *TINY_TRAINING, "train.num_workers=0")
    split, threads = fold_split(config, manifest, 1), torch.get_num_threads()
    torch.set_num_threads(1)  # not the 2 a worker of this config takes
    try:
        artifact, built = run_stage1(config, split, ArtifactCache(tmp_path / "cache"))
        assert torch.get_num_threads() == 1  # the caller's threads, as they were
    finally:
        torch.set_num_threads(threads)
    worker = first.artifacts["stage1"]
    assert built and artifact.path.name == worker.path.name  # the same fingerprint
    mine, theirs = saved_weights(artifact.path), saved_weights(worker.path)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    losses = [[row["train_loss"], row["val_uar"]] for row in artifact.meta["history"]]
    assert losses == [[row["train_loss"], row["val_uar"]] for row in worker.meta["history"]]
    assert artifact.meta["timing"]["start"] < 1.0  # no worker group to start
