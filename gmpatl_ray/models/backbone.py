"""The backbone: HuBERT, WavLM, wav2vec 2.0 or data2vec-audio, loaded offline-safely or built at random,
and a padding-exact batched forward that picks layers.

Layers are named by negative index into the model's hidden states, as the paper does: for HuBERT base the
model returns 13 hidden states (the CNN/projection output, then one per transformer layer), and ``-3`` is
the output of the third-to-last transformer layer (layer 10 of 12). Only transformer layers can be named:
``-1`` .. ``-num_hidden_layers`` (24 for the large checkpoints).

The four families share transformers' wav2vec 2.0 layout (CNN feature encoder, feature projection,
positional convolution, transformer, ``masked_spec_embed``); what differs between them is in
:data:`FAMILIES` and in the few lines of :func:`backbone_layers` that name a family.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoConfig,
    Data2VecAudioConfig,
    HubertConfig,
    PretrainedConfig,
    Wav2Vec2Config,
    WavLMConfig,
)

from ..config import BackboneConfig, BackboneSize
from ..errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FAMILIES: dict[str, tuple[type[PretrainedConfig], str]] = {
    "hubert": (HubertConfig, "HubertModel"),
    "wavlm": (WavLMConfig, "WavLMModel"),
    "wav2vec2": (Wav2Vec2Config, "Wav2Vec2Model"),
    "data2vec-audio": (Data2VecAudioConfig, "Data2VecAudioModel"),
}
"""Supported backbones by transformers' ``model_type``: their config class and model class name. The model
classes are imported only where a model is built (:func:`model_class`): importing transformers' modelling
code takes seconds, which every driver, Tune trial and CLI call that builds none would pay."""

NORMALIZE_ATTRIBUTE = "gmpatl_normalize_waveform"
"""Set on the model's config (and so saved in its config.json with the weights): whether the waveform is
scaled to zero mean and unit variance before the CNN, as the checkpoint was trained."""


class BackboneError(InputError):
    """The backbone cannot be loaded as configured; the message says how to provide it."""


def load_backbone(cfg: BackboneConfig, seed: int = 0) -> PreTrainedModel:
    """The backbone from ``cfg.pretrained`` (local folder or hub id) or ``cfg.random_init``."""
    if cfg.random_init is not None:
        return random_backbone(cfg.random_init, seed)
    return _from_pretrained(cfg.pretrained, cfg.allow_download)


def model_class(family: str) -> type[PreTrainedModel]:
    """transformers' model class of a supported family."""
    import transformers

    return getattr(transformers, FAMILIES[family][1])


