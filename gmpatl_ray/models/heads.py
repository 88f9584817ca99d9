"""The heads GMP-ATL puts on HuBERT: LinearP, the utterance head of stages 1 and 3, the frame heads of
stage 2.

Padding counts for nothing here either: the BiLSTM runs on packed sequences (its backward direction starts
at each utterance's last real frame, not at the padding) and the mean pools valid frames only.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearP(nn.Sequential):
    """Linear -> ReLU -> Linear, the paper's projection block."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


def masked_mean(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the first ``lengths[i]`` frames of each item: (B, T, D) -> (B, D)."""
    valid = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]
    summed = (frames * valid.unsqueeze(-1)).sum(1)
    return summed / lengths.clamp(min=1).unsqueeze(-1).to(frames.dtype)


class UtteranceEncoder(nn.Module):
    """HuBERT frames -> BiLSTM -> masked mean pooling -> LinearP: one embedding per utterance."""

    def __init__(self, in_features: int, lstm_hidden: int, lstm_layers: int, proj_dim: int):
        super().__init__()
        self.lstm = nn.LSTM(in_features, lstm_hidden, lstm_layers, batch_first=True, bidirectional=True)
        self.proj = LinearP(2 * lstm_hidden, proj_dim, proj_dim)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            frames, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=frames.shape[1])
        return self.proj(masked_mean(out, lengths))


class FrameHeads(nn.Module):
    """Stage 2: one LinearP per GMP scale, predicting that scale's label for every frame."""

    def __init__(self, in_features: int, proj_dim: int, scales: list[int]):
        super().__init__()
        self.scales = list(scales)
        self.heads = nn.ModuleList(LinearP(in_features, proj_dim, k) for k in self.scales)

    def forward(self, frames: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, T, D) -> {k: (B, T, k) logits}."""
        return {k: head(frames) for k, head in zip(self.scales, self.heads, strict=True)}
