"""Validation and test passes whose memory no single file decides.

Utterances are taken longest first and grouped so that one forward pass holds at most ``train.eval_batch_s``
seconds of padded audio (grouping by length also keeps the padding small). An utterance longer than
``train.eval_max_duration_s`` is cut into frame-exact chunks (:func:`gmpatl_ray.features.chunk_bounds`)
that run as forward passes of their own; its frames are joined again before anything that looks at the
whole utterance (the BiLSTM and the pooling), so it is still scored as one utterance. A shorter utterance
gets the frames of a lone forward pass (to float rounding): the backbone's batched forward ignores padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import Config
from .data.audio import load_audio
from .features import chunk_bounds
from .metrics import uar, war
from .models.backbone import conv_geometry
from .training import collate


@dataclass(frozen=True)
class EvalLimits:
    """How evaluation reads audio and how much of it one forward pass may hold, in samples."""

    sample_rate: int
    resample: bool
    batch_samples: int
    chunk_samples: int

    @classmethod
    def of(cls, config: Config) -> EvalLimits:
        rate = config.data.sample_rate
        return cls(
            sample_rate=rate,
            resample=config.data.resample,
            batch_samples=int(config.train.eval_batch_s * rate),
            chunk_samples=int(config.train.eval_max_duration_s * rate),
        )


@dataclass(frozen=True)
class Piece:
    """One waveform of a forward pass: a whole utterance, or one chunk of a long one."""

    row: int
    wave: np.ndarray
    utterance_samples: int
    """The whole utterance's length."""
    first_frame: int
    """Where this piece's frames start in the utterance's frame sequence."""
    last: bool
    """The utterance's last piece: its frames are complete after this pass."""


def groups(durations_s: list[float], limits: EvalLimits) -> list[list[int]]:
    """Row indices per forward pass, longest first, each pass at most ``batch_samples`` of padded audio;
    an utterance longer than ``chunk_samples`` is a group of its own (it is chunked)."""
    order = sorted(range(len(durations_s)), key=lambda i: (-durations_s[i], i))
    found: list[list[int]] = []
    current: list[int] = []
    for i in order:
        samples = durations_s[i] * limits.sample_rate
        if samples > limits.chunk_samples:
            found.append([i])
            continue
        # Longest first, so the group's first utterance sets its padded length.
        if (
            current
            and (len(current) + 1) * durations_s[current[0]] * limits.sample_rate > limits.batch_samples
        ):
            found.append(current)
            current = []
        current.append(i)
    return found + ([current] if current else [])


def passes(
    rows: list[dict[str, Any]], limits: EvalLimits, stride: int, receptive_field: int
) -> Iterator[list[Piece]]:
    """The forward passes over ``rows`` (each with ``duration_s`` and either its file, ``path``, read as
    needed, or its waveform at ``limits.sample_rate`` already decoded, ``wave``)."""
    per_pass = max(1, limits.batch_samples // limits.chunk_samples)
    for group in groups([r["duration_s"] for r in rows], limits):
        waves = [_wave(rows[i], limits) for i in group]
        if len(group) > 1 or len(waves[0]) <= limits.chunk_samples:
            yield [Piece(i, wave, len(wave), 0, True) for i, wave in zip(group, waves, strict=True)]
            continue
        wave = waves[0]
        bounds = chunk_bounds(len(wave), limits.chunk_samples, stride, receptive_field)
        pieces = [
            Piece(group[0], wave[a:b], len(wave), a // stride, j == len(bounds) - 1)
            for j, (a, b) in enumerate(bounds)
        ]
        for start in range(0, len(pieces), per_pass):
            yield pieces[start : start + per_pass]


def _wave(row: dict[str, Any], limits: EvalLimits) -> np.ndarray:
    if "wave" in row:
        return row["wave"]
    return load_audio(row["path"], limits.sample_rate, limits.resample)


def batch_of(pieces: list[Piece], fields: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """A pass as a padded batch (:func:`gmpatl_ray.training.collate`) on ``device``, with one dict of
    per-piece ``fields`` (frame labels) per piece."""
    batch = collate([(piece.wave, extra) for piece, extra in zip(pieces, fields, strict=True)])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def utterance_frames(
    encode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    rows: list[dict[str, Any]],
    limits: EvalLimits,
    stride: int,
    receptive_field: int,
    device: torch.device,
) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """After each forward pass, (row index, (frames, dim) backbone output) of the utterances it completed.
    ``encode(waves, lengths) -> (B, T, dim) frames, frames per item`` is the model's backbone part."""
    partial: dict[int, list[torch.Tensor]] = {}
    for pieces in passes(rows, limits, stride, receptive_field):
        batch = batch_of(pieces, [{} for _ in pieces], device)
        hidden, frames = encode(batch["waves"], batch["lengths"])
        done = []
        for i, piece in enumerate(pieces):
            partial.setdefault(piece.row, []).append(hidden[i, : int(frames[i])])
            if piece.last:
                parts = partial.pop(piece.row)
                done.append((piece.row, parts[0] if len(parts) == 1 else torch.cat(parts)))
        if done:
            yield done


def emotion_logits(
    model: torch.nn.Module,
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rows: list[dict[str, Any]],
    limits: EvalLimits,
) -> np.ndarray:
    """The (rows, classes) emotion logits of an emotion model, in the order of ``rows``: ``model.frames``
    is its backbone part, ``logits(frames, lengths)`` the emotion logits of its head. One process, eval
    mode, on the model's device. Evaluation and prediction on new audio both score utterances here."""
    model.eval()
    device = next(model.parameters()).device
    stride, receptive_field = conv_geometry(model.backbone.config)
    found: list[np.ndarray | None] = [None] * len(rows)
    with torch.no_grad():
        for done in utterance_frames(model.frames, rows, limits, stride, receptive_field, device):
            hidden = torch.nn.utils.rnn.pad_sequence([f for _, f in done], batch_first=True)
            lengths = torch.tensor([len(f) for _, f in done], device=device)
            scores = logits(hidden, lengths).float().cpu().numpy()
            for (row, _), row_scores in zip(done, scores, strict=True):
                found[row] = row_scores
    return np.stack(found) if rows else np.zeros((0, 0), dtype=np.float32)


def emotion_scores(
    model: torch.nn.Module,
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rows: list[dict[str, Any]],
    limits: EvalLimits,
) -> dict[str, Any]:
    """WAR, UAR and the per-row truth and predictions (in the order of ``rows``) of an emotion model
    (see :func:`emotion_logits`)."""
    predicted = emotion_logits(model, logits, rows, limits).argmax(-1).tolist()
    truth = [r["emotion"] for r in rows]
    return {
        "war": war(truth, predicted),
        "uar": uar(truth, predicted),
        "truth": truth,
        "predicted": predicted,
    }
