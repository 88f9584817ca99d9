"""Stage 3: fine-tune a HuBERT (the stage-2 one in GMP-ATL) for utterance emotion with AM-Softmax.

HuBERT (last layer) -> BiLSTM -> masked mean pooling -> LinearP -> AM-Softmax (s, m), or a plain linear
classifier with cross-entropy (``stage3.loss: ce``, the paper's Table 3 ablation). The best epoch by
validation UAR is kept and scored once on the fold's test utterances, inside the Ray Train run (rank 0, on
its device).

Readable top to bottom: the model, the recipe the shared training loop calls, the driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import Artifact, ArtifactCache, Contents, fingerprint
from ..config import BackboneConfig, Config
from ..cv import FoldSplit
from ..evaluation import EvalLimits, emotion_scores
from ..features import backbone_identity
from ..metrics import confusion
from ..models.backbone import backbone_layers, load_backbone
from ..models.heads import UtteranceEncoder
from ..models.losses import AMSoftmax
from ..training import (
    emotion_dataset,
    emotion_rows,
    fit,
    prepare_backbone,
    run_name,
    stage_artifact,
    stage_inputs,
)

KIND = "stage3"
dataset = emotion_dataset  # the recipe's dataset: labelled audio, cropped for training


class Stage3Model(nn.Module):
    def __init__(self, backbone: nn.Module, config: Config):
        super().__init__()
        s1, s3 = config.stage1, config.stage3
        self.backbone = backbone
        self.encoder = UtteranceEncoder(
            backbone.config.hidden_size, s1.lstm_hidden, s1.lstm_layers, s1.proj_dim
        )
        num_classes = len(config.data.emotions)
        self.amsoftmax = s3.loss == "amsoftmax"
        self.classifier = (
            AMSoftmax(s1.proj_dim, num_classes, s3.scale, s3.margin)
            if self.amsoftmax
            else nn.Linear(s1.proj_dim, num_classes)
        )

    def frames(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HuBERT's last layer (B, T, dim) and the frames of each item."""
        outputs, frames = backbone_layers(self.backbone, waves, lengths, [-1])
        return outputs[-1], frames

    def heads(self, hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Emotion logits of whole utterances' frames (scaled cosines for AM-Softmax, no margin)."""
        embedding = self.encoder(hidden, frames)
        return self.classifier.logits(embedding) if self.amsoftmax else self.classifier(embedding)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.heads(*self.frames(waves, lengths))


def build_model(config: Config, loop: dict[str, Any]) -> Stage3Model:
    backbone = load_backbone(BackboneConfig(pretrained=loop["backbone_dir"]))
    prepare_backbone(backbone, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.experiment.seed)
        return Stage3Model(backbone, config)


def loss(model: nn.Module, batch: dict[str, Any], config: Config) -> torch.Tensor:
    """AM-Softmax: the target's scaled cosine lowered by ``s * m`` (through the DDP-wrapped forward, so
    gradients synchronise); or plain cross-entropy."""
    logits = model(batch["waves"], batch["lengths"])
    if config.stage3.loss == "amsoftmax":
        target = F.one_hot(batch["emotion"], logits.shape[-1]).to(logits.dtype)
        logits = logits - config.stage3.scale * config.stage3.margin * target
    return F.cross_entropy(logits, batch["emotion"])


def evaluate(model: nn.Module, loop: dict[str, Any], config: Config) -> dict[str, float]:
    scores = emotion_scores(model, model.heads, loop["val"], EvalLimits.of(config))
    return {"score": scores["uar"], "uar": scores["uar"], "war": scores["war"]}


def finish(model: nn.Module, loop: dict[str, Any], config: Config, best: dict[str, Any]) -> dict[str, Any]:
    """The kept model scored once on the fold's test utterances, on this worker's device, with each
    utterance's prediction (a final model, trained on every fold, has no test utterances)."""
    if not loop["test"]:
        return {"best_val_uar": best["score"], "test": None}
    emotions = config.data.emotions
    test = emotion_scores(model, model.heads, loop["test"], EvalLimits.of(config))
    truth = [emotions[i] for i in test["truth"]]
    predicted = [emotions[i] for i in test["predicted"]]
    return {
        "best_val_uar": best["score"],
        "test": {
            "war": test["war"],
            "uar": test["uar"],
            "confusion": confusion(truth, predicted, emotions).tolist(),
            "utterances": len(truth),
            "predictions": {row["utt_id"]: label for row, label in zip(loop["test"], predicted, strict=True)},
        },
    }


def run_stage3(
    config: Config, split: FoldSplit, backbone_dir: Path, cache: ArtifactCache
) -> tuple[Artifact, bool]:
    """Fine-tune the HuBERT in ``backbone_dir`` on the fold; the artifact's meta holds the test scores."""
    emotions = config.data.emotions
    inputs = {
        "backbone": backbone_identity(BackboneConfig(pretrained=str(backbone_dir)), 0),
        "stage1_head": config.stage1.model_dump(exclude={"optim", "alpha_e"}),
        "stage3": config.stage3.model_dump(),
        **stage_inputs(config, split),
        "test": sorted(split.test["utt_id"]),
    }
    key = fingerprint(inputs)

    def build(folder: Path) -> Contents:
        loop = {
            "config": config.model_dump(mode="json"),
            "backbone_dir": str(backbone_dir),
            "train": emotion_rows(split.train, emotions),
            "val": emotion_rows(split.val, emotions),
            "test": emotion_rows(split.test, emotions),
            "out": str(folder),
        }
        done = fit(__name__, "stage3", loop, config.train, name=run_name(KIND, key))
        return Contents({"inputs": inputs, **done.meta}, done.files)

    return stage_artifact(cache, KIND, key, config.train, build)
