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


def test_two_ddp_workers_with_bf16_and_checkpointing_report_once_per_epoch(ddp_stage1):
    """2 gloo workers share the batches; rank 0 alone validates and writes the checkpoint, so the history
    holds one entry per epoch, the result has the 1-worker run's shape, and Ray Train kept the latest
    checkpoint only (``train.checkpoints_to_keep``; the session fixture keeps the run folder)."""
    config, split, artifact, storage = ddp_stage1
    history = artifact.meta["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
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
    assert [h["steps"] for h in history] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    (run,) = storage.iterdir()
    assert len([c for c in run.glob("checkpoint_*") if c.is_dir()]) == 1
    assert HubertModel.from_pretrained(artifact.path / "backbone").config.hidden_size == 32
