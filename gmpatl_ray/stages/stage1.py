"""Stage 1: multi-task fine-tuning of HuBERT for emotion, with gender as the auxiliary task.

HuBERT (last layer) -> BiLSTM -> masked mean pooling -> LinearP -> emotion head and gender head;
loss ``alpha_e * CE(emotion) + (1 - alpha_e) * CE(gender)``. The best epoch by validation UAR is kept.
Its HuBERT is what the GMPs are extracted from, so it is saved with ``save_pretrained``.

Readable top to bottom: the model, the per-worker train function, the driver.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..artifacts import Artifact, ArtifactCache, fingerprint
from ..config import Config, Stage1Config
from ..cv import FoldSplit
from ..features import backbone_identity
from ..metrics import uar, war
from ..models.backbone import hubert_layers, load_backbone
from ..models.heads import UtteranceEncoder
from ..training import AudioDataset, collate, fit, load_state, save_state, unwrap

KIND = "stage1"


class Stage1Model(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Stage1Config, num_emotions: int):
        super().__init__()
        self.backbone = backbone
        self.encoder = UtteranceEncoder(
            backbone.config.hidden_size, cfg.lstm_hidden, cfg.lstm_layers, cfg.proj_dim
        )
        self.emotion = nn.Linear(cfg.proj_dim, num_emotions)
        self.gender = nn.Linear(cfg.proj_dim, 2)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, frames = hubert_layers(self.backbone, waves, lengths, [-1])
        embedding = self.encoder(outputs[-1], frames)
        return self.emotion(embedding), self.gender(embedding)


def build_model(config: Config) -> Stage1Model:
    backbone = load_backbone(config.backbone, config.experiment.seed)
    backbone.config.layerdrop = 0.0  # LayerDrop leaves parameters unused in a step, which DDP refuses
    if config.train.freeze_feature_encoder:
        backbone.feature_extractor._freeze_parameters()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.experiment.seed)
        return Stage1Model(backbone, config.stage1, len(config.data.emotions))


def rows(split: pd.DataFrame, emotions: list[str]) -> list[dict[str, Any]]:
    return [
        {"path": r.path, "emotion": emotions.index(r.emotion), "gender": "FM".index(r.gender)}
        for r in split.itertuples()
    ]


def evaluate(model: nn.Module, data: list[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """WAR and UAR of the emotion head over ``data`` (the whole set, on one worker)."""
    model.eval()
    truth, predicted = [], []
    loader = DataLoader(AudioDataset(data, None, 0), batch_size=batch_size, collate_fn=collate)
    with torch.no_grad():
        for batch in loader:
            emotion, _ = model(batch["waves"], batch["lengths"])
            truth += batch["emotion"].tolist()
            predicted += emotion.argmax(-1).tolist()
    return {"war": war(truth, predicted), "uar": uar(truth, predicted)}


def train_fn(loop: dict[str, Any]) -> None:
    """One Ray Train worker: resume from the last checkpoint if there is one, train, validate, report."""
    import ray.train
    import ray.train.torch

    config = Config.model_validate(loop["config"])
    torch.set_num_threads(config.train.cpus_per_worker)
    optim = config.stage1.optim
    model = build_model(config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=optim.lr)
    start, best, history = 0, {"uar": -1.0, "epoch": -1, "model": {}}, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_state(folder)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best, history = state["epoch"] + 1, state["best"], state["history"]
    model = ray.train.torch.prepare_model(model)
    dataset = AudioDataset(
        loop["train"], int(config.train.max_duration_s * config.data.sample_rate), config.experiment.seed
    )
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(
            dataset,
            batch_size=optim.batch_size,
            shuffle=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(config.experiment.seed),
        )
    )
    alpha = config.stage1.alpha_e
    rank = ray.train.get_context().get_world_rank()
    for epoch in range(start, optim.epochs):
        dataset.epoch = epoch
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        for batch in loader:
            emotion, gender = model(batch["waves"], batch["lengths"])
            loss = alpha * F.cross_entropy(emotion, batch["emotion"]) + (1 - alpha) * F.cross_entropy(
                gender, batch["gender"]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(batch["lengths"]), count + len(batch["lengths"])
        metrics = {"epoch": epoch, "train_loss": total / count}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                scores = evaluate(unwrap(model), loop["val"], optim.batch_size)
                metrics |= {"val_uar": scores["uar"], "val_war": scores["war"]}
                history.append(metrics)
                if scores["uar"] > best["uar"]:
                    best = {"uar": scores["uar"], "epoch": epoch, "model": unwrap(model).state_dict()}
                save_state(
                    Path(folder),
                    {
                        "model": unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "best": best,
                        "history": history,
                    },
                )
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
            )


def run_stage1(config: Config, split: FoldSplit, cache: ArtifactCache) -> tuple[Artifact, bool]:
    """The fold's stage-1 model (trained, or reused when the same inputs trained it before)."""
    emotions = config.data.emotions
    inputs = {
        "backbone": backbone_identity(config.backbone, config.experiment.seed),
        "stage1": config.stage1.model_dump(),
        "train": config.train.model_dump(
            exclude={"num_workers", "cpus_per_worker", "max_failures", "storage_path"}
        ),
        "data": {
            "emotions": emotions,
            "train": sorted(split.train["utt_id"]),
            "val": sorted(split.val["utt_id"]),
        },
        "seed": config.experiment.seed,
    }
    key = fingerprint(inputs)

    def build(folder: Path) -> dict[str, Any]:
        loop = {
            "config": config.model_dump(mode="json"),
            "train": rows(split.train, emotions),
            "val": rows(split.val, emotions),
        }
        result = fit(train_fn, loop, config.train, name=f"{KIND}-{key}")
        with result.checkpoint.as_directory() as checkpoint:
            state = load_state(checkpoint)
        model = build_model(config)
        model.load_state_dict(state["best"]["model"])
        model.backbone.save_pretrained(folder / "backbone")
        torch.save(
            {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")},
            folder / "heads.pt",
        )
        return {
            "inputs": inputs,
            "best_epoch": state["best"]["epoch"],
            "best_val_uar": state["best"]["uar"],
            "history": state["history"],
        }

    return cache.get_or_build(KIND, key, build)
