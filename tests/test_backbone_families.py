"""Every backbone family (HuBERT, WavLM, wav2vec 2.0, data2vec-audio; base and large layouts): the same
features alone and in a padded batch, the checkpoint's input normalisation, loading by ``model_type``,
layers by depth, and gradient checkpointing and bf16 giving the gradients they should."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO
from transformers import SEWConfig, SEWModel, Wav2Vec2FeatureExtractor

from gmpatl_ray.config import BackboneConfig, BackboneSize, load_config
from gmpatl_ray.errors import InputError
from gmpatl_ray.models.backbone import (
    NORMALIZE_ATTRIBUTE,
    BackboneError,
    backbone_depth,
    backbone_layers,
    hidden_state_index,
    load_backbone,
    normalizes_waveform,
    random_backbone,
)
from gmpatl_ray.training import prepare_backbone

TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
LAYOUTS = [
    ("hubert", False),
    ("hubert", True),
    ("wavlm", False),
    ("wavlm", True),
    ("wav2vec2", False),
    ("wav2vec2", True),
    ("data2vec-audio", False),
]
NAMES = [f"{family}-{'large' if large else 'base'}" for family, large in LAYOUTS]


def tiny(family: str, large: bool = False, seed: int = 0):
    return random_backbone(BackboneSize(family=family, large_layout=large, conv_dim=16, **TINY), seed).eval()


@pytest.mark.parametrize(("family", "large"), LAYOUTS, ids=NAMES)
def test_an_utterance_has_the_same_layers_alone_and_in_a_padded_batch(family, large):
    model = tiny(family, large)
    assert model.config.model_type == family
    assert normalizes_waveform(model.config) == (large or family == "data2vec-audio")
    torch.manual_seed(1)
    short, long = torch.randn(9000) * 0.3 + 0.1, torch.randn(24000) * 0.5
    batch = torch.zeros(2, 24000)
    batch[0, :9000], batch[1] = short, long
    with torch.no_grad():
        alone, frames = backbone_layers(model, short[None], torch.tensor([9000]), [-1, -2])
        padded, batch_frames = backbone_layers(model, batch, torch.tensor([9000, 24000]), [-1, -2])
        plain = model(batch, attention_mask=(torch.arange(24000) < torch.tensor([[9000], [24000]])).long())
    n = int(frames[0])
    assert batch_frames.tolist() == [n, 74]
    for layer in (-1, -2):
        torch.testing.assert_close(padded[layer][0, :n], alone[layer][0], atol=2e-5, rtol=1e-4)
    # what the padding-exact path is for: transformers' own batched call lets the padding in
    assert (plain.last_hidden_state[0, :n] - alone[-1][0]).abs().max() > 1e-3
    # and the whole utterance agrees with transformers' own call where there is no padding
    with torch.no_grad():
        wave = long[None]
        if normalizes_waveform(model.config):
            wave = (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-7)
        reference = model(wave, output_hidden_states=True).hidden_states
    torch.testing.assert_close(padded[-2][1], reference[hidden_state_index(-2, 3)][0], atol=2e-5, rtol=1e-4)


def test_normalisation_is_the_feature_extractors_over_the_valid_samples():
    from gmpatl_ray.models.backbone import _normalized

    rng = np.random.default_rng(0)
    waves = [rng.normal(0.2, 0.4, 5000).astype(np.float32), rng.normal(-0.1, 0.1, 8000).astype(np.float32)]
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    batch = torch.zeros(2, 8000)
    for i, wave in enumerate(waves):
        batch[i, : len(wave)] = torch.from_numpy(wave)
    ours = _normalized(batch, torch.tensor([5000, 8000]))
    for i, wave in enumerate(waves):
        theirs = extractor(wave, sampling_rate=16000, return_tensors="pt").input_values[0]
        torch.testing.assert_close(ours[i, : len(wave)], theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[0, 5000:], torch.zeros(3000))


@pytest.mark.parametrize(("family", "large"), LAYOUTS, ids=NAMES)
def test_a_saved_checkpoint_loads_as_its_family_with_its_normalisation(tmp_path, family, large):
    saved = tiny(family, large, seed=3)
    saved.save_pretrained(tmp_path / "model")
    loaded = load_backbone(BackboneConfig(pretrained=str(tmp_path / "model")))
    assert type(loaded) is type(saved) and loaded.config.model_type == family
    assert all(torch.equal(t, loaded.state_dict()[k]) for k, t in saved.state_dict().items())
    assert normalizes_waveform(loaded.config) == normalizes_waveform(saved.config)
    assert backbone_depth(BackboneConfig(pretrained=str(tmp_path / "model"))) == 3


def test_the_checkpoints_own_feature_extractor_decides_the_normalisation(tmp_path):
    """A large-layout checkpoint whose preprocessor_config.json says do_normalize=false gets raw input;
    one without the file (or without the key) gets fairseq's convention for its layout."""
    for name, do_normalize in (("raw", False), ("normed", True), ("none", None)):
        model = tiny("wav2vec2", large=True)
        delattr(model.config, NORMALIZE_ATTRIBUTE)  # as a checkpoint from the hub has it
        model.save_pretrained(tmp_path / name)
        assert NORMALIZE_ATTRIBUTE not in json.loads((tmp_path / name / "config.json").read_text())
        if do_normalize is not None:
            Wav2Vec2FeatureExtractor(do_normalize=do_normalize).save_pretrained(tmp_path / name)
        loaded = load_backbone(BackboneConfig(pretrained=str(tmp_path / name)))
        assert normalizes_waveform(loaded.config) is (True if do_normalize is None else do_normalize), name
        loaded.save_pretrained(tmp_path / f"{name}-again")  # what a stage saves keeps the choice
        again = json.loads((tmp_path / f"{name}-again" / "config.json").read_text())
        assert again[NORMALIZE_ATTRIBUTE] is normalizes_waveform(loaded.config)