def random_backbone(size: BackboneSize, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised backbone of the given family and size, identical for the same seed."""
    config_class = FAMILIES[size.family][0]
    layout = {}
    if size.family != "data2vec-audio":  # its CNN is layer-normed and its transformer post-norm, always
        layout = {
            "feat_extract_norm": "layer" if size.large_layout else "group",
            "do_stable_layer_norm": size.large_layout,
        }
    config = config_class(
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        intermediate_size=size.intermediate_size,
        conv_dim=(size.conv_dim,) * 7,
        **layout,
    )
    setattr(config, NORMALIZE_ATTRIBUTE, _layer_normed_cnn(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(size.family)(config)


def backbone_depth(cfg: BackboneConfig) -> int:
    """Transformer layers of the configured backbone, read from its config alone (no weights loaded)."""
    if cfg.random_init is not None:
        return cfg.random_init.num_hidden_layers
    return _pretrained_config(cfg.pretrained, cfg.allow_download)[0].num_hidden_layers


def _pretrained_config(name: str, allow_download: bool) -> tuple[PretrainedConfig, str, bool]:
    """The checkpoint's config (a supported family, checked), where to load it from and whether offline."""
    local = Path(name).expanduser()
    looks_local = local.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise BackboneError(
            f"backbone.pretrained={name!r}: no checkpoint there (expected a folder with config.json "
            "and model.safetensors, as written by save_pretrained)"
        )
    source, offline = (str(local) if looks_local else name), looks_local or not allow_download
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise _load_error(name, looks_local, err) from None
    if config.model_type not in FAMILIES:
        raise BackboneError(
            f"backbone.pretrained={name!r} is a {config.model_type} model; supported families: "
            f"{', '.join(FAMILIES)}"
        )
    return config, source, offline


def _from_pretrained(name: str, allow_download: bool) -> PreTrainedModel:
    config, source, offline = _pretrained_config(name, allow_download)
    if getattr(config, NORMALIZE_ATTRIBUTE, None) is None:  # a checkpoint this project did not save
        setattr(config, NORMALIZE_ATTRIBUTE, _checkpoint_normalizes(config, source, offline))
    try:
        return model_class(config.model_type).from_pretrained(source, config=config, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise _load_error(name, Path(source).exists(), err) from None


def _load_error(name: str, looks_local: bool, err: Exception) -> BackboneError:
    hint = (
        f"download it once where there is internet (`hf download {name} --local-dir DIR`) and set "
        "backbone.pretrained to DIR, or set backbone.allow_download=true"
        if not looks_local
        else "check that the folder holds a checkpoint saved with save_pretrained"
    )
    return BackboneError(f"backbone.pretrained={name!r} could not be loaded: {hint}. ({err})")


def _layer_normed_cnn(config: PretrainedConfig) -> bool:
    return getattr(config, "feat_extract_norm", "layer") == "layer"


def _checkpoint_normalizes(config: PretrainedConfig, source: str, offline: bool) -> bool:
    """The checkpoint's own feature extractor's ``do_normalize`` (preprocessor_config.json) where it has
    one; else fairseq's convention: models with a layer-normed CNN (the large ones, data2vec) were trained
    on normalised waveforms, the group-normed base models on raw ones."""
    from transformers.utils import cached_file

    found = cached_file(
        source,
        "preprocessor_config.json",
        local_files_only=offline,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if found:
        settings = json.loads(Path(found).read_text())
        if "do_normalize" in settings:
            return bool(settings["do_normalize"])
    return _layer_normed_cnn(config)


def normalizes_waveform(config: PretrainedConfig) -> bool:
    normalize = getattr(config, NORMALIZE_ATTRIBUTE, None)
    return _layer_normed_cnn(config) if normalize is None else bool(normalize)


def hidden_state_index(layer: int, num_hidden_layers: int) -> int:
    """Position of transformer layer ``layer`` (negative) in ``outputs.hidden_states``."""
    if not -num_hidden_layers <= layer <= -1:
        raise BackboneError(
            f"layer {layer} is out of range for a backbone with {num_hidden_layers} transformer layers: "
            f"use -1 .. -{num_hidden_layers}"
        )
    return num_hidden_layers + 1 + layer


def truncate_layers(model: PreTrainedModel, deepest: int) -> PreTrainedModel:
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


def frame_counts(model: PreTrainedModel, num_samples: torch.Tensor) -> torch.Tensor:
    """Backbone frames (50 a second for all four families) for waveforms of ``num_samples`` samples."""
    return model._get_feat_extract_output_lengths(num_samples).long()


def backbone_layers(
    model: PreTrainedModel,
    waves: torch.Tensor,
    lengths: torch.Tensor,
    layers: list[int],
    mask: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Outputs of transformer ``layers`` (negative indices) for a zero-padded batch, and frames per item.

    Padding counts for nothing, so an utterance gets the same features alone or in any batch: the waveform
    is normalised (where the checkpoint was trained so) over its valid samples, the first CNN layer's group
    norm (the base models normalise each channel over time) takes its statistics over the valid samples,
    data2vec's stacked positional convolutions see zeros past each item's frames, and the transformer gets
    the frame attention mask. Plain ``model(input_values, attention_mask)`` lets the padding leak into all
    three.

    ``mask`` (B, frames), for stage 2, replaces the masked frames of the CNN features by the model's learned
    mask embedding before the transformer (see :mod:`gmpatl_ray.models.masking`).
    """
    num_layers = model.config.num_hidden_layers
    wanted = {layer: hidden_state_index(layer, num_layers) for layer in layers}
    if max(wanted.values()) > len(model.encoder.layers):
        raise BackboneError(f"layers {layers} need more than the {len(model.encoder.layers)} layers kept")
    if normalizes_waveform(model.config):
        waves = _normalized(waves, lengths)
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

    def zero_padding(_module, _inputs, output):  # data2vec: (B, channels, frames) between its conv layers
        return output * frame_mask[:, None, :].to(output.dtype)

    hooks = [model.encoder.layers[i - 1].register_forward_hook(keep(i)) for i in set(wanted.values())]
    if model.config.model_type == "data2vec-audio":
        hooks += [layer.register_forward_hook(zero_padding) for layer in model.encoder.pos_conv_embed.layers]
    try:
        with _positional_conv_kernel(hidden):
            model.encoder(hidden, attention_mask=frame_mask)
    finally:
        for hook in hooks:
            hook.remove()
    outputs = {}
    for layer, index in wanted.items():
        out = captured[index]
        if getattr(model.config, "do_stable_layer_norm", False) and index == num_layers:  # HF norms the last
            out = model.encoder.layer_norm(out)
        outputs[layer] = out
    return outputs, frames


def _normalized(waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each waveform at zero mean and unit variance over its valid samples, padding left at zero: what
    transformers' ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does to one utterance at a time."""
    valid = (torch.arange(waves.shape[1], device=waves.device)[None, :] < lengths[:, None]).to(waves.dtype)
    count = lengths[:, None].to(waves.dtype).clamp(min=1)
    mean = (waves * valid).sum(1, keepdim=True) / count
    var = (((waves - mean) * valid) ** 2).sum(1, keepdim=True) / count
    return (waves - mean) / torch.sqrt(var + 1e-7) * valid


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


def _feature_encoder(model: PreTrainedModel, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The CNN feature encoder with the first layer's group norm restricted to each item's valid samples."""
    encoder = model.feature_extractor
    if _layer_normed_cnn(model.config) or bool((lengths == waves.shape[1]).all()):
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
