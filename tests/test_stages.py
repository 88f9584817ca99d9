"""Stages 2 and 3 learn: their recipes' losses fall when they fit a tiny fixed batch (stage 1's is tested
through Ray Train in test_stage1.py). In process, with the recipes' own models, losses and the saved-HuBERT
loading path they use in the pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config

from gmpatl_ray.models.backbone import frame_counts, load_backbone
from gmpatl_ray.stages import stage2, stage3


def fit_steps(model, loss_of_batch, steps: int = 40) -> list[float]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = loss_of_batch()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def saved_backbone(config, folder):
    load_backbone(config.backbone, config.experiment.seed).save_pretrained(folder)
    return str(folder)


def tiny_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "waves": torch.randn(4, 8000, generator=generator),
        "lengths": torch.tensor([8000, 7000, 6000, 5000]),
        "emotion": torch.tensor([0, 1, 2, 3]),
    }


def test_stage2_masked_prediction_loss_falls(tmp_path):
    config = small_config(tmp_path, "stage2.proj_dim=16", "gmp.scales=[4, 8]")
    model = stage2.build_model(config, {"backbone_dir": saved_backbone(config, tmp_path / "hubert")}).train()
    batch = tiny_batch()
    frames = frame_counts(model.backbone, batch["lengths"])
    generator = torch.Generator().manual_seed(1)
    for k in (4, 8):
        labels = torch.randint(k, (4, int(frames.max())), generator=generator)
        labels[torch.arange(labels.shape[1])[None, :] >= frames[:, None]] = -100  # padding
        batch[f"k{k}"] = labels
    losses = fit_steps(model, lambda: stage2.loss(model, batch, config, seed=0))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("loss", ["amsoftmax", "ce"])
def test_stage3_loss_falls(tmp_path, loss):
    config = small_config(tmp_path, "stage1.lstm_hidden=16", "stage1.proj_dim=16", f"stage3.loss={loss}")
    backbone = saved_backbone(config, tmp_path / "hubert")
    model = stage3.build_model(config, {"backbone_dir": backbone}).train()
    batch = tiny_batch()
    losses = fit_steps(model, lambda: stage3.loss(model, batch, config))
    assert losses[-1] < 0.5 * losses[0], losses
