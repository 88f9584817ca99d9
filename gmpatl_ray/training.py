"""What every stage shares on Ray Train: the audio dataset and its padded batches, the trainer built from
``config.train``, checkpoints that load without unpickling code, and the evaluation loop.

A stage is a train function (run on every worker) plus a driver call to :func:`fit`; the run name is the
stage's fingerprint, so rerunning a stage that was interrupted resumes it from its last checkpoint
(Ray Train V2: same ``storage_path`` and ``name``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import TrainConfig
from .data.audio import load_audio

CHECKPOINT_FILE = "state.pt"


class AudioDataset(Dataset):
    """Manifest rows -> (waveform, row); training crops long utterances to a seeded random window."""

    def __init__(self, rows: list[dict[str, Any]], max_samples: int | None, seed: int):
        self.rows = rows
        self.max_samples = max_samples
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, Any]]:
        wave = load_audio(self.rows[i]["path"])
        if self.max_samples and len(wave) > self.max_samples:
            start = np.random.default_rng([self.seed, self.epoch, i]).integers(len(wave) - self.max_samples)
            wave = wave[start : start + self.max_samples]
        return wave, self.rows[i]


def collate(items: list[tuple[np.ndarray, dict[str, Any]]]) -> dict[str, Any]:
    """Zero-padded waveforms, their lengths, and each row field as a list (or tensor when numeric)."""
    lengths = torch.tensor([len(w) for w, _ in items])
    waves = torch.zeros(len(items), int(lengths.max()))
    for i, (wave, _) in enumerate(items):
        waves[i, : len(wave)] = torch.from_numpy(wave)
    batch: dict[str, Any] = {"waves": waves, "lengths": lengths}
    for key in items[0][1]:
        values = [row[key] for _, row in items]
        batch[key] = torch.tensor(values) if isinstance(values[0], int) else values
    return batch


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Tensors, numbers and strings only, so :func:`load_state` can use ``weights_only=True``."""
    torch.save(state, folder / CHECKPOINT_FILE)


def load_state(folder: str | Path) -> dict[str, Any]:
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP's wrapper (what checkpoints hold)."""
    return model.module if hasattr(model, "module") else model


def fit(train_fn: Callable[[dict], Any], loop_config: dict[str, Any], train: TrainConfig, name: str):
    """Run ``train_fn`` on ``train.num_workers`` workers under the run name ``name``; returns the Result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(train.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
    )
    return trainer.fit()
