"""GainAdamW: torch's AdamW to the bit without gains; with a gain, AdamW whose first moment
alone sees the scaled gradient (CPU, fast)."""
import copy
import math

import pytest
import torch

from albef_bal.engine.optim import GainAdamW


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(7, generator=g, dtype=dtype)),
            torch.nn.Parameter(torch.randn(2, 2, 2, generator=g, dtype=dtype))]


def _grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 10_000 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _groups(params, gains=(1.0, 1.0)):
    return [{"params": params[:2], "weight_decay": 0.1, "m_gain": gains[0]},
            {"params": params[2:], "weight_decay": 0.0, "m_gain": gains[1]}]


@pytest.mark.parametrize("kwargs", [{}, {"fused": True}, {"foreach": True}, {"amsgrad": True}])
def test_without_gains_it_steps_exactly_as_torch_adamw(kwargs):
    a, b = _params(), _params()
    ours = GainAdamW(_groups(a), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.02, **kwargs)
    ref = torch.optim.AdamW([{k: v for k, v in g.items() if k != "m_gain"} for g in _groups(b)], lr=1e-2,
                            betas=(0.9, 0.99), eps=1e-8, weight_decay=0.02, **kwargs)
    for step in range(6):
        for p, q, g in zip(a, b, _grads(a, step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    for p, q in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[p][key], ref.state[q][key])


def _hand_written(params, grads_per_step, gains_per_step, lr, betas, eps, wds, extras_per_step=None):
    """AdamW with the gain (and any addition) on the first moment only, float64."""
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    x = [p.detach().clone() for p in params]
    for t, (grads, gains) in enumerate(zip(grads_per_step, gains_per_step), start=1):
        for i, g in enumerate(grads):
            extra = 0.0 if extras_per_step is None or extras_per_step[t - 1][i] is None else extras_per_step[t - 1][i]
            m[i] = b1 * m[i] + (1 - b1) * (gains[i] * g + extra)
            v[i] = b2 * v[i] + (1 - b2) * g * g
            x[i] = x[i] * (1 - lr * wds[i])
            denom = (v[i] / (1 - b2 ** t)).sqrt() + eps
            x[i] = x[i] - lr * (m[i] / (1 - b1 ** t)) / denom
    return x


@pytest.mark.parametrize("fused", [False, True])
def test_moment_gain_equals_a_hand_written_adamw_with_the_gain_on_m_only(fused):
    params = _params(torch.float64)
    start = [p.detach().clone() for p in params]
    opt = GainAdamW(_groups(params), lr=5e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.0, fused=fused)
    schedule = [(0.3, 1.0), (0.3, 0.7), (1.0, 0.1), (0.55, 1.0), (0.0, 1.4)]
    grads_all, gains_all = [], []
    for step, (k0, k1) in enumerate(schedule):
        opt.param_groups[0]["m_gain"], opt.param_groups[1]["m_gain"] = k0, k1
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        grads_all.append(grads)
        gains_all.append([k0, k0, k1])
    want = _hand_written(start, grads_all, gains_all, 5e-2, (0.8, 0.95), 1e-8, [0.1, 0.1, 0.0])
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-13)


def test_first_moment_addition_reaches_m_and_not_v():
    params = _params(torch.float64)
    start = [p.detach().clone() for p in params]
    opt = GainAdamW(_groups(params, (0.5, 1.0)), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    grads_all, extras_all = [], []
    for step in range(4):
        grads = _grads(params, step)
        extras = [None, torch.full_like(params[1], 0.25 * (step + 1)), torch.randn_like(params[2])]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        for p, e in zip(params, extras):
            if e is not None:
                opt.add_first_moment(p, e)
        opt.step()
        grads_all.append(grads)
        extras_all.append(extras)
    want = _hand_written(start, grads_all, [[0.5, 0.5, 1.0]] * 4, 1e-2, (0.9, 0.999), 1e-8, [0.1, 0.1, 0.0],
                         extras_all)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-13)
    # the second moment saw the raw gradients only
    v_want = torch.zeros_like(params[2])
    for t in range(4):
        v_want = 0.999 * v_want + 0.001 * grads_all[t][2] ** 2
    torch.testing.assert_close(opt.state[params[2]]["exp_avg_sq"], v_want, rtol=1e-12, atol=0)
    assert not opt._m_extra  # additions are used once


