"""The HuBERT backbone: load pretrained weights offline-safely or build a random one, and pick layers.

Layers are named by negative index into HuBERT's hidden states, as the paper does: for HuBERT base the
model returns 13 hidden states (the CNN/projection output, then one per transformer layer), and ``-3`` is
the output of the third-to-last transformer layer (layer 10 of 12). Only transformer layers can be named:
``-1`` .. ``-num_hidden_layers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, HubertConfig, HubertModel

from ..config import BackboneConfig, HubertSize
from ..errors import InputError


class BackboneError(InputError):
    """The backbone cannot be loaded as configured; the message says how to provide it."""


def load_backbone(cfg: BackboneConfig, seed: int = 0) -> HubertModel:
    """A ``HubertModel`` from ``cfg.pretrained`` (local folder or hub id) or ``cfg.random_init``."""
    if cfg.random_init is not None:
        return random_hubert(cfg.random_init, seed)
    return _from_pretrained(cfg.pretrained, cfg.allow_download)


def random_hubert(size: HubertSize, seed: int = 0) -> HubertModel:
    """A randomly initialised HuBERT of the given size, identical for the same seed."""
    config = HubertConfig(
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        intermediate_size=size.intermediate_size,
        conv_dim=(size.conv_dim,) * 7,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HubertModel(config)


def _from_pretrained(name: str, allow_download: bool) -> HubertModel:
    local = Path(name).expanduser()
    looks_local = local.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise BackboneError(
            f"backbone.pretrained={name!r}: no HuBERT checkpoint there (expected a folder with config.json "
            "and model.safetensors, as written by save_pretrained)"
        )
    source, offline = (str(local) if looks_local else name), looks_local or not allow_download
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
        if not isinstance(config, HubertConfig):
            raise BackboneError(f"backbone.pretrained={name!r} is a {config.model_type} model, not HuBERT")
        return HubertModel.from_pretrained(source, config=config, local_files_only=offline)
    except (OSError, ValueError) as err:
        hint = (
            f"download it once where there is internet (`hf download {name} --local-dir DIR`) and set "
            "backbone.pretrained to DIR, or set backbone.allow_download=true"
            if not looks_local
            else "check that the folder holds a HuBERT checkpoint saved with save_pretrained"
        )
        raise BackboneError(f"backbone.pretrained={name!r} could not be loaded: {hint}. ({err})") from None


def hidden_state_index(layer: int, num_hidden_layers: int) -> int:
    """Position of transformer layer ``layer`` (negative) in ``outputs.hidden_states``."""
    if not -num_hidden_layers <= layer <= -1:
        raise BackboneError(
            f"layer {layer} is out of range for a backbone with {num_hidden_layers} transformer layers: "
            f"use -1 .. -{num_hidden_layers}"
        )
    return num_hidden_layers + 1 + layer


def truncate_layers(model: HubertModel, deepest: int) -> HubertModel:
    """Drop the transformer layers after ``deepest`` (negative index; for several layers, the largest) in
    place: extracting layer -3 of 12 then runs 10 layers, not 12. Only for a model used for nothing else."""
    keep = hidden_state_index(deepest, model.config.num_hidden_layers)
    model.encoder.layers = model.encoder.layers[:keep]
    return model


def conv_geometry(config) -> tuple[int, int]:
    """(stride, receptive field) of the CNN feature encoder in samples (320 and 400 for HuBERT): a frame
    every ``stride`` samples, each computed from ``receptive field`` samples."""
    stride, receptive_field = 1, 1
    for kernel, step in zip(reversed(config.conv_kernel), reversed(config.conv_stride), strict=True):
        receptive_field = (receptive_field - 1) * step + kernel
        stride *= step
    return stride, receptive_field


def frame_counts(model: HubertModel, num_samples: torch.Tensor) -> torch.Tensor:
    """HuBERT frames (50 a second) for waveforms of ``num_samples`` samples."""
    return model._get_feat_extract_output_lengths(num_samples).long()


def hubert_layers(
    model: HubertModel,
    waves: torch.Tensor,
    lengths: torch.Tensor,
    layers: list[int],
    mask: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Outputs of transformer ``layers`` (negative indices) for a zero-padded batch, and frames per item.

    Padding counts for nothing, so an utterance gets the same features alone or in any batch: the
    transformer gets the frame attention mask, and the first CNN layer's group norm (HuBERT base
    normalises each channel over time) takes its statistics over the valid samples only. Plain
    ``HubertModel(input_values, attention_mask)`` lets the padding shift those statistics.

    ``mask`` (B, frames), for stage 2, replaces the masked frames of the CNN features by the model's learned
    mask embedding before the transformer (see :mod:`gmpatl_ray.models.masking`).
    """
    num_layers = model.config.num_hidden_layers
    wanted = {layer: hidden_state_index(layer, num_layers) for layer in layers}
    if max(wanted.values()) > len(model.encoder.layers):
        raise BackboneError(f"layers {layers} need more than the {len(model.encoder.layers)} layers kept")
    frames = frame_counts(model, lengths)
    features = _feature_encoder(model, waves, lengths).transpose(1, 2)
    frame_mask = torch.arange(features.shape[1], device=waves.device)[None, :] < frames[:, None]
    hidden = model.feature_projection(features)
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # some versions also return the input
    if mask is not None:
        hidden = hidden.clone()
        hidden[mask.to(hidden.device)] = model.masked_spec_embed.to(hidden.dtype)

    captured: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(_module, _inputs, output):
            captured[index] = output[0] if isinstance(output, tuple) else output

        return hook

    hooks = [model.encoder.layers[i - 1].register_forward_hook(keep(i)) for i in set(wanted.values())]
    try:
        with _positional_conv_kernel(hidden):
            model.encoder(hidden, attention_mask=frame_mask)
    finally:
        for hook in hooks:
            hook.remove()
    outputs = {}
    for layer, index in wanted.items():
        out = captured[index]
        if model.config.do_stable_layer_norm and index == num_layers:  # HF's last hidden state is normed
            out = model.encoder.layer_norm(out)
        outputs[layer] = out
    return outputs, frames


