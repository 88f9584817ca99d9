"""Stage 1: multi-task fine-tuning of HuBERT for emotion, with gender as the auxiliary task.

HuBERT (last layer) -> BiLSTM -> masked mean pooling -> LinearP -> emotion head and gender head;
loss ``alpha_e * CE(emotion) + (1 - alpha_e) * CE(gender)``. The best epoch by validation UAR is kept.
Its HuBERT is what the GMPs are extracted from, so it is saved with ``save_pretrained``.

Readable top to bottom: the model, the recipe the shared training loop calls (``gmpatl_ray.training``), the
driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import Artifact, ArtifactCache, Contents, fingerprint
from ..config import Config, Stage1Config
from ..cv import FoldSplit
from ..evaluation import EvalLimits, emotion_scores
from ..features import backbone_identity
from ..models.backbone import backbone_layers, load_backbone
from ..models.heads import UtteranceEncoder
from ..training import (
    emotion_dataset,
    emotion_rows,
    fit,
    prepare_backbone,
    run_name,
    stage_artifact,
    stage_inputs,
)

KIND = "stage1"
dataset = emotion_dataset  # the recipe's dataset: labelled audio, cropped for training


class Stage1Model(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Stage1Config, num_emotions: int):
        super().__init__()
        self.backbone = backbone
        self.encoder = UtteranceEncoder(
            backbone.config.hidden_size, cfg.lstm_hidden, cfg.lstm_layers, cfg.proj_dim
        )
        self.emotion = nn.Linear(cfg.proj_dim, num_emotions)
        self.gender = nn.Linear(cfg.proj_dim, 2)

    def frames(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HuBERT's last layer (B, T, dim) and the frames of each item."""
        outputs, frames = backbone_layers(self.backbone, waves, lengths, [-1])
        return outputs[-1], frames

    def heads(self, hidden: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Emotion and gender logits of whole utterances' frames."""
        embedding = self.encoder(hidden, frames)
        return self.emotion(embedding), self.gender(embedding)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(*self.frames(waves, lengths))


def build_model(config: Config, loop: dict[str, Any] | None = None) -> Stage1Model:
    backbone = load_backbone(config.backbone, config.experiment.seed)
    prepare_backbone(backbone, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.experiment.seed)
        return Stage1Model(backbone, config.stage1, len(config.data.emotions))


def loss(model: nn.Module, batch: dict[str, Any], config: Config) -> torch.Tensor:
    emotion, gender = model(batch["waves"], batch["lengths"])
    alpha = config.stage1.alpha_e
    return alpha * F.cross_entropy(emotion, batch["emotion"]) + (1 - alpha) * F.cross_entropy(
        gender, batch["gender"]
    )


def evaluate(model: nn.Module, loop: dict[str, Any], config: Config) -> dict[str, float]:
    """Validation WAR and UAR of the emotion head; UAR picks the best epoch."""
    scores = emotion_scores(model, lambda h, n: model.heads(h, n)[0], loop["val"], EvalLimits.of(config))
    return {"score": scores["uar"], "uar": scores["uar"], "war": scores["war"]}


def finish(model: nn.Module, loop: dict[str, Any], config: Config, best: dict[str, Any]) -> dict[str, Any]:
    return {"best_val_uar": best["score"]}


def run_stage1(config: Config, split: FoldSplit, cache: ArtifactCache) -> tuple[Artifact, bool]:
    """The fold's stage-1 model (trained, or reused when the same inputs trained it before)."""
    emotions = config.data.emotions
    inputs = {
        "backbone": backbone_identity(config.backbone, config.experiment.seed),
        "stage1": config.stage1.model_dump(),
        **stage_inputs(config, split),
    }
    key = fingerprint(inputs)

    def build(folder: Path) -> Contents:
        loop = {
            "config": config.model_dump(mode="json"),
            "train": emotion_rows(split.train, emotions),
            "val": emotion_rows(split.val, emotions),
            "out": str(folder),
        }
        done = fit(__name__, "stage1", loop, config.train, name=run_name(KIND, key))
        return Contents({"inputs": inputs, **done.meta}, done.files)

    return stage_artifact(cache, KIND, key, config.train, build)
