"""AM-Softmax (additive margin softmax), the stage-3 classifier.

Weights and embeddings are L2-normalised, so logits are cosines; the target class's cosine is lowered by
the margin m before scaling by s: ``s * (cos(theta_y) - m)`` for the target, ``s * cos(theta_j)`` for
the others, then cross-entropy. At inference (no labels) the logits are the scaled cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AMSoftmax(nn.Module):
    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0, margin: float = 0.2):
        super().__init__()
        self.scale = scale
        self.margin = margin
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T
        if labels is not None:
            cosine = cosine - self.margin * F.one_hot(labels, cosine.shape[-1]).to(cosine.dtype)
        return self.scale * cosine

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The AM-Softmax loss (mean over the batch)."""
        return F.cross_entropy(self.logits(embeddings, labels), labels)
