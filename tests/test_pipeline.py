"""One fold end to end on a real local Ray cluster: all three stages, test metrics, and the stage cache
(a change to stage 3's margin reruns stage 3 alone)."""

from __future__ import annotations

import pytest
from conftest import small_config

from gmpatl_ray.artifacts import ArtifactCache
from gmpatl_ray.pipeline import run_fold

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

TINY_TRAINING = [
    "train.max_failures=0",
    "train.val_fraction=0.25",
    "stage1.optim={lr: 3.0e-3, batch_size: 8, epochs: 2}",
    "stage2.optim={lr: 1.0e-3, batch_size: 8, epochs: 1}",
    "stage3.optim={lr: 3.0e-3, batch_size: 8, epochs: 2}",
    "stage1.lstm_hidden=16",
    "stage1.proj_dim=16",
    "stage2.proj_dim=16",
]


def test_a_fold_runs_all_stages_and_reuses_them(small_corpus, tmp_path):
    folder, manifest = small_corpus
    config = small_config(folder, f"train.storage_path={tmp_path / 'ray'}", *TINY_TRAINING)
    cache = ArtifactCache(tmp_path / "cache")
    first = run_fold(config, manifest, 1, cache)
    assert all(first.built.values()), first.built
    assert 0 <= first.uar <= 1 and 0 <= first.war <= 1
    assert first.test_utterances == (manifest["session"] == 1).sum()
    assert sum(map(sum, first.confusion)) == first.test_utterances

    margin = config.model_copy(update={"stage3": config.stage3.model_copy(update={"margin": 0.35})})
    second = run_fold(margin, manifest, 1, cache)
    assert second.built == {
        "stage1": False,
        "features": False,
        "gmps": False,
        "stage2": False,
        "stage3": True,
    }
