import math

import pytest
import torch
import torch.nn.functional as F

from albef_bal.losses import (alpha_schedule, clamp_temperature, itc_positive_mask, itc_targets, mask_tokens,
                              mlm_loss, positive_score, sample_hard_negatives, soft_cross_entropy)


# ------------------------------------------------------------------ ITC pieces
def test_itc_targets_mix_distillation_and_positives():
    pos = itc_positive_mask(3, 5)
    assert pos.shape == (3, 8)
    assert torch.equal(pos[:, :3], torch.eye(3)) and pos[:, 3:].sum() == 0
    sim_m = torch.randn(3, 8)
    t = itc_targets(pos, sim_m, alpha=0.4)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert torch.allclose(t, 0.4 * F.softmax(sim_m, 1) + 0.6 * pos)
    assert torch.equal(itc_targets(pos, None, 0.4), pos)  # no distillation: one-hot


def test_itc_positive_mask_with_image_ids_covers_batch_and_queue():
    idx = torch.tensor([7, 8, 7])
    queue = torch.tensor([8, -100, 7, 9])
    pos = itc_positive_mask(3, 4, idx, queue)
    expected = torch.tensor([[1, 0, 1, 0, 0, 1, 0],
                             [0, 1, 0, 1, 0, 0, 0],
                             [1, 0, 1, 0, 0, 1, 0]], dtype=torch.float)
    assert torch.equal(pos, expected)
    t = itc_targets(pos, None, 0.0)
    assert torch.allclose(t[0], expected[0] / 3)


def test_soft_cross_entropy_equals_cross_entropy_for_one_hot():
    logits = torch.randn(5, 9)
    labels = torch.tensor([0, 3, 8, 2, 2])
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(labels, 9).float()), F.cross_entropy(logits, labels))


def test_positive_score_is_probability_of_the_positive():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    pos = torch.eye(2)
    expected = (math.exp(2) / (math.exp(2) + 1) + 0.5) / 2
    assert positive_score(logits, pos).item() == pytest.approx(expected)


def test_temperature_clamp_keeps_the_gradient():
    for value, clamped in [(0.07, 0.07), (0.9, 0.5), (1e-5, 0.001)]:
        t = torch.tensor([value], requires_grad=True)
        out = clamp_temperature(t)
        assert out.item() == pytest.approx(clamped)
        (3.0 * out).sum().backward()
        assert t.grad.item() == pytest.approx(3.0)  # as ALBEF's in-place clamp: gradient passes


def test_alpha_ramps_over_the_first_epoch_only():
    assert alpha_schedule(0.4, 0, 100, 0) == 0.0
    assert alpha_schedule(0.4, 25, 100, 0) == pytest.approx(0.1)
    assert alpha_schedule(0.4, 100, 100, 0) == pytest.approx(0.4)
    assert alpha_schedule(0.4, 500, 100, 0) == pytest.approx(0.4)  # capped
    assert alpha_schedule(0.4, 0, 100, 1) == pytest.approx(0.4)


# --------------------------------------------------------------- hard negatives
def test_hard_negatives_are_never_the_positive():
    torch.manual_seed(0)
    for B in (2, 3, 8):
        exclude = torch.eye(B, dtype=torch.bool)
        for _ in range(200):
            idx, valid = sample_hard_negatives(torch.randn(B, B) * 10, exclude)
            assert valid.all()
            assert (idx != torch.arange(B)).all()


def test_hard_negatives_with_batch_of_two_pick_the_other():
    exclude = torch.eye(2, dtype=torch.bool)
    # an overwhelming similarity on the diagonal must not leak through
    idx, valid = sample_hard_negatives(torch.tensor([[100.0, -100.0], [-100.0, 100.0]]), exclude)
    assert idx.tolist() == [1, 0] and valid.all()


def test_hard_negatives_skip_duplicated_images():
    image_ids = torch.tensor([5, 5, 6, 5])
    exclude = image_ids[:, None] == image_ids[None, :]
    torch.manual_seed(1)
    for _ in range(200):
        idx, valid = sample_hard_negatives(torch.randn(4, 4), exclude)
        assert valid.all()
        assert (image_ids[idx] != image_ids).all()
    # every row's only allowed negative is the image with id 6, and row 2 must avoid itself
    assert idx[[0, 1, 3]].tolist() == [2, 2, 2]


def test_hard_negatives_follow_the_similarity_softmax():
    torch.manual_seed(2)
    sim = torch.tensor([[0.0, math.log(3.0), 0.0]] * 3)  # column 1 three times as likely as 2 for row 0
    exclude = torch.eye(3, dtype=torch.bool)
    draws = torch.stack([sample_hard_negatives(sim, exclude)[0] for _ in range(4000)])
    share = (draws[:, 0] == 1).float().mean().item()
    assert share == pytest.approx(0.75, abs=0.03)


def test_hard_negatives_guard_batch_of_one_and_nan():
    idx, valid = sample_hard_negatives(torch.tensor([[1.0]]), torch.ones(1, 1, dtype=torch.bool))
    assert not valid.any() and idx.shape == (1,)
    sim = torch.full((3, 3), float("nan"))
    idx, valid = sample_hard_negatives(sim, torch.eye(3, dtype=torch.bool))
    assert valid.all() and (idx != torch.arange(3)).all()  # uniform over the allowed columns
    ids = torch.tensor([1, 1])
    idx, valid = sample_hard_negatives(torch.randn(2, 2), ids[:, None] == ids[None, :])
    assert not valid.any()  # one image id: no negative exists


# ----------------------------------------------------------------------- MLM
def test_masking_rates_and_special_tokens():
    torch.manual_seed(0)
    vocab, MASK = 1000, 3
    ids = torch.randint(4, vocab, (400, 40))
    ids[:, 0] = 1  # CLS
    ids[:, 30] = 2  # SEP
    ids[:, 31:] = 0  # PAD
    masked, labels = mask_tokens(ids, vocab, MASK, special_ids=(0, 1, 2), probability=0.15)
    selected = labels != -100
    assert not selected[:, 0].any() and not selected[:, 30:].any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])  # untouched outside the selection
    rate = selected[:, 1:30].float().mean().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    n = selected.sum().item()
    to_mask = (masked[selected] == MASK).sum().item() / n
    unchanged = (masked[selected] == ids[selected]).sum().item() / n
    assert to_mask == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1, abs=0.02)  # random tokens rarely hit the original
    assert 1 - to_mask - unchanged == pytest.approx(0.1, abs=0.02)


def test_mlm_loss_mixes_hard_and_soft_targets():
    logits = torch.randn(6, 11)
    labels = torch.randint(0, 11, (6,))
    soft = F.softmax(torch.randn(6, 11), dim=1)
    ce = F.cross_entropy(logits, labels)
    assert torch.allclose(mlm_loss(logits, labels, None, 0.4), ce)
    assert torch.allclose(mlm_loss(logits, labels, soft, 0.0), ce)
    expected = 0.6 * ce + 0.4 * -(F.log_softmax(logits, 1) * soft).sum(1).mean()
    assert torch.allclose(mlm_loss(logits, labels, soft, 0.4), expected)
