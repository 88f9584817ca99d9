"""A tiny randomly initialised WavLM (large layout: layer-normed CNN, normalised input), wav2vec 2.0 (base
layout: raw input) and data2vec-audio through one fold, every stage and the GMPs between them, in Ray
Train's local mode (HuBERT's fold is the session's ``trained_fold``): each stage keeps the family and the
input normalisation in the backbone it saves, and the packaged model predicts the fold's test utterances
as stage 3 scored them."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import small_config

from gmpatl_ray.artifacts import ArtifactCache
from gmpatl_ray.data.audio import load_audio
from gmpatl_ray.inference import EmotionPredictor, save_model_folder
from gmpatl_ray.metrics import war
from gmpatl_ray.models.backbone import NORMALIZE_ATTRIBUTE
from gmpatl_ray.pipeline import run_fold

FAMILIES = [("wavlm", True), ("wav2vec2", False), ("data2vec-audio", False)]
ONE_EPOCH = [
    "train.num_workers=0",  # local mode: what differs here is the model, not the worker group
    "train.max_failures=0",
    "train.val_fraction=0.25",
    "stage1.optim={lr: 3.0e-3, batch_size: 8, epochs: 1}",
    "stage2.optim={lr: 1.0e-3, batch_size: 8, epochs: 1}",
    "stage3.optim={lr: 3.0e-3, batch_size: 8, epochs: 1}",
    "stage1.lstm_hidden=16",
    "stage1.proj_dim=16",
    "stage2.proj_dim=16",
]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize(("family", "large"), FAMILIES, ids=[f for f, _ in FAMILIES])
def test_a_family_goes_through_every_stage_and_predicts(small_corpus, tmp_path, family, large):
    folder, manifest = small_corpus
    config = small_config(
        folder,
        f"experiment.cache_dir={tmp_path / 'cache'}",
        f"train.storage_path={tmp_path / 'ray'}",
        f"backbone.random_init.family={family}",
        f"backbone.random_init.large_layout={str(large).lower()}",
        *ONE_EPOCH,
    )
    fold = run_fold(config, manifest, 1, ArtifactCache(tmp_path / "cache"))
    assert all(fold.built.values()) and set(fold.built) == {"stage1", "features", "gmps", "stage2", "stage3"}
    normalizes = large or family == "data2vec-audio"
    for stage in ("stage1", "stage2", "stage3"):
        saved = json.loads((fold.artifacts[stage].path / "backbone" / "config.json").read_text())
        assert (saved["model_type"], saved[NORMALIZE_ATTRIBUTE]) == (family, normalizes), stage
    assert fold.artifacts["gmps"].meta["fit_frames"] > 0 and fold.artifacts["gmps"].meta["layer"] == -2

    model = save_model_folder(tmp_path / "model", fold.artifacts["stage3"].path, config)
    predictor = EmotionPredictor.from_model_folder(model)
    backbone = predictor.model.backbone.config
    assert (backbone.model_type, getattr(backbone, NORMALIZE_ATTRIBUTE)) == (family, normalizes)
    test = manifest[manifest["session"] == 1]
    probabilities = predictor.probabilities([load_audio(path) for path in test["path"]])
    predicted = pd.Series(probabilities.argmax(axis=1)).map(dict(enumerate(predictor.emotions)))
    assert (
        dict(zip(test["utt_id"], predicted, strict=True))
        == fold.artifacts["stage3"].meta["test"]["predictions"]
    )
    assert war(test["emotion"], predicted.to_numpy()) == fold.war
