"""Stage 2: retrain the stage-1 HuBERT to predict its own multi-scale GMPs under HuBERT-style masking.

Spans of CNN frames are replaced by the learned mask embedding; one LinearP head per scale predicts that
scale's GMP label for every frame of the last layer; the loss is cross-entropy over masked frames
(``stage2.masked_weight``) plus unmasked frames (``stage2.unmasked_weight``, 0 by default), summed over
scales; each term is a mean over the frames it covers on all DDP workers together. Training crops start
on a frame boundary, so labels stay aligned with the cropped audio's frames. The epoch with the lowest
validation loss is kept.

Readable top to bottom: the model, the dataset, the recipe the shared training loop calls, the driver.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from ..artifacts import Artifact, ArtifactCache, Contents, fingerprint
from ..config import BackboneConfig, Config, DataConfig
from ..cv import FoldSplit
from ..data.audio import load_audio
from ..evaluation import EvalLimits, batch_of, passes
from ..features import backbone_identity
from ..gmp import GMPStore
from ..models.backbone import backbone_layers, conv_geometry, frame_counts, load_backbone
from ..models.heads import FrameHeads
from ..models.masking import span_mask
from ..training import (
    fit,
    global_mean,
    prepare_backbone,
    run_name,
    stage_artifact,
    stage_inputs,
    training_crop,
    unwrap,
)

KIND = "stage2"


class Stage2Model(nn.Module):
    def __init__(self, backbone: nn.Module, proj_dim: int, scales: list[int]):
        super().__init__()
        self.backbone = backbone
        self.heads = FrameHeads(backbone.config.hidden_size, proj_dim, scales)

    def forward(
        self, waves: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        outputs, _ = backbone_layers(self.backbone, waves, lengths, [-1], mask=mask)
        return self.heads(outputs[-1])


class LabelledAudio(torch.utils.data.Dataset):
    """(waveform, {"k64": labels, ...}); a training crop starts on a frame so its labels are a slice."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        gmp_dir: str,
        backbone_dir: str,
        max_samples: int | None,
        seed: int,
        data: DataConfig,
    ):
        store = GMPStore.open(gmp_dir)
        wanted = {r["utt_id"] for r in rows}
        self.labels = {u: labels for u, labels in store.iter_labels() if u in wanted}
        missing = wanted - set(self.labels)
        if missing:
            raise KeyError(
                f"{len(missing)} utterances have no GMP labels in {gmp_dir}, e.g. {sorted(missing)[:3]}"
            )
        self.stride, self.receptive_field = conv_geometry(AutoConfig.from_pretrained(backbone_dir))
        self.rows, self.max_samples, self.seed, self.epoch = rows, max_samples, seed, 0
        self.sample_rate, self.resample = data.sample_rate, data.resample

    def __len__(self) -> int:
        return len(self.rows)

    def frames(self, samples: int) -> int:
        return max(0, (samples - self.receptive_field) // self.stride + 1)

    def checked_labels(self, row: dict[str, Any], samples: int) -> dict[int, np.ndarray]:
        """The row's labels, refused unless there is one per frame of its ``samples``-long audio."""
        labels = self.labels[row["utt_id"]]
        if any(len(v) != self.frames(samples) for v in labels.values()):
            raise ValueError(f"{row['path']}: GMP labels do not match its {self.frames(samples)} frames")
        return labels

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        row = self.rows[i]
        wave = load_audio(row["path"], self.sample_rate, self.resample)
        labels = self.checked_labels(row, len(wave))
        start = 0
        if self.max_samples and len(wave) > self.max_samples:
            steps = (len(wave) - self.max_samples) // self.stride + 1
            start = int(np.random.default_rng([self.seed, self.epoch, i]).integers(steps)) * self.stride
            wave = wave[start : start + self.max_samples]
        first, n = start // self.stride, self.frames(len(wave))
        return wave, {f"k{k}": v[first : first + n] for k, v in labels.items()}


def build_model(config: Config, loop: dict[str, Any]) -> Stage2Model:
    backbone = load_backbone(BackboneConfig(pretrained=loop["backbone_dir"]))
    prepare_backbone(backbone, config, masking=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.experiment.seed)
        return Stage2Model(backbone, config.stage2.proj_dim, config.gmp.scales)


def dataset(config: Config, loop: dict[str, Any], data: list[dict[str, Any]], train: bool) -> LabelledAudio:
    crop = training_crop(config) if train else None
    return LabelledAudio(
        data, loop["gmp_dir"], loop["backbone_dir"], crop, config.experiment.seed, config.data
    )


def loss_terms(
    model: nn.Module, batch: dict[str, Any], config: Config, mask: torch.Tensor
) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """(weight, summed cross-entropy, frames) per scale for the masked and the unmasked frames (those with a
    weight) under the span ``mask`` (B, frames); padding (label -100) counts nowhere."""
    s2 = config.stage2
    logits = model(batch["waves"], batch["lengths"], mask)
    terms = []
    for k, scale_logits in logits.items():
        labels = batch[f"k{k}"]
        for weight, where in ((s2.masked_weight, mask), (s2.unmasked_weight, ~mask)):
            if weight > 0:
                where = where & (labels != -100)
                summed = F.cross_entropy(scale_logits[where], labels[where], reduction="sum")
                terms.append((weight, summed, where.sum()))
    return terms


def loss(model: nn.Module, batch: dict[str, Any], config: Config, seed: int | None = None) -> torch.Tensor:
    """The weighted sum of the terms, each a mean over its frames on all DDP workers together (a worker
    with more masked frames weighs more). Masks come from torch's generator unless ``seed`` is given."""
    seed = int(torch.randint(2**31 - 1, (1,))) if seed is None else seed
    frames = frame_counts(unwrap(model).backbone, batch["lengths"])
    s2 = config.stage2
    mask = span_mask(frames, int(frames.max()), s2.mask_prob, s2.mask_length, seed).to(frames.device)
    terms = loss_terms(model, batch, config, mask)
    return sum(weight * global_mean(summed, count) for weight, summed, count in terms)


def validation_batches(
    loop: dict[str, Any], config: Config, data: LabelledAudio, device: torch.device
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """The validation utterances in bounded passes (:mod:`gmpatl_ray.evaluation`), each a batch with its
    pieces' slices of their GMP labels and a span mask drawn per piece, seeded by its utterance and first
    frame: the same frames are masked however the pieces are grouped (``train.eval_batch_s``)."""
    s2 = config.stage2
    for pieces in passes(loop["val"], EvalLimits.of(config), data.stride, data.receptive_field):
        labels, masks = [], []
        for piece in pieces:
            row = loop["val"][piece.row]
            whole = data.checked_labels(row, piece.utterance_samples)
            frames = data.frames(len(piece.wave))
            labels.append(
                {f"k{k}": v[piece.first_frame : piece.first_frame + frames] for k, v in whole.items()}
            )
            seed = zlib.crc32(f"{row['utt_id']}/{piece.first_frame}".encode())
            masks.append(span_mask(torch.tensor([frames]), frames, s2.mask_prob, s2.mask_length, seed)[0])
        batch = batch_of(pieces, labels, device)
        mask = torch.nn.utils.rnn.pad_sequence(masks, batch_first=True)  # False over the padding
        yield batch, mask.to(device)


def evaluate(model: nn.Module, loop: dict[str, Any], config: Config) -> dict[str, float]:
    """The loss over every frame of the validation utterances, with fixed masks, in passes bounded like
    every evaluation; lower is better, so the score is its negative."""
    model.eval()
    data = dataset(config, loop, loop["val"], train=False)
    totals: list[list[float]] = []  # per term: weight, summed loss, frames
    with torch.no_grad():
        for batch, mask in validation_batches(loop, config, data, next(model.parameters()).device):
            terms = loss_terms(model, batch, config, mask)
            if not totals:
                totals = [[weight, 0.0, 0.0] for weight, _, _ in terms]
            for total, (_, summed, count) in zip(totals, terms, strict=True):
                total[1] += summed.item()
                total[2] += count.item()
    value = sum(weight * summed / max(count, 1) for weight, summed, count in totals)
    return {"score": -value, "loss": value}


def finish(model: nn.Module, loop: dict[str, Any], config: Config, best: dict[str, Any]) -> dict[str, Any]:
    return {}  # the validation loss of the kept epoch is in the history


def frame_rows(split: pd.DataFrame) -> list[dict[str, Any]]:
    """Manifest rows as stage 2 trains on them: its GMP labels are found by ``utt_id``."""
    return [
        {"path": r.path, "utt_id": r.utt_id, "duration_s": float(r.duration_s)} for r in split.itertuples()
    ]


def run_stage2(
    config: Config, split: FoldSplit, stage1_dir: Path, gmps: GMPStore, cache: ArtifactCache
) -> tuple[Artifact, bool]:
    """Retrain the stage-1 HuBERT in ``stage1_dir`` on the fold's GMPs; the artifact holds the new HuBERT."""
    train = pd.concat([split.train, split.test]) if config.gmp.transductive else split.train
    inputs = {
        "backbone": backbone_identity(BackboneConfig(pretrained=str(stage1_dir)), 0),
        "gmps": gmps.path.name,
        "stage2": config.stage2.model_dump(),
        **stage_inputs(config, split),
        "unlabelled": sorted(split.test["utt_id"]) if config.gmp.transductive else [],
    }
    key = fingerprint(inputs)

    def build(folder: Path) -> Contents:
        loop = {
            "config": config.model_dump(mode="json"),
            "backbone_dir": str(stage1_dir),
            "gmp_dir": str(gmps.path),
            "train": frame_rows(train),
            "val": frame_rows(split.val),
            "out": str(folder),
        }
        done = fit(__name__, "stage2", loop, config.train, name=run_name(KIND, key))
        return Contents({"inputs": inputs, **done.meta}, done.files)

    return stage_artifact(cache, KIND, key, config.train, build)
