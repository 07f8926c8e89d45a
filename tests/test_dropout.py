"""The text encoder's CPU dropout (``model.text.fast_dropout``): its mask distribution, its
forward and backward, the attention path it takes in training, and the switch back to
torch's bernoulli masks."""
import pytest
import torch
import torch.nn.functional as F

from albef_bal.models import ALBEF
from albef_bal.models.text import attention_with_dropout, drop_mask, dropout
from tiny import tiny_batch, tiny_config


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_drop_mask_drops_a_fraction_p_in_every_lane(p):
    torch.manual_seed(0)
    n = 400_000
    mask = drop_mask(torch.Size([n]), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (n,)
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(mask.float().mean().item() - p) < 5 * sd
    # four entries share one 64-bit draw: each of the four 16-bit lanes must be uniform on its own
    lanes = mask.view(-1, 4).float()
    for lane in range(4):
        assert abs(lanes[:, lane].mean().item() - p) < 5 * sd * 2
    # ... and the lanes of one draw independent of each other
    both = (lanes[:, 0] * lanes[:, 1]).mean().item()
    assert abs(both - p * p) < 5 * (p * p / (n / 4)) ** 0.5 + 1e-4


def test_drop_mask_follows_the_seed_and_moves_the_generator():
    torch.manual_seed(3)
    a = drop_mask(torch.Size([7, 9]), 0.1, torch.device("cpu"))
    b = drop_mask(torch.Size([7, 9]), 0.1, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(drop_mask(torch.Size([7, 9]), 0.1, torch.device("cpu")), a)
    assert a.shape == (7, 9)
    torch.manual_seed(3)
    big_a = drop_mask(torch.Size([1000]), 0.5, torch.device("cpu"))
    big_b = drop_mask(torch.Size([1000]), 0.5, torch.device("cpu"))
    assert not torch.equal(big_a, big_b)  # the second call drew new bits
    assert not torch.equal(a, b) or a.sum() == 0


def test_fast_dropout_zeroes_the_mask_scales_the_rest_and_backpropagates_through_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 30, 32, requires_grad=True)
    y = dropout(x, 0.25, training=True, fast=True)
    kept = y != 0
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    assert torch.equal(y[kept], x.detach()[kept] * (1 / 0.75))
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad[kept], g[kept] * (1 / 0.75))
    assert torch.equal(x.grad[~kept], torch.zeros_like(g[~kept]))
    # no dropout outside training, at p = 0, and the torch path when fast is off
    assert dropout(x, 0.25, training=False, fast=True) is x
    assert dropout(x, 0.0, training=True, fast=True) is x
    torch.manual_seed(1)
    ref = F.dropout(x, 0.25, True)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.25, training=True, fast=False), ref)


def test_fast_dropout_keeps_the_mean_like_torch_dropout():
    torch.manual_seed(0)
    x = torch.rand(200_000) + 1.0
    fast = dropout(x, 0.1, training=True, fast=True)
    ref = F.dropout(x, 0.1, True)
    for y in (fast, ref):
        assert abs(y.mean().item() - x.mean().item()) < 0.01
        assert abs((y == 0).float().mean().item() - 0.1) < 0.003


def test_attention_with_dropout_equals_sdpa_without_dropout_values_and_gradients():
    torch.manual_seed(0)
    q = torch.randn(6, 4, 10, 8, requires_grad=True)
    k = torch.randn(6, 4, 13, 8, requires_grad=True)
    v = torch.randn(6, 4, 13, 8, requires_grad=True)
    mask = torch.ones(6, 13, dtype=torch.bool)
    mask[1, 9:] = False
    mask[4, 3:] = False
    mask = mask[:, None, None, :]
    ours = attention_with_dropout(q, k, v, mask, 0.0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(ours, ref, atol=1e-6)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(ours, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)
    # masked keys get no attention, with or without dropout
    v2 = v.detach().clone()
    v2[1, :, 9:] = 1e6
    assert ours[1].abs().max() < 1e3
    assert attention_with_dropout(q, k, v2, mask, 0.1)[1].abs().max() < 1e3


def _train_forward(*overrides, seed=11):
    torch.manual_seed(0)
    cfg = tiny_config("model.text.dropout=0.1", *overrides)
    model = ALBEF(cfg.model)
    images, ids, mask = tiny_batch(cfg)
    torch.manual_seed(seed)
    out = model(images, ids, mask, alpha=0.4, update=False)
    return model, out


def test_the_switch_selects_the_mask_generator_and_leaves_evaluation_alone(monkeypatch):
    calls = []
    real = F.dropout
    monkeypatch.setattr(F, "dropout", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, fast = _train_forward()
    assert calls == []  # text dropout drew its own masks
    _, torch_masks = _train_forward("model.text.fast_dropout=false")
    assert len(calls) > 0
    _, again = _train_forward()
    assert torch.equal(fast.total(), again.total())  # deterministic given the seed
    assert not torch.equal(fast.total(), torch_masks.total())  # other masks, other loss
    # evaluation has no dropout: both settings give the same numbers
    images, ids, mask = tiny_batch(tiny_config())
    outs = []
    for flag in ("true", "false"):
        torch.manual_seed(0)
        model = ALBEF(tiny_config("model.text.dropout=0.1", f"model.text.fast_dropout={flag}").model).eval()
        outs.append(model.text_encoder.forward_text(ids, mask))
    assert torch.equal(outs[0], outs[1])


def test_gradient_checkpointing_replays_the_fast_masks():
    results = []
    for ckpt in ("false", "true"):
        model, out = _train_forward(f"model.grad_checkpointing={ckpt}")
        out.total().backward()
        results.append((out.total().detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-6)
