"""One fold end to end on a real local Ray cluster: all three stages, test metrics, and the stage cache
(a change to stage 3's margin reruns stage 3 alone, and leaves no checkpoint behind); the calling process
never holds a model: training, validation, the kept model's files and the test scores are the Ray Train
workers' work."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from conftest import TINY_TRAINING, small_config

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
    built_here, loaded_here = [], []
    hubert_init, torch_load = transformers.HubertModel.__init__, torch.load

    def counted_init(self, *args, **kwargs):
        built_here.append(type(self).__name__)
        hubert_init(self, *args, **kwargs)

    def counted_load(*args, **kwargs):
        loaded_here.append(args[0] if args else kwargs)
        return torch_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # counts what this (the driver's) process does
        patch.setattr(transformers.HubertModel, "__init__", counted_init)
        patch.setattr(torch, "load", counted_load)
        second = run_fold(margin, manifest, 1, ArtifactCache(cache))
    assert built_here == [] and loaded_here == [], (built_here, loaded_here)
    (worker,) = second.artifacts["stage3"].meta["workers"]
    assert worker["rank"] == 0 and worker["device"] == "cpu" and worker["cwd"] != os.getcwd()
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
