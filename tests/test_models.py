"""Model components: AM-Softmax by hand and its gradient, span masking statistics, padding-free heads,
and the SER metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmpatl_ray.config import BackboneSize
from gmpatl_ray.metrics import confusion, uar, war
from gmpatl_ray.models.backbone import backbone_layers, random_backbone
from gmpatl_ray.models.heads import FrameHeads, UtteranceEncoder, masked_mean
from gmpatl_ray.models.losses import AMSoftmax
from gmpatl_ray.models.masking import span_mask


def am_softmax(w0=(1.0, 0.0), w1=(0.0, 1.0), scale=30.0, margin=0.2) -> AMSoftmax:
    loss = AMSoftmax(2, 2, scale=scale, margin=margin).double()
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([w0, w1], dtype=torch.float64))
    return loss


def test_am_softmax_value_and_gradient_by_hand():
    e = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)  # |e| = 5, direction (0.6, 0.8)
    loss = am_softmax()(e, torch.tensor([0]))
    # cos = (0.6, 0.8); target 0 gets the margin: logits = 30 * (0.6 - 0.2, 0.8) = (12, 24)
    p = np.exp([12.0, 24.0]) / np.exp([12.0, 24.0]).sum()
    assert loss.item() == pytest.approx(-np.log(p[0]), rel=1e-12)
    loss.backward()
    # dL/de = s/|e| * sum_j (p_j - y_j) (w_j - cos_j n), n = e/|e|
    n = np.array([0.6, 0.8])
    expected = 30 / 5 * ((p[0] - 1) * (np.array([1, 0]) - 0.6 * n) + p[1] * (np.array([0, 1]) - 0.8 * n))
    np.testing.assert_allclose(e.grad.numpy()[0], expected, rtol=1e-10)


def test_am_softmax_gradcheck_and_inference_logits():
    torch.manual_seed(0)
    loss = AMSoftmax(5, 4, scale=30.0, margin=0.2).double()
    e = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (e,))
    logits = loss.logits(e)
    assert logits.abs().max() <= 30 + 1e-9  # scaled cosines
    no_margin = AMSoftmax(5, 4, scale=30.0, margin=0.0).double()
    no_margin.weight = loss.weight
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert no_margin(e, labels).item() == pytest.approx(ce.item())
    assert loss(e, labels).item() > ce.item()  # the margin makes the target harder


def test_span_mask_statistics():
    frames = torch.tensor([500] * 60 + [250] * 4)
    mask = span_mask(frames, 500, mask_prob=0.8, mask_length=10, seed=0)
    assert mask.shape == (64, 500) and mask.dtype == torch.bool
    assert not mask[60:, 250:].any()  # padding is never masked
    share = mask[:60].float().mean().item()
    assert 0.45 < share < 0.65  # 80 % of frames start spans; overlaps leave about half masked
    for row in mask[:60].numpy():
        runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]]))))[::2]
        assert runs.min() >= 10  # whole spans
    assert torch.equal(mask, span_mask(frames, 500, 0.8, 10, seed=0))
    assert not torch.equal(mask, span_mask(frames, 500, 0.8, 10, seed=1))


def test_masked_frames_get_the_mask_embedding_and_change_the_output():
    model = random_backbone(
        BackboneSize(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=32
        )
    ).eval()
    wave, length = torch.randn(1, 16000), torch.tensor([16000])
    with torch.no_grad():
        plain, frames = backbone_layers(model, wave, length, [-1])
        none_masked, _ = backbone_layers(model, wave, length, [-1], mask=torch.zeros(1, 49, dtype=torch.bool))
        mask = span_mask(frames, 49, 0.8, 10, seed=0)
        masked, _ = backbone_layers(model, wave, length, [-1], mask=mask)
    torch.testing.assert_close(plain[-1], none_masked[-1])
    assert not torch.allclose(plain[-1], masked[-1])


def test_utterance_encoder_ignores_padding():
    torch.manual_seed(0)
    encoder = UtteranceEncoder(8, lstm_hidden=6, lstm_layers=2, proj_dim=5).eval()
    short, long = torch.randn(1, 7, 8), torch.randn(1, 12, 8)
    batch = torch.zeros(2, 12, 8)
    batch[0, :7], batch[1] = short[0], long[0]
    with torch.no_grad():
        together = encoder(batch, torch.tensor([7, 12]))
        alone = encoder(short, torch.tensor([7]))
    assert together.shape == (2, 5)
    torch.testing.assert_close(together[0], alone[0], atol=1e-6, rtol=1e-5)


def test_masked_mean_and_frame_heads():
    frames = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    torch.testing.assert_close(masked_mean(frames, torch.tensor([2, 3])), torch.tensor([[2.0], [4.0]]))
    heads = FrameHeads(8, 16, [4, 64])
    out = heads(torch.randn(3, 10, 8))
    assert {k: v.shape for k, v in out.items()} == {4: (3, 10, 4), 64: (3, 10, 64)}


def test_war_uar_and_confusion_by_hand():
    truth = ["ang", "ang", "ang", "ang", "sad", "neu"]
    predicted = ["ang", "ang", "ang", "sad", "sad", "ang"]
    assert war(truth, predicted) == pytest.approx(4 / 6)
    assert uar(truth, predicted) == pytest.approx((3 / 4 + 1 + 0) / 3)
    matrix = confusion(truth, predicted, ["ang", "hap", "neu", "sad"])
    assert matrix.tolist() == [[3, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize("seed", range(5))
def test_war_uar_and_confusion_are_scikit_learns(seed):
    """The numpy metrics give scikit-learn's numbers, also when a class is missing from the truth or
    the predictions, or a prediction is not one of the classes."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

    rng = np.random.default_rng(seed)
    classes = ["ang", "hap", "neu", "sad"]
    truth = rng.choice(classes[: 2 + seed % 3], 50).tolist()
    predicted = rng.choice([*classes, "xxx"] if seed == 4 else classes[1:], 50).tolist()
    assert war(truth, predicted) == pytest.approx(accuracy_score(truth, predicted))
    assert uar(truth, predicted) == pytest.approx(balanced_accuracy_score(truth, predicted))
    expected = confusion_matrix(truth, predicted, labels=classes)
    assert confusion(truth, predicted, classes).tolist() == expected.tolist()


