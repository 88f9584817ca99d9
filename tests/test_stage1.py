"""Stage 1 on a real local Ray cluster (Ray Train V2, gloo): it keeps the best epoch, saves a HuBERT that
transformers loads, a rerun reuses it, and 2 DDP workers report once per epoch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_TRAINING, small_config
from transformers import HubertModel

from gmpatl_ray.artifacts import ArtifactCache
from gmpatl_ray.cv import fold_split
from gmpatl_ray.stages.stage1 import run_stage1

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


STAGE1 = [
    "train.max_failures=0",
    "train.val_fraction=0.25",
    "stage1.optim={lr: 3.0e-3, batch_size: 8, epochs: 4}",
    "stage1.lstm_hidden=16",
    "stage1.proj_dim=16",
]


def test_stage1_keeps_the_best_epoch_saves_a_loadable_hubert_and_is_reused(small_corpus, trained_fold):
    """The session's trained fold ran stage 1 (1 worker); its artifact, and a rerun that reuses it.
    (That each stage's loss falls on a tiny set: tests/test_stages.py.)"""
    folder, manifest = small_corpus
    cache, fold = trained_fold
    artifact = fold.artifacts["stage1"]
    history = artifact.meta["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert artifact.meta["best_val_uar"] == max(h["val_uar"] for h in history)
    assert artifact.meta["best_epoch"] == max(history, key=lambda h: h["val_uar"])["epoch"]
    backbone = HubertModel.from_pretrained(artifact.path / "backbone")
    assert backbone.config.hidden_size == 32
    assert any(
        k.startswith("encoder.lstm") for k in torch.load(artifact.path / "heads.pt", weights_only=True)
    )

    config = small_config(folder, *TINY_TRAINING)
    split = fold_split(config, manifest, 1)
    again, built = run_stage1(config, split, ArtifactCache(cache))
    assert not built and again.path == artifact.path


def test_two_ddp_workers_with_bf16_and_checkpointing_report_once_per_epoch(small_corpus, tmp_path):
    """2 gloo workers share the batches; rank 0 alone validates and writes the checkpoint, so the history
    and the run folder hold one entry per epoch, and the result has the 1-worker run's shape."""
    folder, manifest = small_corpus
    config = small_config(
        folder,
        f"train.storage_path={tmp_path / 'ray'}",
        *STAGE1,
        "stage1.optim={lr: 3.0e-3, batch_size: 4, epochs: 2}",
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.precision=bf16",
        "train.gradient_checkpointing=true",
        "train.keep_run_folders=true",  # to count its checkpoints: Ray Train keeps the latest only
    )
    split = fold_split(config, manifest, 2)
    artifact, built = run_stage1(config, split, ArtifactCache(tmp_path / "cache"))
    assert built
    history = artifact.meta["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert set(history[0]) == {
        "epoch",
        "train_loss",
        "steps",
        "train_seconds",
        "train_utterances_per_s",
        "val_score",
        "val_uar",
        "val_war",
    }
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    per_epoch = math.ceil(math.ceil(len(split.train) / 2) / 2)  # each worker's share, batches of 4 / 2
    assert [h["steps"] for h in history] == [per_epoch, 2 * per_epoch]
    (run,) = (tmp_path / "ray").iterdir()
    assert len([c for c in run.glob("checkpoint_*") if c.is_dir()]) == 1
    assert HubertModel.from_pretrained(artifact.path / "backbone").config.hidden_size == 32
