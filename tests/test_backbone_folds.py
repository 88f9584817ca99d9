"""Every family through one fold, every stage and the GMPs between them, in Ray Train's local mode
(HuBERT's fold is the session's ``trained_fold``): a tiny randomly initialised WavLM (large layout, so a
normalised waveform), and tiny wav2vec 2.0 (base layout) and data2vec-audio checkpoints whose
preprocessor_config.json says the opposite of their layout's convention. Each stage keeps the family and
the input normalisation in the backbone it saves, and the packaged model predicts the fold's test
utterances as stage 3 scored them, and otherwise with the other normalisation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_SIZE, small_config

from gmpatl_ray.artifacts import ArtifactCache
from gmpatl_ray.config import BackboneSize
from gmpatl_ray.data.audio import load_audio
from gmpatl_ray.inference import EmotionPredictor, save_model_folder
from gmpatl_ray.metrics import war
from gmpatl_ray.models.backbone import NORMALIZE_ATTRIBUTE, random_backbone
from gmpatl_ray.pipeline import run_fold

FAMILIES = [
    ("wavlm", True, None),  # randomly initialised: normalised, as its layout says
    ("wav2vec2", False, True),  # a checkpoint folder whose feature extractor normalises (base layout: raw)
    ("data2vec-audio", False, False),  # and one whose feature extractor does not (its layout: normalised)
]
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


def backbone(tmp_path, family: str, large: bool, do_normalize: bool | None) -> list[str]:
    """The config lines of the fold's backbone: random, or a checkpoint folder with a feature extractor."""
    if do_normalize is None:
        return [
            f"backbone.random_init.family={family}",
            f"backbone.random_init.large_layout={str(large).lower()}",
        ]
    folder = tmp_path / family
    model = random_backbone(BackboneSize(family=family, large_layout=large, **TINY_SIZE))
    delattr(model.config, NORMALIZE_ATTRIBUTE)  # as a checkpoint from elsewhere: no choice saved with it
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": do_normalize}))
    return [f"backbone.pretrained={folder}", "backbone.random_init=null"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize(("family", "large", "do_normalize"), FAMILIES, ids=[f for f, *_ in FAMILIES])
def test_a_family_goes_through_every_stage_and_predicts(small_corpus, tmp_path, family, large, do_normalize):
    folder, manifest = small_corpus
    config = small_config(
        folder,
        f"experiment.cache_dir={tmp_path / 'cache'}",
        f"train.storage_path={tmp_path / 'ray'}",
        *backbone(tmp_path, family, large, do_normalize),
        *ONE_EPOCH,
    )
    fold = run_fold(config, manifest, 1, ArtifactCache(tmp_path / "cache"))
    assert all(fold.built.values()) and set(fold.built) == {"stage1", "features", "gmps", "stage2", "stage3"}
    normalizes = large if do_normalize is None else do_normalize
    for stage in ("stage1", "stage2", "stage3"):
        saved = json.loads((fold.artifacts[stage].path / "backbone" / "config.json").read_text())
        assert (saved["model_type"], saved[NORMALIZE_ATTRIBUTE]) == (family, normalizes), stage
    assert fold.artifacts["gmps"].meta["fit_frames"] > 0 and fold.artifacts["gmps"].meta["layer"] == -2

    model = save_model_folder(tmp_path / "model", fold.artifacts["stage3"].path, config)
    predictor = EmotionPredictor.from_model_folder(model)
    settings = predictor.model.backbone.config
    assert (settings.model_type, getattr(settings, NORMALIZE_ATTRIBUTE)) == (family, normalizes)
    test = manifest[manifest["session"] == 1]
    waves = [load_audio(path) for path in test["path"]]
    probabilities = predictor.probabilities(waves)
    predicted = pd.Series(probabilities.argmax(axis=1)).map(dict(enumerate(predictor.emotions)))
    scored = fold.artifacts["stage3"].meta["test"]["predictions"]
    assert dict(zip(test["utt_id"], predicted, strict=True)) == scored
    assert war(test["emotion"], predicted.to_numpy()) == fold.war
    setattr(settings, NORMALIZE_ATTRIBUTE, not normalizes)  # the flag is what decides: flipped, it differs
    assert not np.allclose(predictor.probabilities(waves), probabilities, atol=1e-4)
