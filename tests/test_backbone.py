"""HuBERT loading: random init, from_pretrained on a tiny saved model, offline errors, layer indices
(the other families: test_backbone_families.py)."""

from __future__ import annotations

import pytest
import torch

from gmpatl_ray.config import BackboneConfig, BackboneSize
from gmpatl_ray.models.backbone import BackboneError, hidden_state_index, load_backbone, random_backbone

TINY = BackboneSize(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, conv_dim=16
)


def test_random_init_has_the_requested_size_and_is_seeded():
    model = load_backbone(BackboneConfig(pretrained=None, random_init=TINY), seed=7)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 3
    assert model.config.conv_dim == (16,) * 7
    same = random_backbone(TINY, seed=7)
    other = random_backbone(TINY, seed=8)
    w = "encoder.layers.0.attention.q_proj.weight"
    assert torch.equal(model.state_dict()[w], same.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


def test_base_size_defaults_match_hubert_base():
    size = BackboneSize()
    assert (
        size.hidden_size,
        size.num_hidden_layers,
        size.num_attention_heads,
        size.intermediate_size,
        size.conv_dim,
    ) == (768, 12, 12, 3072, 512)


def test_from_pretrained_loads_a_saved_model(tmp_path):
    saved = random_backbone(TINY, seed=3)
    saved.save_pretrained(tmp_path / "hubert")
    loaded = load_backbone(BackboneConfig(pretrained=str(tmp_path / "hubert")))
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    loaded.eval()
    with torch.no_grad():
        out = loaded(torch.randn(1, 16000), output_hidden_states=True)
    assert len(out.hidden_states) == 4  # CNN/projection output + 3 transformer layers
    assert out.hidden_states[0].shape == (1, 49, 32)  # 50 frames a second


def test_missing_hub_model_fails_fast_with_instructions():
    with pytest.raises(BackboneError) as err:
        load_backbone(BackboneConfig(pretrained="gmpatl-tests/no-such-hubert"))
    message = str(err.value)
    assert "hf download gmpatl-tests/no-such-hubert --local-dir DIR" in message
    assert "backbone.allow_download=true" in message


def test_local_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(BackboneError, match="no checkpoint there"):
        load_backbone(BackboneConfig(pretrained=str(tmp_path / "nothing")))


def test_negative_layers_index_the_transformer_outputs():
    assert hidden_state_index(-3, 12) == 10  # layer 10 of HuBERT base
    assert hidden_state_index(-1, 12) == 12 and hidden_state_index(-12, 12) == 1
    model = random_backbone(TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 8000), output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[hidden_state_index(-1, 3)], out.last_hidden_state)


@pytest.mark.parametrize("layer", [0, -13, 3])
def test_out_of_range_layers_fail_clearly(layer):
    with pytest.raises(
        BackboneError, match=rf"layer {layer} is out of range .* 12 transformer layers: use -1 .. -12"
    ):
        hidden_state_index(layer, 12)


def test_layers_removed_by_truncation_cannot_be_asked_for():
    from gmpatl_ray.models.backbone import backbone_layers, truncate_layers

    model = truncate_layers(random_backbone(TINY), -2).eval()  # keeps 2 of 3 layers
    with pytest.raises(BackboneError, match=r"layers \[-1\] need more than the 2 layers kept"):
        backbone_layers(model, torch.randn(1, 8000), torch.tensor([8000]), [-1])