def test_stage3_loss_is_the_am_softmax_loss():
    from gmpatl_ray.config import load_config
    from gmpatl_ray.stages.stage3 import Stage3Model, loss

    config = load_config(None, ["stage1.lstm_hidden=8", "stage1.proj_dim=8"])
    backbone = random_backbone(
        BackboneSize(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=32
        )
    ).eval()
    model = Stage3Model(backbone, config).eval()
    batch = {
        "waves": torch.randn(3, 8000),
        "lengths": torch.tensor([8000, 6000, 4000]),
        "emotion": torch.tensor([0, 2, 3]),
    }
    with torch.no_grad():
        embedding = model.encoder(*model.frames(batch["waves"], batch["lengths"]))
        expected = model.classifier(embedding, batch["emotion"])  # AMSoftmax module's own loss
        assert loss(model, batch, config).item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    from conftest import small_config

    from gmpatl_ray.stages import stage1

    batch = {
        "waves": torch.randn(3, 16000, generator=torch.Generator().manual_seed(0)),
        "lengths": torch.tensor([16000, 12000, 9000]),
        "emotion": torch.tensor([0, 1, 2]),
        "gender": torch.tensor([0, 1, 0]),
    }
    results = []
    for checkpointing in ("false", "true"):
        config = small_config(
            tmp_path, "stage1.lstm_hidden=16", f"train.gradient_checkpointing={checkpointing}"
        )
        model = stage1.build_model(config).train()
        torch.manual_seed(1)  # the same dropout draws; checkpointing replays them in the backward pass
        loss = stage1.loss(model, batch, config)
        loss.backward()
        results.append((loss.item(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain), (checkpointed_loss, checkpointed) = results
    assert model.backbone.is_activation_checkpointing
    assert checkpointed_loss == plain_loss and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)
