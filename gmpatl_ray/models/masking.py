"""HuBERT-style span masking of the CNN features (stage 2).

Spans of ``mask_length`` frames start at about ``mask_prob * frames / mask_length`` random positions of
each utterance's valid frames (transformers' own ``_compute_mask_indices``, the function HuBERT uses), so
with the HuBERT defaults (0.8, 10) about half of the frames are masked, overlaps included. Masked frames are
replaced by the model's learned mask embedding inside :func:`gmpatl_ray.models.backbone.backbone_layers`.
"""

from __future__ import annotations

import numpy as np
import torch


def span_mask(
    frames: torch.Tensor, total: int, mask_prob: float, mask_length: int, seed: int
) -> torch.Tensor:
    """A (B, total) boolean mask of spans within each item's first ``frames[i]`` frames; padding stays False.

    Seeded, so a resumed epoch masks the same frames.
    """
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices  # modelling code: slow

    attention = (torch.arange(total)[None, :] < frames.cpu()[:, None]).long()
    state = np.random.get_state()
    np.random.seed(seed)  # _compute_mask_indices draws from numpy's global generator
    try:
        mask = _compute_mask_indices(
            (len(frames), total), mask_prob, mask_length, attention_mask=attention, min_masks=1
        )
    finally:
        np.random.set_state(state)
    return torch.from_numpy(mask) & attention.bool()
