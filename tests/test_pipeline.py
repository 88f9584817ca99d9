"""One fold end to end on a real local Ray cluster: all three stages, test metrics, and the stage cache
(a change to stage 3's margin reruns stage 3 alone, and leaves no checkpoint behind); the calling process
never holds a model: training, validation, the kept model's files and the test scores are the Ray Train
workers' work."""

from __future__ import annotations

import os

import pytest
from conftest import DRIVER_WORK, TINY_TRAINING, model_work_here, small_config

from gmpatl_ray.artifacts import ArtifactCache
from gmpatl_ray.pipeline import run_fold

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


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
    parts = {k: v for k, v in timing.items() if k != "wall"}
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
