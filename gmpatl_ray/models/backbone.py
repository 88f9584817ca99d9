"""The HuBERT backbone: load pretrained weights offline-safely or build a random one, and pick layers.

Layers are named by negative index into HuBERT's hidden states, as the paper does: for HuBERT base the
model returns 13 hidden states (the CNN/projection output, then one per transformer layer), and ``-3`` is
the output of the third-to-last transformer layer (layer 10 of 12). Only transformer layers can be named:
``-1`` .. ``-num_hidden_layers``.
"""

from __future__ import annotations

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
