"""The balancing methods' formulas against hand-computed values (CPU, fast)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from albef_bal.balance import (content_token_tables, content_word_mask, down_up_sample, floor_weights,
                               gated_relearn_alpha, gaussian_blur, mix_uniform, patch_keep_indices, purity_gap_se,
                               weaken_strengths)
from albef_bal.balance import (GradCoefficient, cluster_purity, flat_dot, gblend_weights, ge_noise_like,
                               injection_term, kmeans_purity, make_branch_hook, min_norm_coefficient,
                               minmax_scale, mmpareto_combine, mmpareto_combine_with_stats, ogm_active,
                               ogm_coefficients, ogm_param_filter, mlb_coefficients, pseudo_labels, reinit_toward, relearn_alpha,
                               relearn_due, scale_grad, scale_to_count)


# ============================================================================ OGM-GE
def test_ogm_dominant_branch_gets_one_minus_tanh_alpha_rho():
    k_v, k_t = ogm_coefficients(0.6, 0.3, alpha=0.1)  # rho_v = 2, rho_t = 0.5
    assert k_v == pytest.approx(1 - math.tanh(0.1 * 2.0), abs=1e-15)
    assert k_t == 1.0
    k_v, k_t = ogm_coefficients(0.2, 0.8, alpha=0.5)  # rho_t = 4
    assert k_v == 1.0
    assert k_t == pytest.approx(1 - math.tanh(0.5 * 4.0), abs=1e-15)


def test_ogm_jumps_just_above_rho_one_and_is_one_at_equality():
    alpha = 0.1
    assert ogm_coefficients(0.5, 0.5, alpha) == (1.0, 1.0)
    k_v, k_t = ogm_coefficients(0.5 * (1 + 1e-9), 0.5, alpha)
    # tanh(alpha * rho), not tanh(alpha * (rho - 1)): just above 1 the coefficient is already
    # 1 - tanh(alpha), about 0.9; the (rho - 1) variant would give 1 - 1e-10
    assert k_v == pytest.approx(1 - math.tanh(alpha * 1.0), abs=1e-9)
    assert 1 - k_v > 0.09
    assert k_t == 1.0


def test_ogm_zero_and_nan_scores_are_safe():
    assert ogm_coefficients(0.4, 0.0, 0.1) == (0.0, 1.0)  # rho_v = inf -> 1 - tanh(inf)
    assert ogm_coefficients(0.0, 0.4, 0.1) == (1.0, 0.0)
    assert ogm_coefficients(0.0, 0.0, 0.1) == (1.0, 1.0)
    assert ogm_coefficients(float("nan"), 0.3, 0.1) == (1.0, 1.0)
    with pytest.raises(ValueError):
        ogm_coefficients(0.5, 0.4, -1.0)


def test_ogm_tensor_scores_match_float_scores():
    for s_v, s_t in [(0.6, 0.3), (0.3, 0.6), (0.5, 0.5), (0.4, 0.0), (0.0, 0.0)]:
        k_v, k_t = ogm_coefficients(torch.tensor(s_v), torch.tensor(s_t), 0.3)
        f_v, f_t = ogm_coefficients(s_v, s_t, 0.3)
        assert k_v.dim() == 0 and k_v.dtype == torch.float32
        assert float(k_v) == pytest.approx(f_v, abs=1e-6) and float(k_t) == pytest.approx(f_t, abs=1e-6)
    # a float and a tensor mix
    k_v, _ = ogm_coefficients(torch.tensor(0.9), 0.3, 0.2)
    assert float(k_v) == pytest.approx(1 - math.tanh(0.2 * 3.0), abs=1e-6)


def test_ogm_window_is_inclusive_at_both_ends():
    assert [e for e in range(10) if ogm_active(e, 2, 5)] == [2, 3, 4, 5]
    assert ogm_active(0, 0, 0)


def _two_branch_net(seed=0):
    torch.manual_seed(seed)
    net = nn.ModuleDict({"vis": nn.Linear(4, 3), "txt": nn.Linear(5, 3), "head": nn.Linear(3, 2)})
    x_v, x_t = torch.randn(8, 4), torch.randn(8, 5)
    return net, x_v, x_t


def _two_branch_loss(net, x_v, x_t, hook=None):
    h_v = torch.tanh(net["vis"](x_v))
    h_t = torch.tanh(net["txt"](x_t))
    if hook is not None:
        h_v = hook(h_v)
    fused = net["head"](h_v * h_t + h_v)  # the vision output reaches the loss by two paths
    uni_v = (h_v ** 2).mean()  # a unimodal loss on the vision branch only
    return fused.pow(2).mean() + uni_v, h_v


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("k", [0.25, 0.3])
def test_scale_grad_scales_one_branch_exactly(k):
    net, x_v, x_t = _two_branch_net()
    loss, _ = _two_branch_loss(net, x_v, x_t)
    loss.backward()
    base = _grads(net)
    net.zero_grad()

    holder = GradCoefficient(1.0)
    loss2, h_v = _two_branch_loss(net, x_v, x_t, hook=lambda h: scale_grad(h, holder))
    assert torch.equal(loss2, loss)  # identity in the forward
    holder.value = k  # set after the forward, read by the backward
    loss2.backward()
    got = _grads(net)
    for name in ("vis.weight", "vis.bias"):
        if k == 0.25:  # a power of two scales every float exactly
            assert torch.equal(got[name], k * base[name])
        else:
            # k * (g^T x) vs (k g)^T x: the same up to float32 rounding of the sums
            torch.testing.assert_close(got[name], k * base[name], rtol=1e-5, atol=1e-8)
    for name in ("txt.weight", "txt.bias", "head.weight", "head.bias"):
        assert torch.equal(got[name], base[name]), name


def test_scale_grad_accepts_tensor_coefficient_and_passes_through_without_grad():
    net, x_v, x_t = _two_branch_net()
    loss, _ = _two_branch_loss(net, x_v, x_t)
    loss.backward()
    base = _grads(net)
    net.zero_grad()
    holder = GradCoefficient()
    loss2, _ = _two_branch_loss(net, x_v, x_t, hook=lambda h: scale_grad(h, holder))
    holder.value = torch.tensor(0.5)
    loss2.backward()
    assert torch.equal(net["vis"].weight.grad, 0.5 * base["vis.weight"])
    x = torch.randn(3)
    assert scale_grad(x, holder) is x  # nothing to scale without autograd


def _tiny_albef():
    from albef_bal.config import ModelConfig, TextConfig, VisionConfig
    from albef_bal.models.albef import ALBEF
    cfg = ModelConfig(image_res=16, vision=VisionConfig(patch_size=8, width=16, depth=2, heads=2),
                      text=TextConfig(vocab_size=120, width=16, layers=3, fusion_layer=1, heads=2, intermediate=32,
                                      max_position=16),
                      embed_dim=8, queue_size=32)
    torch.manual_seed(0)
    return ALBEF(cfg).eval()  # eval: no dropout, so two forwards are identical


def _albef_step(model, batch):
    model.zero_grad()
    torch.manual_seed(1)  # same MLM masks and hard negatives in every call
    out = model(*batch, alpha=0.4, update=False)
    out.total().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_branch_hook_scales_exactly_the_vision_encoder_of_albef():
    model = _tiny_albef()
    g = torch.Generator().manual_seed(2)
    image = torch.randn(4, 3, 16, 16, generator=g)
    ids = torch.randint(104, 120, (4, 6), generator=g)
    ids[:, 0] = 101
    batch = (image, ids, torch.ones_like(ids))
    out_base, base = _albef_step(model, batch)

    holder = GradCoefficient()
    model.branch_hook = make_branch_hook({"vision": holder})
    holder.value = 0.25
    out, got = _albef_step(model, batch)
    assert torch.equal(out.total(), out_base.total())
    assert set(got) == set(base)
    n_vision = 0
    vision = {n for n, _ in model.branch_parameters()["vision"]}
    for name, grad in got.items():
        if name in vision:
            n_vision += 1
            assert torch.equal(grad, 0.25 * base[name]), name
            assert base[name].abs().sum() > 0, name
        else:
            assert torch.equal(grad, base[name]), name
    assert n_vision == sum(1 for n, _ in model.visual_encoder.named_parameters())


def test_adam_undoes_a_constant_gradient_scale_but_not_a_learning_rate_scale():
    """Why OGM offers an `lr` mode: AdamW divides by the root of the second moment, so a
    gradient multiplied by a constant k gives (almost) the same steps; a learning rate
    multiplied by k gives steps k times as long."""
    k, lr, steps = 0.1, 1e-2, 20
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 10, generator=g), torch.randn(64, generator=g)
    w0 = torch.randn(10, generator=g)

    def run(grad_scale=1.0, lr_scale=1.0):
        w = nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([w], lr=lr * lr_scale, weight_decay=0.02)
        for _ in range(steps):
            opt.zero_grad()
            ((X @ w - y) ** 2).mean().backward()
            w.grad.mul_(grad_scale)
            opt.step()
        return (w.detach() - w0).norm()

    base, scaled_grad, scaled_lr = run(), run(grad_scale=k), run(lr_scale=k)
    assert abs(scaled_grad / base - 1) < 1e-3
    assert scaled_lr / base == pytest.approx(k, rel=0.05)


def test_ge_noise_has_zero_mean_and_the_gradients_std():
    grad = torch.tensor([2.0, -2.0] * 500)  # mean 0, population variance 4
    expected_std = 2.0 * math.sqrt(1000 / 999)  # Bessel-corrected, as torch.std
    gen = torch.Generator().manual_seed(0)
    noise = torch.stack([ge_noise_like(grad, gen) for _ in range(200)])  # 200,000 draws
    assert noise.shape == (200, 1000)
    assert abs(noise.mean().item()) < 0.02
    assert noise.std().item() == pytest.approx(expected_std, rel=0.01)
    # the same seed on every rank gives the same noise
    a = ge_noise_like(grad, torch.Generator().manual_seed(5))
    b = ge_noise_like(grad, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # scale follows the gradient (std 0.001 -> noise std about 0.001)
    small = ge_noise_like(grad * 5e-4, torch.Generator().manual_seed(1))
    assert small.std().item() == pytest.approx(5e-4 * expected_std, rel=0.1)
    # dtype and shape follow the gradient; a one-element tensor gets only the eps floor
    half = ge_noise_like(torch.randn(4, 3, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.shape == (4, 3)
    assert ge_noise_like(torch.tensor([3.0])).abs().item() < 1e-6


def test_ogm_param_filter_takes_every_tensor_of_two_or_more_dims():
    assert ogm_param_filter("blocks.0.attn.qkv.weight", torch.empty(6, 2))
    assert ogm_param_filter("patch_embed.proj.weight", torch.empty(4, 3, 2, 2))
    assert ogm_param_filter("pos_embed", torch.empty(1, 5, 4))
    assert not ogm_param_filter("blocks.0.attn.qkv.bias", torch.empty(6))
    assert not ogm_param_filter("norm.weight", torch.empty(4))


# ============================================================ bidirectional rule (MLB)
def test_mlb_is_the_authors_formula_and_moves_both_branches():
    # k_u = 1 + tanh(alpha * (s_other / s_u - 1)); vision leads 0.6 : 0.3
    k_v, k_t = mlb_coefficients(0.6, 0.3, alpha=0.8)
    assert k_v == pytest.approx(1 + math.tanh(0.8 * (0.5 - 1)), abs=1e-15)  # the leader is slowed
    assert k_t == pytest.approx(1 + math.tanh(0.8 * (2.0 - 1)), abs=1e-15)  # the laggard is sped up
    assert k_v < 1 < k_t
    k_v, k_t = mlb_coefficients(0.1, 0.7, alpha=0.5)
    assert k_t < 1 < k_v


def test_mlb_is_one_at_equal_scores_and_continuous_through_it():
    for s in (0.01, 0.3, 0.99):
        assert mlb_coefficients(s, s, 0.8) == (1.0, 1.0)
    # no jump at rho = 1 (OGM's rule jumps to 1 - tanh(alpha) there): over a fine grid of s_v
    # around s_t, neighbouring coefficients differ by at most the derivative bound
    # |dk/ds_v| <= alpha * max(s_t / s_v^2, 1 / s_t) times the grid step
    alpha, s_t, h = 0.8, 0.4, 1e-4
    grid = [0.3 + i * h for i in range(2001)]  # 0.3 .. 0.5, through 0.4
    ks = [mlb_coefficients(s, s_t, alpha) for s in grid]
    bound = alpha * max(s_t / 0.3 ** 2, 1 / s_t) * h * 1.01
    for (a_v, a_t), (b_v, b_t) in zip(ks, ks[1:]):
        assert abs(a_v - b_v) <= bound and abs(a_t - b_t) <= bound
    k_up = mlb_coefficients(0.4 * (1 + 1e-9), 0.4, alpha)
    assert abs(k_up[0] - 1) < 1e-8 and abs(k_up[1] - 1) < 1e-8
    ogm_up = ogm_coefficients(0.4 * (1 + 1e-9), 0.4, alpha)
    assert 1 - ogm_up[0] > 0.5  # for contrast: OGM jumps


def test_mlb_edge_cases_and_tensor_scores():
    assert mlb_coefficients(0.0, 0.3, 0.8) == (2.0, pytest.approx(1 - math.tanh(0.8)))
    assert mlb_coefficients(0.0, 0.0, 0.8) == (1.0, 1.0)
    assert mlb_coefficients(float("nan"), 0.3, 0.8) == (1.0, 1.0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        mlb_coefficients(0.3, 0.2, -1.0)
    for s_v, s_t in ((0.6, 0.3), (0.2, 0.5), (0.4, 0.4), (0.0, 0.2), (0.0, 0.0)):
        want = mlb_coefficients(s_v, s_t, 0.8)
        got = mlb_coefficients(torch.tensor(s_v), torch.tensor(s_t), 0.8)
        assert all(isinstance(k, torch.Tensor) and k.dim() == 0 for k in got)
        assert [float(k) for k in got] == pytest.approx(list(want), abs=1e-6)


# ============================================================================ G-Blend
def test_gblend_weights_on_synthetic_curves():
    train_start, train_end = [2.0, 2.0, 2.0], [1.0, 1.5, 1.8]
    val_start, val_end = [2.2, 2.1, 2.0], [1.8, 1.7, 2.1]
    # G = val_start - val_end; O = (val_end - train_end) - (val_start - train_start)
    G = [2.2 - 1.8, 2.1 - 1.7, 2.0 - 2.1]
    O = [(1.8 - 1.0) - (2.2 - 2.0), (1.7 - 1.5) - (2.1 - 2.0), (2.1 - 1.8) - (2.0 - 2.0)]
    raw = [G[0] / O[0] ** 2, G[1] / O[1] ** 2, 0.0]  # the third loss got worse: weight 0
    expected = torch.tensor([r / sum(raw) for r in raw])
    f64 = dict(dtype=torch.float64)
    w = gblend_weights(torch.tensor(train_start, **f64), torch.tensor(train_end, **f64),
                       torch.tensor(val_start, **f64), torch.tensor(val_end, **f64))
    assert w.dtype == torch.float32 and w.shape == (3,)
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)
    assert float(w.sum()) == pytest.approx(1.0)
    w3 = gblend_weights(train_start, train_end, val_start, val_end, sum_to_count=True)
    torch.testing.assert_close(w3, 3 * expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scale_to_count(w), 3 * expected, rtol=1e-6, atol=1e-7)


def test_gblend_equal_weights_when_nothing_generalised():
    w = gblend_weights([1.0, 1.0], [0.5, 0.4], [1.0, 1.2], [1.1, 1.2])  # G = -0.1 and 0
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(gblend_weights([1.0, 1.0], [0.5, 0.4], [1.0, 1.2], [1.1, 1.2], sum_to_count=True),
                               torch.ones(2))


def test_gblend_eps_floors_a_vanishing_overfitting_term():
    eps = 1e-2
    # loss 0: train and val both drop by 0.5 -> G = 0.5, O = 0 -> 0.5 / eps
    # loss 1: val drops 0.5, train drops 1.0 -> G = 0.5, O = 0.5 -> 0.5 / 0.25
    # loss 2: O = 0.05, O^2 = 0.0025 < eps -> floored too
    w = gblend_weights([1.0, 1.0, 1.0], [0.5, 0.0, 0.45], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], eps=eps)
    raw = [0.5 / eps, 0.5 / (0.5 ** 2), 0.5 / eps]
    torch.testing.assert_close(w, torch.tensor([r / sum(raw) for r in raw]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        gblend_weights([1.0], [1.0], [1.0], [1.0, 2.0])


def test_gblend_floor_keeps_every_loss_trainable_and_the_others_ratios():
    # the collapse: losses 0 and 1 showed no held-out gain, so plain G-Blend gives them 0
    plain = gblend_weights([2.0, 2.0, 2.0], [1.9, 1.9, 1.5], [2.0, 2.0, 2.0], [2.1, 2.05, 1.8])
    torch.testing.assert_close(plain, torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(floor_weights(plain, 0.1), torch.tensor([0.1, 0.1, 0.8]))
    # weights above the floor keep their ratio (1 : 4 here); the floored one sits at the floor
    w = floor_weights([0.0, 0.2, 0.8], 0.1)
    torch.testing.assert_close(w, torch.tensor([0.1, 0.18, 0.72]))
    assert float(w.sum()) == pytest.approx(1.0)
    # a weight pushed under the floor by the rescale is floored too (the loop)
    w = floor_weights([0.0, 0.11, 0.89], 0.15)
    torch.testing.assert_close(w, torch.tensor([0.15, 0.15, 0.70]))
    torch.testing.assert_close(floor_weights([0.3, 0.3, 0.4], 0.1), torch.tensor([0.3, 0.3, 0.4]))  # no-op
    torch.testing.assert_close(floor_weights([0.0, 0.0, 1.0], 1 / 3), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match=r"floor must be in \[0, 1/3\]"):
        floor_weights([0.2, 0.3, 0.5], 0.4)


def test_gblend_uniform_mix():
    torch.testing.assert_close(mix_uniform([0.0, 0.0, 1.0], 0.3), torch.tensor([0.1, 0.1, 0.8]))
    torch.testing.assert_close(mix_uniform([0.0, 0.0, 2.0], 1.0), torch.full((3,), 1 / 3))  # normalised first
    torch.testing.assert_close(mix_uniform([0.2, 0.3, 0.5], 0.0), torch.tensor([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match=r"mix must be in \[0, 1\]"):
        mix_uniform([0.2, 0.3, 0.5], 1.5)


# ============================================================================ MMPareto
def _t(*xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


def test_mmpareto_no_conflict_uses_equal_weights_and_gamma():
    g_mm = [_t(1.0, 2.0), _t(0.5)]
    g_uni = [_t(2.0, 1.0), _t(0.5)]  # cos > 0
    out, st = mmpareto_combine_with_stats(g_mm, g_uni)
    assert float(st.c) == 0.5 and not bool(st.conflict)
    # new = 2 (0.5 m + 0.5 u) = m + u, so |m + u| / |new| = 1 and final = 1.5 (m + u)
    for o, m, u in zip(out, g_mm, g_uni):
        torch.testing.assert_close(o, 1.5 * (m + u))
    torch.testing.assert_close(st.scale, torch.full((2,), 1.5, dtype=torch.float64))


def test_mmpareto_conflict_closed_form_over_the_whole_branch():
    # one branch of two tensors; concatenated: m = (3, 0), u = (-1, 1)
    g_mm, g_uni = [_t(3.0), _t(0.0)], [_t(-1.0), _t(1.0)]
    c = (2.0 - (-3.0)) / (9.0 + 2.0 - 2 * (-3.0))  # (u.u - m.u) / |m - u|^2 = 5/17
    out, st = mmpareto_combine_with_stats(g_mm, g_uni)
    assert float(st.cos) == pytest.approx(-3.0 / (3.0 * math.sqrt(2.0)))
    assert float(st.c) == pytest.approx(c, abs=1e-15)
    new = [2 * (c * 3.0 + (1 - c) * -1.0), 2 * (1 - c) * 1.0]  # (6/17, 24/17)
    # per tensor: tensor 0 |m + u| = 2 > |new_0| -> rescaled up; tensor 1 |m + u| = 1 < |new_1|
    expected = [1.5 * (2.0 / new[0]) * new[0], 1.5 * new[1]]
    torch.testing.assert_close(torch.cat(out), _t(*expected))
    # global: one factor from the branch norms
    ratio = math.sqrt(2.0 ** 2 + 1.0 ** 2) / math.hypot(new[0], new[1])
    out_g, st_g = mmpareto_combine_with_stats(g_mm, g_uni, rescale="global")
    torch.testing.assert_close(torch.cat(out_g), _t(*[1.5 * max(1.0, ratio) * x for x in new]))
    assert st_g.scale.shape == (1,) and st.scale.shape == (2,)
    # the granularity matters: per tensor, the second tensor alone has cos = 0 and its own c
    # would differ; the branch-level c is the one used for both tensors
    assert float(st.c) != pytest.approx(float(mmpareto_combine_with_stats([g_mm[1]], [g_uni[1]])[1].c))


def test_mmpareto_no_conflict_guarantee():
    g_mm, g_uni = [_t(3.0), _t(0.0)], [_t(-1.0), _t(1.0)]
    out_g = mmpareto_combine(g_mm, g_uni, rescale="global")
    out_t = mmpareto_combine(g_mm, g_uni, rescale="tensor")
    # direction and global final: non-negative inner product with both gradients
    assert flat_dot(out_g, g_mm) >= 0 and flat_dot(out_g, g_uni) >= 0
    # per-tensor rescale stretches tensors unequally; here it turns against g_uni
    # (final = (3, 36/17): 3 * -1 + 36/17 * 1 < 0), which is why "global" exists
    torch.testing.assert_close(torch.cat(out_t), _t(3.0, 1.5 * 2 * (1 - 5 / 17)))
    assert flat_dot(out_t, g_uni) < 0

    # random conflicting branches of several tensors
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    for _ in range(200):
        m = [torch.randn(s, generator=gen, dtype=torch.float64) * torch.rand(1, generator=gen, dtype=torch.float64)
             for s in shapes]
        u = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        if flat_dot(m, u) > 0:
            u = [-x for x in u]
        new, st = mmpareto_combine_with_stats(m, u, gamma=1.0, rescale="global")
        assert bool(st.conflict)
        direction = [2 * (st.c * a + (1 - st.c) * b) for a, b in zip(m, u)]
        for d in (direction, new):
            assert flat_dot(d, m) >= -1e-12 and flat_dot(d, u) >= -1e-12


def test_mmpareto_c_ends():
    # literal clip: the minimiser 1e-4 / (1 + 1e-4) is below 0.001 -> 0.001
    m, u = [_t(1.0, 0.0)], [_t(-1e-4, 0.0)]
    assert float(mmpareto_combine_with_stats(m, u, c_rule="clip")[1].c) == pytest.approx(0.001, abs=1e-15)
    # the authors' solver keeps the exact minimiser inside (0, 1)
    assert float(mmpareto_combine_with_stats(m, u)[1].c) == pytest.approx(1e-4 / (1 + 1e-4), rel=1e-12)
    # upper end: the minimiser 1 / (1 + 1e-4) is above 0.999 -> 0.999
    m, u = [_t(1e-4, 0.0)], [_t(-1.0, 0.0)]
    assert float(mmpareto_combine_with_stats(m, u, c_rule="clip")[1].c) == pytest.approx(0.999, abs=1e-15)
    assert float(mmpareto_combine_with_stats(m, u)[1].c) == pytest.approx(1 / (1 + 1e-4), rel=1e-12)
    # the authors' ends: minimiser >= 1 (m.u >= |m|^2) -> 0.999; <= 0 (m.u >= |u|^2) -> 0.001
    one = torch.tensor(1.0, dtype=torch.float64)
    assert float(min_norm_coefficient(one * 1.0, one * 1.5, one * 4.0)) == 0.999
    assert float(min_norm_coefficient(one * 4.0, one * 1.5, one * 1.0)) == 0.001
    assert float(min_norm_coefficient(one * 4.0, one * 1.5, one * 1.0, rule="clip")) == 0.001
    # inside: (|u|^2 - m.u) / (|m|^2 + |u|^2 - 2 m.u)
    assert float(min_norm_coefficient(one * 4.0, -one, one * 2.0)) == pytest.approx((2.0 + 1.0) / (4.0 + 2.0 + 2.0))
    with pytest.raises(ValueError):
        min_norm_coefficient(one, one, one, rule="nope")


def test_mmpareto_clip_can_break_the_guarantee_the_authors_rule_keeps():
    m, u = [_t(1.0, 0.0)], [_t(-1e-4, 1e-5)]  # u nearly cancels a part of m
    for rule, ok in (("authors", True), ("clip", False)):
        _, st = mmpareto_combine_with_stats(m, u, c_rule=rule)
        d = [st.c * m[0] + (1 - st.c) * u[0]]
        assert (bool(flat_dot(d, u) >= 0) and bool(flat_dot(d, m) >= 0)) == ok, rule


def test_mmpareto_degenerate_inputs_stay_finite():
    m = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    zero = [torch.zeros(2), torch.zeros(1, 1)]
    # no unimodal gradient: cos = 0 -> conflict branch, c = 0.001, new = 0.002 m, rescaled
    # back to |m|: final = gamma * m
    out = mmpareto_combine(m, zero)
    for o, x in zip(out, m):
        torch.testing.assert_close(o, 1.5 * x)
    out = mmpareto_combine(zero, zero)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)
    # dtypes and shapes follow g_mm
    out = mmpareto_combine([x.bfloat16() for x in m], [x.bfloat16() for x in m])
    assert [o.dtype for o in out] == [torch.bfloat16] * 2 and [o.shape for o in out] == [x.shape for x in m]
    st = mmpareto_combine_with_stats(m, zero)[1]
    assert set(st.scalars("vision/")) == {"vision/cos", "vision/c", "vision/conflict", "vision/scale_mean",
                                          "vision/scale_max"}


# ============================================================================ injection
def test_injection_term_yields_exactly_the_target_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    params = list(net.parameters())
    loss = net(x).pow(2).mean()
    natural = torch.autograd.grad(loss, params, retain_graph=True)
    target = [torch.randn_like(p) for p in params]
    (loss + injection_term(params, target, natural)).backward()
    for p, t in zip(params, target):
        torch.testing.assert_close(p.grad, t, rtol=0, atol=1e-15)
    # data parallel: each rank injects (target - its own natural); the average is the target
    ranks = [[n + torch.randn_like(n) for n in natural] for _ in range(2)]
    avg = [sum(r[i] + (t - r[i]) for r in ranks) / 2 for i, t in enumerate(target)]
    for a, t in zip(avg, target):
        torch.testing.assert_close(a, t, rtol=0, atol=1e-14)


# ============================================================================ Re-learning
def test_cluster_purity_by_hand():
    labels = [0, 0, 0, 1, 1, 2]
    clusters = [5, 5, 7, 7, 7, 9]  # majorities: 5 -> 0 (2 of 2), 7 -> 1 (2 of 3), 9 -> 2 (1 of 1)
    assert cluster_purity(labels, clusters) == pytest.approx((2 + 2 + 1) / 6)
    assert cluster_purity(np.array([0, 0, 1, 1, 1]), np.zeros(5)) == pytest.approx(3 / 5)
    assert cluster_purity(torch.tensor([3, 3, 8]), torch.tensor([1, 1, 0])) == 1.0
    with pytest.raises(ValueError):
        cluster_purity([0, 1], [0])


def test_minmax_scale_by_hand():
    x = np.array([[0.0, 5.0, -2.0], [10.0, 5.0, 2.0], [5.0, 5.0, 0.0]])
    s = minmax_scale(x)
    np.testing.assert_allclose(s[:, 0], [-1.0, 1.0, 0.0])
    np.testing.assert_allclose(s[:, 1], [0.0, 0.0, 0.0])  # constant dimension -> middle
    np.testing.assert_allclose(s[:, 2], [-1.0, 1.0, 0.0])
    assert s.dtype == np.float32


def _blobs(n_per=30, d=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(3, d) * 10.0
    x = np.concatenate([c + rng.normal(0, 0.3, size=(n_per, d)) for c in centres])
    y = np.repeat(np.arange(3), n_per)
    return x.astype(np.float32), y


def test_kmeans_purity_on_toy_clusters():
    x, y = _blobs()
    assert kmeans_purity(x, y, seed=0, niter=20) == 1.0
    noisy = y.copy()
    noisy[:2] = 1  # two points of blob 0 labelled 1: blob 0's majority is still 0
    assert kmeans_purity(torch.from_numpy(x), noisy, k=3, seed=0, niter=20) == pytest.approx((28 + 30 + 30) / 90)


def test_pseudo_labels_recover_the_clusters_of_a_reference_encoder():
    x, y = _blobs(seed=1)
    labels = pseudo_labels(x, k=3, seed=0)
    assert labels.dtype == np.int64 and labels.shape == (90,)
    assert cluster_purity(y, labels) == 1.0 and cluster_purity(labels, y) == 1.0
    np.testing.assert_array_equal(labels, pseudo_labels(x, k=3, seed=0))


def test_relearn_alpha_values():
    assert relearn_alpha(0.9, 0.6) == pytest.approx(math.tanh(3 * (0.9 - 0.6)))
    assert relearn_alpha(0.6, 0.9, lam=2.0) == pytest.approx(math.tanh(2.0 * (0.9 - 0.6)))
    assert relearn_alpha(0.7, 0.7) == 0.0


def test_reinit_toward_interpolates_exactly():
    p = nn.Parameter(torch.tensor([2.0, 4.0]))
    reinit_toward([p], [torch.tensor([4.0, 0.0])], 0.25)
    assert torch.equal(p.data, torch.tensor([(1 - 0.25) * 2.0 + 0.25 * 4.0, (1 - 0.25) * 4.0 + 0.25 * 0.0]))

    gen = torch.Generator().manual_seed(0)
    cur = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    init = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    a = [t.clone() for t in cur]
    reinit_toward(a, init, 0.3)
    for x, c0, i0 in zip(a, cur, init):
        torch.testing.assert_close(x, (1 - 0.3) * c0 + 0.3 * i0, rtol=0, atol=1e-6)
    b = [t.clone() for t in cur]
    reinit_toward(b, init, 0.0)
    assert all(torch.equal(x, c0) for x, c0 in zip(b, cur))
    c = [t.clone() for t in cur]
    reinit_toward(c, init, 1.0)
    assert all(torch.equal(x, i0) for x, i0 in zip(c, init))
    # a bf16 copy (e.g. the model weights beside fp32 masters) takes the fp32 initial values
    h = [cur[0].bfloat16()]
    reinit_toward(h, [init[0]], 1.0)
    assert torch.equal(h[0], init[0].bfloat16())
    with pytest.raises(ValueError):
        reinit_toward(a, init, 1.5)


def test_relearn_fires_only_on_schedule():
    fired, done = [], 0
    for epoch in range(13):
        if relearn_due(epoch, every=3, max_times=2, done=done):
            fired.append(epoch)
            done += 1
    assert fired == [3, 6]
    assert not relearn_due(0, every=1, max_times=5, done=0)  # epoch 0 never fires
    assert relearn_due(1, every=1, max_times=5, done=0)
    assert not relearn_due(4, every=0, max_times=5, done=0)
    assert not relearn_due(4, every=2, max_times=0, done=0)


def test_relearn_threshold_on_constructed_purities():
    # SE of the gap: sqrt(P_t (1 - P_t) / N_t + P_v (1 - P_v) / N_v)
    assert purity_gap_se(0.52, 500, 0.50, 500) == pytest.approx(math.sqrt(0.52 * 0.48 / 500 + 0.25 / 500))
    se = purity_gap_se(0.52, 500, 0.50, 500)  # about 0.032: a 0.02 gap is within the noise
    assert gated_relearn_alpha(0.52, 0.50, 500, 500, lam=3.0, min_gap_se=1.0) == 0.0
    assert gated_relearn_alpha(0.52, 0.50, 500, 500, lam=3.0, min_gap_se=0.0) == pytest.approx(math.tanh(0.06))
    # the same gap measured on 100x more samples is real
    assert gated_relearn_alpha(0.52, 0.50, 50_000, 50_000, lam=3.0, min_gap_se=1.0) == pytest.approx(math.tanh(0.06))
    # a large gap passes; the gate compares with min_gap_se standard errors exactly
    assert gated_relearn_alpha(0.9, 0.5, 500, 500, 3.0, 1.0) == pytest.approx(math.tanh(1.2))
    p_v = 0.5 - 2 * se
    assert gated_relearn_alpha(0.5, p_v, 500, 500, 3.0, 2.5) == 0.0
    assert gated_relearn_alpha(0.5, p_v, 500, 500, 3.0, 1.5) > 0.0
    with pytest.raises(ValueError, match="subset sizes must be >= 1"):
        purity_gap_se(0.5, 0, 0.5, 10)


def test_relearn_threshold_silences_pure_noise():
    """Random features and random labels at 500 samples per subset: the authors' rule
    re-learns on almost every draw; the one-standard-error gate on almost none."""
    ungated, gated = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        p_t = kmeans_purity(rng.normal(size=(500, 32)), rng.integers(0, 10, 500), seed=0)
        p_v = kmeans_purity(rng.normal(size=(500, 32)), rng.integers(0, 10, 500), seed=0)
        ungated.append(relearn_alpha(p_t, p_v))
        gated.append(gated_relearn_alpha(p_t, p_v, 500, 500, 3.0, 1.0))
        if abs(p_t - p_v) <= purity_gap_se(p_t, 500, p_v, 500):
            assert gated[-1] == 0.0
    assert sum(a > 0 for a in ungated) >= 5
    assert sum(a > 0 for a in gated) <= 2 and sum(gated) < sum(ungated) / 3


# ============================================================================ weakening
def test_weaken_strength_grows_with_the_imbalance_for_the_leader_only():
    s_v, s_t = weaken_strengths(0.6, 0.3, max_strength=0.5, beta=2.0)
    assert s_v == pytest.approx(0.5 * math.tanh(2.0 * (2.0 - 1.0))) and s_t == 0.0
    assert weaken_strengths(0.3, 0.6, 0.5, 2.0) == (0.0, pytest.approx(s_v))
    assert weaken_strengths(0.4, 0.4, 0.5, 2.0) == (0.0, 0.0)
    previous = 0.0
    for lead in (0.41, 0.45, 0.5, 0.6, 0.8, 0.99):  # monotone in the ratio, bounded by max_strength
        s, _ = weaken_strengths(lead, 0.4, 0.5, 2.0)
        assert previous < s < 0.5
        previous = s
    assert weaken_strengths(0.45, 0.4, 0.5, 2.0, margin=0.2) == (0.0, 0.0)  # inside the margin
    assert weaken_strengths(0.3, 0.0, 0.5, 2.0) == (0.5, 0.0)
    assert weaken_strengths(float("nan"), 0.3, 0.5, 2.0) == (0.0, 0.0)


def test_patch_keep_indices_drop_a_random_share_per_image():
    g = torch.Generator().manual_seed(0)
    keep = patch_keep_indices(3, 16, 0.25, g)
    assert keep.shape == (3, 12) and keep.dtype == torch.long
    for row in keep:
        assert row.unique().numel() == 12 and bool((row[1:] > row[:-1]).all()) and int(row.max()) < 16
    assert not torch.equal(keep[0], keep[1])  # a different subset per image
    assert patch_keep_indices(2, 16, 1.0, g).shape == (2, 1)  # at least one patch stays
    assert torch.equal(patch_keep_indices(2, 16, 0.0, g), torch.arange(16).expand(2, -1))
    a = patch_keep_indices(2, 16, 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(a, patch_keep_indices(2, 16, 0.5, torch.Generator().manual_seed(5)))  # seeded


def test_blur_and_down_sampling_remove_detail_and_keep_flat_images():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 32, 32, generator=g)
    flat = torch.full((1, 3, 32, 32), 0.7)
    assert torch.equal(gaussian_blur(noise, 0.0), noise) and torch.equal(down_up_sample(noise, 0.0), noise)
    torch.testing.assert_close(gaussian_blur(flat, 1.5), flat)
    torch.testing.assert_close(down_up_sample(flat, 0.5), flat)
    # more strength, less high-frequency energy (white noise loses variance under a low-pass)
    stds = [float(gaussian_blur(noise, s).std()) for s in (0.5, 1.0, 2.0)]
    assert stds[0] < float(noise.std()) and stds[0] > stds[1] > stds[2]
    downs = [float(down_up_sample(noise, s).std()) for s in (0.25, 0.5, 0.75)]
    assert downs[0] < float(noise.std()) and downs[0] > downs[1] > downs[2]
    assert gaussian_blur(noise, 1.0).shape == noise.shape == down_up_sample(noise, 0.5).shape
    # the blur is a normalised Gaussian: a centred impulse spreads as exp(-x^2 / (2 sigma^2))
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    out = gaussian_blur(impulse, 1.0)[0, 0]
    assert float(out.sum()) == pytest.approx(1.0, rel=1e-5)
    assert float(out[7, 8] / out[7, 7]) == pytest.approx(math.exp(-0.5), rel=1e-5)


def test_content_words_skip_function_words_specials_and_padding():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "a": 5, "red": 6, "circle": 7, "on": 8,
             "the": 9, "left": 10, "##ish": 11, ".": 12}
    content, cont = content_token_tables(vocab, [0, 2, 3, 4])
    assert [i for i in range(13) if content[i]] == [6, 7, 10] and [i for i in range(13) if cont[i]] == [11]
    everything, _ = content_token_tables(vocab, [0, 2, 3, 4], stopwords=False)
    assert [i for i in range(13) if everything[i]] == [5, 6, 7, 8, 9, 10]  # [UNK] is special too
    # [CLS] a red ##ish circle on the left . [SEP] [PAD]
    ids = torch.tensor([[2, 5, 6, 11, 7, 8, 9, 10, 12, 3, 0]])
    mask = (ids != 0).long()
    chosen = content_word_mask(ids, mask, content, cont, 1.0, torch.Generator().manual_seed(0))
    assert chosen.long().tolist() == [[0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0]]  # "red##ish" as one word
    assert not content_word_mask(ids, mask, content, cont, 0.0, torch.Generator()).any()
    # each word with probability p: over many rows, about p of the content words
    many = torch.tensor([[2, 6, 7, 10, 3]] * 4000)
    share = content_word_mask(many, torch.ones_like(many), content, cont, 0.3,
                              torch.Generator().manual_seed(1)).float()[:, 1:4].mean()
    assert float(share) == pytest.approx(0.3, abs=0.02)
    # a continuation never moves without its word's first piece
    for seed in range(20):
        c = content_word_mask(ids, mask, content, cont, 0.5, torch.Generator().manual_seed(seed))
        assert bool(c[0, 2]) == bool(c[0, 3])


# ============================================================================ roles
def test_branch_parameters_assign_albef_roles():
    model = _tiny_albef()  # fusion from text layer 1
    roles = {n: b for b, named in model.branch_parameters().items() for n, _ in named}
    assert roles["visual_encoder.blocks.0.attn.qkv.weight"] == "vision"
    assert roles["visual_encoder.pos_embed"] == "vision"
    assert roles["text_encoder.embeddings.word_embeddings.weight"] == "text"
    assert roles["text_encoder.encoder.layer.0.output.dense.weight"] == "text"
    assert roles["text_encoder.encoder.layer.1.crossattention.self.key.weight"] == "shared"
    for name in ("vision_proj.weight", "text_proj.bias", "itm_head.weight", "temp"):
        assert roles[name] == "shared"
    assert not any("_m." in n for n in roles)  # momentum copies are not trained