def test_other_architectures_are_refused_naming_the_families(tmp_path):
    config = SEWConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    SEWModel(config).save_pretrained(tmp_path / "sew")
    with pytest.raises(
        BackboneError, match="is a sew model; supported families: hubert, wavlm, wav2vec2, data2vec-audio"
    ):
        load_backbone(BackboneConfig(pretrained=str(tmp_path / "sew")))


def test_a_24_layer_model_names_layers_down_to_minus_24(tmp_path):
    size = BackboneSize(family="wavlm", large_layout=True, conv_dim=16, **{**TINY, "num_hidden_layers": 24})
    random_backbone(size).save_pretrained(tmp_path / "deep")
    assert backbone_depth(BackboneConfig(pretrained=str(tmp_path / "deep"))) == 24
    assert hidden_state_index(-24, 24) == 1 and hidden_state_index(-3, 24) == 22
    with pytest.raises(BackboneError, match="out of range .* 24 transformer layers: use -1 .. -24"):
        hidden_state_index(-25, 24)


def test_a_checkpoint_without_a_mask_embedding_is_refused_before_training(tmp_path):
    """Such a checkpoint (its config masks nothing, so transformers builds no ``masked_spec_embed``) could
    not run stage 2: every stage of a run with stage 2 refuses it when it prepares the backbone, before any
    training; a run without stage 2 takes it."""
    model = tiny("wav2vec2")
    model.config.mask_time_prob = 0.0
    type(model)(model.config).save_pretrained(tmp_path / "unmasked")
    backbone = load_backbone(BackboneConfig(pretrained=str(tmp_path / "unmasked")))
    config = load_config(REPO / "configs" / "demo.yaml")
    assert getattr(backbone, "masked_spec_embed", None) is None
    with pytest.raises(InputError, match="the wav2vec2 backbone has no mask embedding .* set mask_time_prob"):
        prepare_backbone(backbone, config)
    prepare_backbone(tiny("wav2vec2"), config)  # transformers' default config masks: accepted
    without_stage2 = config.model_copy(update={"stage2": config.stage2.model_copy(update={"enabled": False})})
    prepare_backbone(backbone, without_stage2)  # nothing masks: accepted


def test_how_the_waveform_goes_in_is_part_of_a_checkpoints_identity(tmp_path):
    """Features and stages cached for a checkpoint read raw are not reused once it is read normalised."""
    from gmpatl_ray.features import backbone_identity

    model = tiny("wav2vec2")
    delattr(model.config, NORMALIZE_ATTRIBUTE)  # as a checkpoint from elsewhere: no choice saved with it
    model.save_pretrained(tmp_path / "w2v")
    cfg = BackboneConfig(pretrained=str(tmp_path / "w2v"))
    raw, read_raw = backbone_identity(cfg, 0), normalizes_waveform(load_backbone(cfg).config)
    (tmp_path / "w2v" / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    normalised, read_normalised = backbone_identity(cfg, 0), normalizes_waveform(load_backbone(cfg).config)
    assert (read_raw, read_normalised) == (False, True)
    assert raw != normalised  # the file that decides is checksummed with the weights


def test_data2vec_has_no_large_layout_switch():
    with pytest.raises(ValueError, match="large_layout: data2vec-audio has a single layout"):
        BackboneSize(family="data2vec-audio", large_layout=True)


def _loss_and_grads(model, waves, lengths, mask=None, bf16=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        outputs, _ = backbone_layers(model, waves, lengths, [-1], mask=mask)
        out = outputs[-1].float()
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))  # a loss with a slope
        loss = (out - target).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("family", "large"), LAYOUTS, ids=NAMES)
def test_gradient_checkpointing_and_bf16_train_every_family(family, large):
    """Checkpointing gives the same loss and gradients; bf16 autocast gives a loss within 5 % and finite
    gradients of the same shapes that point downhill; the mask embedding gets a gradient where frames
    are masked (stage 2)."""
    model = tiny(family, large).train()
    model.config.layerdrop = 0.0
    for module in model.modules():  # dropout off: the two runs must see the same network
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # attention's own dropout probability
            module.dropout = 0.0
    torch.manual_seed(2)
    waves, lengths = torch.randn(2, 8000), torch.tensor([6000, 8000])
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[:, 3:8] = True
    loss, grads = _loss_and_grads(model, waves, lengths, mask)
    assert "masked_spec_embed" in grads and grads["masked_spec_embed"].abs().sum() > 0
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, checkpointed_grads = _loss_and_grads(model, waves, lengths, mask)
    torch.testing.assert_close(checkpointed, loss)
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)
    half, half_grads = _loss_and_grads(model, waves, lengths, mask, bf16=True)
    assert torch.isfinite(half) and abs(float(half) - float(loss)) < 0.05 * float(loss)
    assert {n: g.shape for n, g in half_grads.items()} == {n: g.shape for n, g in grads.items()}
    assert all(torch.isfinite(g).all() for g in half_grads.values())
    with torch.no_grad():  # a small step along bf16's gradient lowers the fp32 loss: it points downhill
        for name, param in model.named_parameters():
            if name in half_grads:
                param -= 0.05 * half_grads[name]
    stepped, _ = _loss_and_grads(model, waves, lengths, mask)
    assert float(stepped) < float(loss) - 1e-3