SHORT_FRAMES = 256
"""Up to this many frames (5 s), inference runs the positional convolution without cuDNN (see below)."""


@contextmanager
def _positional_conv_kernel(hidden: torch.Tensor) -> Iterator[None]:
    """The transformer's only convolution, the positional one (kernel 128, 16 groups), runs on PyTorch's own
    kernel instead of cuDNN for batches of at most ``SHORT_FRAMES`` frames without gradients (evaluation,
    extraction, prediction). On many short items cuDNN's pick asks for 15 to 58 GiB of workspace and runs
    slower (64 x 124 frames on an H200: 21 GiB and 89 ms against 0.3 GiB and 32 ms), at batch shapes too
    erratic to list: on an H200 up to 128 frames, never from 150 on. Above, cuDNN is much the faster one
    (64 x 399: 3.3 ms against 39 ms) and is kept (``benchmarks/gpu_memory.py``). Training is left alone:
    its backward picks its kernel after this context has closed."""
    if torch.is_grad_enabled() or hidden.device.type != "cuda" or hidden.shape[1] > SHORT_FRAMES:
        yield
        return
    with torch.backends.cudnn.flags(enabled=False):
        yield


def _feature_encoder(model: HubertModel, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The CNN feature encoder with the first layer's group norm restricted to each item's valid samples."""
    encoder = model.feature_extractor
    if model.config.feat_extract_norm != "group" or bool((lengths == waves.shape[1]).all()):
        return encoder(waves)  # layer norm is per time step, or there is no padding: nothing can leak
    first = encoder.conv_layers[0]
    h = first.conv(waves[:, None, :])
    valid_steps = (lengths - first.conv.kernel_size[0]) // first.conv.stride[0] + 1
    valid = (
        (torch.arange(h.shape[-1], device=h.device)[None, :] < valid_steps[:, None]).unsqueeze(1).to(h.dtype)
    )
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (h * valid).sum(-1, keepdim=True) / count
    var = (((h - mean) * valid) ** 2).sum(-1, keepdim=True) / count
    norm = first.layer_norm
    h = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight[None, :, None] + norm.bias[None, :, None]
    h = first.activation(h)
    for layer in encoder.conv_layers[1:]:
        h = layer(h)
    return h