def test_relative_addition_is_in_units_of_each_elements_rms_gradient():
    b1, b2 = 0.9, 0.99
    p = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
    opt = GainAdamW([p], lr=1e-2, betas=(b1, b2), eps=1e-8, weight_decay=0.0)
    # elements 0-1 never get a gradient: no noise may reach them (v = 0)
    scales = torch.tensor([0.0, 0.0, 1e-4, 1e-2, 1.0, 1e2], dtype=torch.float64)
    m = torch.zeros(6, dtype=torch.float64)
    v = torch.zeros(6, dtype=torch.float64)
    for t in range(1, 6):
        g = scales * (1.0 + 0.1 * t)
        z = torch.randn(1, generator=torch.Generator().manual_seed(t), dtype=torch.float64).expand(6).clone()
        p.grad = g.clone()
        opt.add_first_moment(p, z, relative=True)
        before = p.detach().clone()
        opt.step()
        v = b2 * v + (1 - b2) * g * g
        v_hat = v / (1 - b2 ** t)
        m = b1 * m + (1 - b1) * (g + z * v_hat.sqrt())
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-12, atol=1e-300)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, rtol=1e-12, atol=0)
        step = (before - p.detach()).abs()
        assert step[:2].max() == 0.0  # no gradient, no noise, no step
        # the same noise draw moves the normalised step alike for gradients 6 orders of
        # magnitude apart (noise of the tensor's std would swamp the small ones)
        torch.testing.assert_close(step[2:], step[2:].mean().expand(4), rtol=1e-3, atol=0)


def _steady_displacement(mode, k, steps=300, seed=3):
    """One scalar tensor with a noisy gradient of mean 1: the mean step size of the last
    half of ``steps`` AdamW steps (lr 1e-3, no weight decay)."""
    p = torch.nn.Parameter(torch.zeros(256, dtype=torch.float64))
    opt = GainAdamW([{"params": [p], "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grad = 1.0 + 2.0 * torch.randn(256, generator=g, dtype=torch.float64)  # heavy noise around 1
        if t == steps // 2:
            half = p.detach().clone()
        if mode == "grad":
            grad = grad * k  # OGM's grad mode: scales what both moments see
        elif mode == "moment":
            opt.param_groups[0]["m_gain"] = k
        p.grad = grad
        opt.step()
    return float((half - p.detach()).mean() / (steps - steps // 2))


def test_constant_gain_makes_the_steady_step_k_times_smaller_in_moment_mode_only():
    plain = _steady_displacement("none", 1.0)
    for k in (0.3, 0.6):
        moment = _steady_displacement("moment", k)
        grad = _steady_displacement("grad", k)
        assert moment / plain == pytest.approx(k, rel=0.02)  # k is a real step factor
        assert grad / plain == pytest.approx(1.0, rel=0.02)  # Adam's normalisation undoes it


def test_resume_from_a_state_dict_is_exact():
    a = _params()
    opt = GainAdamW(_groups(a, (0.4, 1.0)), lr=1e-2, fused=True)
    for step in range(3):
        for p, g in zip(a, _grads(a, step)):
            p.grad = g
        opt.step()
    saved_params = [p.detach().clone() for p in a]
    saved = copy.deepcopy(opt.state_dict())  # state_dict holds references to the live state
    assert [g["m_gain"] for g in saved["param_groups"]] == [0.4, 1.0]
    for step in range(3, 6):
        for p, g in zip(a, _grads(a, step)):
            p.grad = g
        opt.step()
    b = [torch.nn.Parameter(x.clone()) for x in saved_params]
    opt2 = GainAdamW(_groups(b), lr=1e-2, fused=True)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["m_gain"] == 0.4
    for step in range(3, 6):
        for p, g in zip(b, _grads(b, step)):
            p.grad = g
        opt2.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_bad_gains_are_refused():
    with pytest.raises(ValueError, match="m_gain must be a finite number >= 0"):
        GainAdamW([{"params": _params(), "m_gain": -1.0}])
    with pytest.raises(ValueError, match="m_gain must be a finite number >= 0"):
        GainAdamW([{"params": _params(), "m_gain": math.nan}])
    opt = GainAdamW(_params(), betas=(0.0, 0.99))
    opt.param_groups[0]["m_gain"] = 0.5
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"needs betas\[0\] > 0"):
        opt.step()
    with pytest.raises(ValueError, match=r"delta of shape \(3,\) for a parameter of shape \(5, 3\)"):
        opt.add_first_moment(opt.param_groups[0]["params"][0], torch.zeros(3))
