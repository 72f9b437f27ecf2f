"""Unit tests of wpo_ray.losses (docs/DESIGN.md).

Expected values come from the formulas, worked out here in numpy/math float64, never from the code
under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wpo_ray.config import FocalConfig, GammaPOConfig, LossConfig, MARGIN_BASES, SIGMOID_BASES
from wpo_ray.losses import (
    GammaPOMargins,
    LossOutput,
    dist_gather_fn,
    gamma_po_margins,
    preference_loss,
    reward_gaps,
)

ALL_BASES = ("dpo", "cdpo", "robust", "hinge", "ipo", "dpop", "simpo")
LN2 = math.log(2.0)

# Four pairs with different lengths; dpop's penalty max(0, ρ_w − π_w) is active on pairs 1 and 2 only.
PC = np.array([-10.0, -20.0, -5.0, -8.0])
PR = np.array([-12.0, -18.0, -9.0, -8.5])
RC = np.array([-11.0, -19.0, -4.0, -8.2])
RR = np.array([-11.5, -19.5, -8.0, -8.0])
LC = np.array([5.0, 10.0, 3.0, 7.0])
LR = np.array([6.0, 8.0, 4.0, 2.0])


def t(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64)


def cfg_for(base: str, **kw) -> LossConfig:
    """The numpy reference's constants (β 0.1, γ_simpo 0.5), not the per-base defaults."""
    kw.setdefault("beta", 0.1)
    if base == "simpo":
        kw.setdefault("simpo_gamma", 0.5)
    return LossConfig(base=base, **kw)


def run(cfg, pc=PC, pr=PR, rc=RC, rr=RR, lc=LC, lr=LR, w=None, margins=None) -> LossOutput:
    w = np.ones_like(pc) if w is None else w
    return preference_loss(
        cfg, t(pc), t(pr), t(rc), t(rr), t(lc), t(lr), t(w), None if margins is None else t(margins)
    )


# ------------------------------------------------------------------ independent numpy reference


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_delta(base, pc, pr, rc, rr, lc, lr, beta, lam):
    if base == "simpo":
        return beta * (pc / lc - pr / lr)
    if base == "ipo":
        return (pc - rc) / lc - (pr - rr) / lr
    d = beta * ((pc - rc) - (pr - rr))
    if base == "dpop":
        d = d - beta * lam * np.maximum(0.0, rc - pc)
    return d


def np_losses(base, pc=PC, pr=PR, rc=RC, rr=RR, lc=LC, lr=LR, w=None, *, beta=0.1, eps=0.0,
              lam=50.0, sg=0.5, placement="margin", margins=None, ratio=0.5, focal=0.0):
    w = np.ones_like(pc) if w is None else np.asarray(w, dtype=np.float64)
    delta = np_delta(base, pc, pr, rc, rr, lc, lr, beta, lam)
    if base == "simpo":
        target = sg if margins is None else margins
    else:
        target = 0.0 if margins is None else margins - ratio * beta
    z = (w * delta if placement == "margin" else delta) - target
    f = {
        "dpo": -np_logsig(z),
        "dpop": -np_logsig(z),
        "simpo": -np_logsig(z),
        "cdpo": -(1 - eps) * np_logsig(z) - eps * np_logsig(-z),
        "robust": (-(1 - eps) * np_logsig(z) + eps * np_logsig(-z)) / (1 - 2 * eps),
        "hinge": np.maximum(0.0, 1 - z),
        "ipo": (z - 1 / (2 * beta)) ** 2,
    }[base]
    if focal:
        p = 1.0 / (1.0 + np.exp(-z))
        f = f * p**focal
    return w * f if placement == "loss" else f


def np_gamma_po(r, gamma0, tau, steps=20):
    """Plain (not log-space) exponentiated gradient, straight from docs/DESIGN.md."""
    r = np.asarray(r, dtype=np.float64)
    B = len(r)
    p = np.full(B, 1.0 / B)
    eta = min(0.5 / tau, 1.0)
    for _ in range(steps):
        m = gamma0 * B * p
        g = tau * (1 + np.log(B * p)) + gamma0 / (1 + np.exp(-(m - r)))
        p = p * np.exp(-eta * g)
        p = p / p.sum()
    return gamma0 * B * p


def base_kwargs(base, eps=0.1):
    return {"label_smoothing": eps} if base in ("cdpo", "robust") else {}


# ------------------------------------------------------------------------------- base values


@pytest.mark.parametrize(
    "base,eps", [("dpo", 0), ("cdpo", 0.1), ("cdpo", 0.2), ("robust", 0.1), ("robust", 0.2),
                 ("hinge", 0), ("ipo", 0), ("dpop", 0), ("simpo", 0)]
)
def test_base_values_match_hand_computation(base, eps):
    kw = {"label_smoothing": eps} if eps else {}
    out = run(cfg_for(base, beta=0.1, **kw))
    expected = np_losses(base, beta=0.1, eps=eps)
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert out.loss.item() == pytest.approx(expected.mean(), rel=1e-12)
    assert out.losses.shape == (4,)


def test_dpo_single_pair_literal():
    # β = 0.1, π−ρ = +1 on chosen and −1 on rejected: Δ = 0.2, loss = log(1 + e^−0.2).
    out = preference_loss(cfg_for("dpo", beta=0.1), t([-4.0]), t([-6.0]), t([-5.0]), t([-5.0]),
                          t([3]), t([3]), t([1.0]))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-14)


def test_ipo_and_simpo_use_lengths():
    # IPO: Δ = 1/5 − (−1)/2 = 0.7; target 1/(2·0.25) = 2; loss (0.7 − 2)² = 1.69.
    out = preference_loss(cfg_for("ipo", beta=0.25), t([-4.0]), t([-6.0]), t([-5.0]), t([-5.0]),
                          t([5]), t([2]), t([1.0]))
    assert out.loss.item() == pytest.approx(1.69, rel=1e-12)
    # SimPO: Δ = 2(−4/4 − (−6/2)) = 4; loss −log σ(4 − 0.5).
    cfg = cfg_for("simpo", beta=2.0, simpo_gamma=0.5)
    out = preference_loss(cfg, t([-4.0]), t([-6.0]), None, None, t([4]), t([2]), t([1.0]))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-3.5)), rel=1e-12)


def test_dpop_penalty_only_where_policy_below_reference():
    dpo = run(cfg_for("dpo")).losses.numpy()
    dpop = run(cfg_for("dpop", dpop_lambda=50.0)).losses.numpy()
    inactive, active = RC <= PC, RC > PC
    assert inactive.any() and active.any()
    np.testing.assert_allclose(dpop[inactive], dpo[inactive], rtol=1e-14)
    assert np.all(dpop[active] > dpo[active] + 1.0)  # λ = 50 makes the penalty large
    # λ = 0 is plain DPO.
    np.testing.assert_allclose(run(cfg_for("dpop", dpop_lambda=0.0)).losses.numpy(), dpo, rtol=1e-14)


@pytest.mark.parametrize("base,eps", [("dpo", 0), ("cdpo", 0.1), ("cdpo", 0.2), ("robust", 0.1),
                                      ("robust", 0.2), ("dpop", 0)])
@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_policy_equals_reference_gives_ln2(base, eps, placement):
    kw = {"label_smoothing": eps} if eps else {}
    w = np.array([1.0, 1.0, 1.0, 1.0]) if placement == "loss" else np.array([0.3, 1.0, 2.5, 7.0])
    out = run(cfg_for(base, weight_placement=placement, **kw), rc=PC, rr=PR, w=w)
    np.testing.assert_allclose(out.losses.numpy(), LN2, rtol=1e-14)
    assert out.loss.item() == pytest.approx(LN2, rel=1e-14)


# ------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("base", ALL_BASES)
@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_unit_weights_are_unweighted(base, placement):
    kw = base_kwargs(base)
    out = run(cfg_for(base, weight_placement=placement, **kw), w=np.ones(4))
    expected = np_losses(base, eps=kw.get("label_smoothing", 0.0))  # no weight at all
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("base", ALL_BASES)
@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_weight_placement_values(base, placement):
    kw = base_kwargs(base)
    w = np.array([1.0, 2.5, 0.5, 2.5])
    out = run(cfg_for(base, weight_placement=placement, **kw), w=w)
    expected = np_losses(base, w=w, placement=placement, eps=kw.get("label_smoothing", 0.0))
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-12)
    # the two placements genuinely differ when w ≠ 1
    other = "loss" if placement == "margin" else "margin"
    alt = np_losses(base, w=w, placement=other, eps=kw.get("label_smoothing", 0.0))
    assert not np.allclose(expected[1], alt[1])


def test_weight_placement_literal_dpo():
    # Δ = 0.2, w = 2.5: margin → −log σ(0.5); loss → 2.5 · (−log σ(0.2)).
    args = (t([-4.0]), t([-6.0]), t([-5.0]), t([-5.0]), t([3]), t([3]), t([2.5]))
    m = preference_loss(cfg_for("dpo", beta=0.1, weight_placement="margin"), *args)
    l = preference_loss(cfg_for("dpo", beta=0.1, weight_placement="loss"), *args)
    assert m.loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-14)
    assert l.loss.item() == pytest.approx(2.5 * math.log1p(math.exp(-0.2)), rel=1e-14)


def _grads(cfg, w):
    pc = t(PC).requires_grad_()
    pr = t(PR).requires_grad_()
    out = preference_loss(cfg, pc, pr, t(RC), t(RR), t(LC), t(LR), t(w))
    out.loss.backward()
    return pc.grad.numpy(), pr.grad.numpy()


@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_weight_gradient_scaling(placement):
    beta, B = 0.1, 4
    w = np.array([1.0, 2.5, 1.0, 1.0])
    cfg = cfg_for("dpo", beta=beta, weight_placement=placement)
    gc, gr = _grads(cfg, w)
    gc1, gr1 = _grads(cfg, np.ones(4))
    delta = beta * ((PC - RC) - (PR - RR))
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    # d/dπ_w of −log σ(w·Δ)/B = −w·β·σ(−w·Δ)/B;  of w·(−log σ(Δ))/B = −w·β·σ(−Δ)/B.
    if placement == "margin":
        expected = -w * beta * sig(-w * delta) / B
    else:
        expected = -w * beta * sig(-delta) / B
        assert gc[1] == pytest.approx(2.5 * gc1[1], rel=1e-12)  # loss placement: grad ∝ w
    np.testing.assert_allclose(gc, expected, rtol=1e-12)
    np.testing.assert_allclose(gr, -expected, rtol=1e-12)
    others = [0, 2, 3]
    np.testing.assert_array_equal(gc[others], gc1[others])
    np.testing.assert_array_equal(gr[others], gr1[others])
    assert gc[1] != pytest.approx(gc1[1])


# ------------------------------------------------------------------------------------ FocalPO


@pytest.mark.parametrize("base", SIGMOID_BASES)
@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_focal_gamma_zero_is_exactly_base(base, placement):
    kw = base_kwargs(base)
    w = np.array([1.0, 2.5, 0.5, 1.5])
    plain = run(cfg_for(base, weight_placement=placement, **kw), w=w)
    focal0 = run(cfg_for(base, weight_placement=placement, focal=FocalConfig(gamma=0.0), **kw), w=w)
    assert torch.equal(plain.losses, focal0.losses)
    assert "focal/factor_mean" not in focal0.metrics


@pytest.mark.parametrize("base", SIGMOID_BASES)
@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_focal_gamma_two_values(base, placement):
    kw = base_kwargs(base, eps=0.2)
    w = np.array([1.0, 2.5, 0.5, 1.5])
    out = run(cfg_for(base, weight_placement=placement, focal=FocalConfig(gamma=2.0), **kw), w=w)
    expected = np_losses(base, w=w, placement=placement, focal=2.0,
                         eps=kw.get("label_smoothing", 0.0))
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-12)


def test_focal_dpo_literal_and_factor_metric():
    # Δ = 0.2: p = σ(0.2); loss = −p² log p.
    p = 1 / (1 + math.exp(-0.2))
    cfg = cfg_for("dpo", beta=0.1, focal=FocalConfig(gamma=2.0))
    out = preference_loss(cfg, t([-4.0]), t([-6.0]), t([-5.0]), t([-5.0]), t([3]), t([3]), t([1.0]))
    assert out.loss.item() == pytest.approx(-(p**2) * math.log(p), rel=1e-13)
    assert out.metrics["focal/factor_mean"] == pytest.approx(p**2, rel=1e-13)


def test_focal_detach_changes_gradient_not_value():
    beta, gamma, B = 0.1, 2.0, 4
    res = {}
    for detach in (False, True):
        cfg = cfg_for("dpo", beta=beta, focal=FocalConfig(gamma=gamma, detach=detach))
        pc = t(PC).requires_grad_()
        out = preference_loss(cfg, pc, t(PR), t(RC), t(RR), t(LC), t(LR), t(np.ones(4)))
        out.loss.backward()
        res[detach] = (out.losses.detach().numpy(), pc.grad.numpy())
    np.testing.assert_array_equal(res[False][0], res[True][0])
    z = beta * ((PC - RC) - (PR - RR))
    p = 1 / (1 + np.exp(-z))
    # L = −p^γ log p: dL/dz = −p^γ(1−p)(γ log p + 1); with the factor detached: −p^γ(1−p).
    full = -(p**gamma) * (1 - p) * (gamma * np.log(p) + 1) * beta / B
    detached = -(p**gamma) * (1 - p) * beta / B
    np.testing.assert_allclose(res[False][1], full, rtol=1e-12)
    np.testing.assert_allclose(res[True][1], detached, rtol=1e-12)
    assert not np.allclose(full, detached)


# --------------------------------------------------------------------------------------- γ-PO


def test_gamma_po_huge_tau_gives_gamma0():
    gaps = t(np.random.default_rng(0).normal(0, 3, size=64))
    m = gamma_po_margins(gaps, gamma0=0.05, tau=1e9)
    np.testing.assert_allclose(m.numpy(), 0.05, rtol=1e-8)


@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0, 10.0, 100.0])
def test_gamma_po_mean_is_gamma0_and_matches_plain_eg(tau):
    rng = np.random.default_rng(int(tau * 100))
    r = rng.normal(0, 1, size=37)
    m = gamma_po_margins(t(r), gamma0=0.3, tau=tau)
    assert m.mean().item() == pytest.approx(0.3, rel=1e-12)
    np.testing.assert_allclose(m.numpy(), np_gamma_po(r, 0.3, tau), rtol=1e-9)
    assert m.dtype == torch.float64 and not m.requires_grad


@pytest.mark.parametrize("tau", [0.5, 1.0, 10.0])
def test_gamma_po_margins_increase_with_gap(tau):
    r = np.sort(np.random.default_rng(3).normal(0, 1, size=50))
    m = gamma_po_margins(t(r), gamma0=0.5, tau=tau).numpy()
    assert np.all(np.diff(m) > 0)
    assert m[0] < 0.5 < m[-1]


def test_gamma_po_single_gap_and_no_grad():
    g = t([1.5]).requires_grad_()
    m = gamma_po_margins(g, gamma0=0.2, tau=1.0)
    assert m.item() == pytest.approx(0.2, rel=1e-14)
    assert not m.requires_grad


@pytest.mark.parametrize("base", MARGIN_BASES)
@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_gamma_po_margins_in_loss(base, placement):
    kw = base_kwargs(base)
    w = np.array([1.0, 2.5, 0.5, 1.5])
    margins = np.array([0.01, 0.09, 0.04, 0.06])  # mean 0.05 = γ0 = 0.5·0.1
    cfg = cfg_for(base, beta=0.1, weight_placement=placement,
                  gamma_po=GammaPOConfig(enabled=True, ratio=0.5), **kw)
    out = run(cfg, w=w, margins=margins)
    expected = np_losses(base, w=w, placement=placement, margins=margins, ratio=0.5,
                         eps=kw.get("label_smoothing", 0.0))
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-12)
    assert out.metrics["gamma_po/margin_mean"] == pytest.approx(0.05, rel=1e-12)
    assert out.metrics["gamma_po/margin_std"] == pytest.approx(np.std(margins), rel=1e-12)


def test_gamma_po_simpo_margin_replaces_gamma_and_dpo_uses_offset():
    # SimPO: Δ = 2(−1 − (−3)) = 4, m = 1.25 replaces γ_simpo = 0.5 → −log σ(2.75).
    cfg = cfg_for("simpo", beta=2.0, simpo_gamma=0.5, gamma_po=GammaPOConfig(enabled=True))
    out = preference_loss(cfg, t([-4.0]), t([-6.0]), None, None, t([4]), t([2]), t([1.0]), t([1.25]))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-2.75)), rel=1e-13)
    # DPO: Δ = 0.2, γ0 = 0.5·0.1 = 0.05, m = 0.15 → offset 0.1 → −log σ(0.1).
    cfg = cfg_for("dpo", beta=0.1, gamma_po=GammaPOConfig(enabled=True, ratio=0.5))
    out = preference_loss(cfg, t([-4.0]), t([-6.0]), t([-5.0]), t([-5.0]), t([3]), t([3]),
                          t([1.0]), t([0.15]))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), rel=1e-13)


def test_margins_get_no_gradient():
    cfg = cfg_for("dpo", gamma_po=GammaPOConfig(enabled=True))
    m = t([0.01, 0.09, 0.04, 0.06]).requires_grad_()
    pc = t(PC).requires_grad_()
    out = preference_loss(cfg, pc, t(PR), t(RC), t(RR), t(LC), t(LR), t(np.ones(4)), m)
    out.loss.backward()
    assert m.grad is None and pc.grad is not None


@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_reward_gaps(placement):
    w = np.array([1.0, 2.5, 0.5, 1.5])
    cfg = cfg_for("dpop", beta=0.1, weight_placement=placement)
    pc = t(PC).requires_grad_()
    gaps = reward_gaps(cfg, pc, t(PR), t(RC), t(RR), t(LC), t(LR), t(w))
    delta = np_delta("dpop", PC, PR, RC, RR, LC, LR, 0.1, 50.0)
    np.testing.assert_allclose(gaps.numpy(), w * delta if placement == "margin" else delta,
                               rtol=1e-13)
    assert not gaps.requires_grad
    # simpo needs no reference
    g = reward_gaps(cfg_for("simpo", beta=2.0), t([-4.0]), t([-6.0]), None, None, t([4]), t([2]),
                    t([1.0]))
    assert g.item() == pytest.approx(4.0)


def _gpo(pool_size=256, queue_size=2048, tau=1.0, ratio=0.5, beta=0.1, gather_fn=None):
    cfg = GammaPOConfig(enabled=True, ratio=ratio, tau=tau, pool_size=pool_size,
                        queue_size=queue_size)
    return GammaPOMargins(cfg, beta=beta, gather_fn=gather_fn)


def test_queue_pool_uses_most_recent_gaps():
    rng = np.random.default_rng(7)
    a, b, c = rng.normal(size=3), rng.normal(size=3), rng.normal(size=2)
    g = _gpo(pool_size=6)
    np.testing.assert_allclose(g(t(a)).numpy(), np_gamma_po(a, 0.05, 1.0), rtol=1e-9)
    g(t(b))
    # pool = c + the 4 most recent queued gaps [a2, b0, b1, b2]
    pool = np.concatenate([c, a[2:], b])
    np.testing.assert_allclose(g(t(c)).numpy(), np_gamma_po(pool, 0.05, 1.0)[:2], rtol=1e-9)


def test_queue_pool_size_caps_queue_use():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=4), rng.normal(size=3)
    g = _gpo(pool_size=2)
    g(t(a))
    # the batch alone exceeds pool_size: pool is the batch, no queued gaps
    np.testing.assert_allclose(g(t(b)).numpy(), np_gamma_po(b, 0.05, 1.0), rtol=1e-9)


def test_queue_fifo_drops_oldest():
    g = _gpo(pool_size=100, queue_size=4)
    g(t([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(g.state_dict()["queue"].numpy(), [1.0, 2.0, 3.0])
    g(t([4.0, 5.0, 6.0]))
    np.testing.assert_array_equal(g.state_dict()["queue"].numpy(), [3.0, 4.0, 5.0, 6.0])
    # next pool = batch + the 4 queued gaps
    np.testing.assert_allclose(g(t([7.0])).numpy(),
                               np_gamma_po([7.0, 3.0, 4.0, 5.0, 6.0], 0.05, 1.0)[:1], rtol=1e-9)
    np.testing.assert_array_equal(g.state_dict()["queue"].numpy(), [4.0, 5.0, 6.0, 7.0])


def test_queue_size_zero_keeps_nothing():
    g = _gpo(queue_size=0)
    g(t([1.0, 2.0]))
    assert g.state_dict()["queue"].numel() == 0
    np.testing.assert_allclose(g(t([0.5, -0.5])).numpy(), np_gamma_po([0.5, -0.5], 0.05, 1.0),
                               rtol=1e-9)


def test_gather_hook_returns_our_slice():
    rng = np.random.default_rng(9)
    r0, r1, r2 = rng.normal(size=3), rng.normal(size=3), rng.normal(size=2)

    def fake_gather(gaps):  # we are rank 1 of 3
        return torch.cat([t(r0), gaps, t(r2)]), 3

    g = _gpo(gather_fn=fake_gather)
    pool = np.concatenate([r0, r1, r2])
    np.testing.assert_allclose(g(t(r1)).numpy(), np_gamma_po(pool, 0.05, 1.0)[3:6], rtol=1e-9)
    # every rank's gaps went into the queue
    np.testing.assert_array_equal(g.state_dict()["queue"].numpy(), pool)

    bad = _gpo(gather_fn=lambda gaps: (torch.cat([t(r0), gaps]), 0))
    with pytest.raises(ValueError, match="start=0"):
        bad(t(r1))
    with pytest.raises(ValueError, match="all_gaps, start_index"):
        _gpo(gather_fn=lambda gaps: gaps)(t(r1))


def test_state_dict_round_trip():
    rng = np.random.default_rng(10)
    g = _gpo(pool_size=10, queue_size=8)
    for _ in range(3):
        g(t(rng.normal(size=4)))
    state = g.state_dict()
    assert isinstance(state["queue"], torch.Tensor) and state["queue"].numel() == 8
    h = _gpo(pool_size=10, queue_size=8)
    h.load_state_dict({"queue": state["queue"].clone()})
    nxt = t(rng.normal(size=3))
    np.testing.assert_array_equal(g(nxt).numpy(), h(nxt).numpy())
    np.testing.assert_array_equal(g.state_dict()["queue"].numpy(), h.state_dict()["queue"].numpy())
    # a fresh one (empty queue) would give different margins
    assert not np.allclose(_gpo(pool_size=10, queue_size=8)(nxt).numpy(), g(nxt).numpy())


def test_dist_gather_fn_single_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        gaps = t([0.3, -1.0, 2.0])
        all_gaps, start = dist_gather_fn()(gaps)
        assert start == 0 and torch.equal(all_gaps, gaps)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------- gradcheck


def _variants(base):
    yield "plain", {}, None
    yield "w_margin", {"weight_placement": "margin"}, "w"
    yield "w_loss", {"weight_placement": "loss"}, "w"
    if base in SIGMOID_BASES:
        yield "focal", {"focal": FocalConfig(gamma=2.0), "weight_placement": "loss"}, "w"
        yield "focal_margin", {"focal": FocalConfig(gamma=1.5)}, "w"
    if base in MARGIN_BASES:
        yield "gamma_po", {"gamma_po": GammaPOConfig(enabled=True)}, "m"


GRADCHECK_CASES = [(b, name, kw, extra) for b in ALL_BASES for name, kw, extra in _variants(b)]


@pytest.mark.parametrize("base,name,kw,extra", GRADCHECK_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in GRADCHECK_CASES])
def test_gradcheck(base, name, kw, extra):
    cfg = cfg_for(base, beta=0.5, **base_kwargs(base, eps=0.2), **kw)
    w = t([1.0, 2.5, 0.5, 1.7]) if extra else t(np.ones(4))
    m = t([0.1, 0.4, 0.2, 0.3]) if extra == "m" else None
    # PC/PR/RC/RR keep dpop's max(0, ρ_w − π_w) and hinge's relu away from their kinks
    inputs = tuple(t(x).requires_grad_() for x in (PC, PR, RC, RR))
    lc, lr = t(LC), t(LR)
    if base == "simpo":
        fn = lambda pc, pr: preference_loss(cfg, pc, pr, None, None, lc, lr, w, m).losses
        inputs = inputs[:2]
    else:
        fn = lambda pc, pr, rc, rr: preference_loss(cfg, pc, pr, rc, rr, lc, lr, w, m).losses
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("base", ["ipo", "hinge"])
def test_focal_on_undefined_base_is_refused_by_the_config(base):
    with pytest.raises(ValueError, match="focal"):
        LossConfig(base=base, focal=FocalConfig(gamma=1.0))


def test_gamma_po_margins_with_ipo_raise():
    with pytest.raises(ValueError, match="γ-PO margins are undefined for base 'ipo'"):
        run(cfg_for("ipo"), margins=np.full(4, 0.05))
    with pytest.raises(ValueError, match="ipo"):
        LossConfig(base="ipo", gamma_po=GammaPOConfig(enabled=True))


@pytest.mark.parametrize("base", ["dpo", "cdpo", "robust", "hinge", "ipo", "dpop"])
def test_missing_reference_raises(base):
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss(cfg_for(base), t(PC), t(PR), None, t(RR), t(LC), t(LR), t(np.ones(4)))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="rejected_lengths"):
        preference_loss(cfg_for("dpo"), t(PC), t(PR), t(RC), t(RR), t(LC), t(LR[:3]), t(np.ones(4)))
    with pytest.raises(ValueError, match="margins"):
        run(cfg_for("dpo"), margins=np.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        preference_loss(cfg_for("dpo"), *(t(np.zeros((2, 2))) for _ in range(7)))


@pytest.mark.parametrize(
    "name", ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
             "ref_rejected_logps", "chosen_lengths", "rejected_lengths", "weights", "margins"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(name, bad):
    args = {"policy_chosen_logps": PC, "policy_rejected_logps": PR, "ref_chosen_logps": RC,
            "ref_rejected_logps": RR, "chosen_lengths": LC, "rejected_lengths": LR,
            "weights": np.ones(4), "margins": np.full(4, 0.05)}
    args = {k: v.copy() for k, v in args.items()}
    args[name][1] = bad
    args[name][3] = bad
    cfg = cfg_for("dpo", gamma_po=GammaPOConfig(enabled=True))
    with pytest.raises(ValueError, match=rf"{name} \(2 non-finite\)"):
        preference_loss(cfg, *(t(v) for v in args.values()))


def test_negative_weight_and_bad_length_raise():
    with pytest.raises(ValueError, match="weights must be >= 0; 1 negative"):
        run(cfg_for("dpo"), w=np.array([1.0, -0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="chosen_lengths must be > 0"):
        run(cfg_for("ipo"), lc=np.array([5.0, 0.0, 3.0, 7.0]))


def test_gamma_po_margins_reject_bad_gaps():
    with pytest.raises(ValueError, match="1 non-finite"):
        gamma_po_margins(t([0.1, float("nan")]), 0.05, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        gamma_po_margins(t([]), 0.05, 1.0)


# ---------------------------------------------------------------------------------- stability


@pytest.mark.parametrize("base", ALL_BASES)
@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_huge_margins_are_finite(base, placement):
    kw = dict(base_kwargs(base), weight_placement=placement)
    if base in SIGMOID_BASES:
        kw["focal"] = FocalConfig(gamma=2.0)
    cfg = cfg_for(base, beta=1.0, **kw)
    # Δ = ±1e4 (also after per-token normalisation for ipo/simpo, lengths 1)
    pc = t([0.0, -2e4, -1.0, -1e4]).requires_grad_()
    pr = t([-1e4, 0.0, -1e4, -1.0]).requires_grad_()
    rc, rr = t(np.zeros(4)), t(np.zeros(4))
    if base in ("ipo", "simpo"):
        rc = rr = None if base == "simpo" else rc
    out = preference_loss(cfg, pc, pr, rc, rr, t(np.ones(4)), t(np.ones(4)), t([1.0, 3.0, 2.0, 1.0]))
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.loss)
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert all(math.isfinite(v) for v in out.metrics.values())


def test_huge_margin_dpo_values():
    # −log σ(1e4) ≈ 0 and −log σ(−1e4) ≈ 1e4, not inf/0 from log(sigmoid).
    cfg = cfg_for("dpo", beta=1.0)
    out = preference_loss(cfg, t([0.0, -1e4]), t([-1e4, 0.0]), t([0.0, 0.0]), t([0.0, 0.0]),
                          t([1, 1]), t([1, 1]), t([1.0, 1.0]))
    assert out.losses[0].item() == pytest.approx(0.0, abs=1e-300)
    assert out.losses[1].item() == pytest.approx(1e4, rel=1e-12)


# ------------------------------------------------------------------------------------ metrics


def test_metrics_reference_based():
    w = np.array([1.0, 2.5, 0.5, 1.5])
    out = run(cfg_for("dpop", beta=0.1), w=w)
    delta = np_delta("dpop", PC, PR, RC, RR, LC, LR, 0.1, 50.0)
    m = out.metrics
    assert all(isinstance(v, float) for v in m.values())
    assert m["loss"] == pytest.approx(out.loss.item())
    assert m["rewards/chosen"] == pytest.approx(np.mean(0.1 * (PC - RC)), rel=1e-12)
    assert m["rewards/rejected"] == pytest.approx(np.mean(0.1 * (PR - RR)), rel=1e-12)
    assert m["rewards/margin"] == pytest.approx(delta.mean(), rel=1e-12)
    assert m["rewards/accuracy"] == pytest.approx(np.mean(delta > 0))
    assert 0 < m["rewards/accuracy"] < 1
    assert (m["weight/mean"], m["weight/max"], m["weight/min"]) == pytest.approx((1.375, 2.5, 0.5))
    assert "gamma_po/margin_mean" not in m and "focal/factor_mean" not in m


def test_metrics_ipo_and_simpo_forms():
    ipo = run(cfg_for("ipo", beta=0.1)).metrics
    assert ipo["rewards/chosen"] == pytest.approx(np.mean((PC - RC) / LC), rel=1e-12)
    assert ipo["rewards/rejected"] == pytest.approx(np.mean((PR - RR) / LR), rel=1e-12)
    simpo = run(cfg_for("simpo", beta=2.0)).metrics
    assert simpo["rewards/chosen"] == pytest.approx(np.mean(2.0 * PC / LC), rel=1e-12)
    assert simpo["rewards/rejected"] == pytest.approx(np.mean(2.0 * PR / LR), rel=1e-12)
    assert simpo["rewards/margin"] == pytest.approx(np.mean(2.0 * (PC / LC - PR / LR)), rel=1e-12)


def test_low_precision_inputs_are_upcast():
    # bf16 log-probs and int64 lengths: the loss is computed in float32, gradients reach the input.
    pc = torch.tensor([-300.0, -20.0], dtype=torch.bfloat16, requires_grad=True)
    pr = torch.tensor([-302.0, -18.0], dtype=torch.bfloat16)
    lc = torch.tensor([257, 10])  # 257 is not representable in bf16
    lr = torch.tensor([256, 8])
    out = preference_loss(cfg_for("simpo", beta=2.0), pc, pr, None, None, lc, lr,
                          torch.ones(2, dtype=torch.bfloat16))
    assert out.losses.dtype == torch.float32
    expected = np_losses("simpo", np.array([-300.0, -20.0]), np.array([-302.0, -18.0]), None, None,
                         np.array([257.0, 10.0]), np.array([256.0, 8.0]), beta=2.0)
    np.testing.assert_allclose(out.losses.detach().numpy(), expected, rtol=1e-5)
    out.loss.backward()
    assert pc.grad is not None and pc.grad.dtype == torch.bfloat16


# -------------------------------------------------------------------------------------- sft baseline


@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_sft_is_the_weighted_per_token_nll_of_chosen(placement):
    """sft: w · (−π_w/|y_w|) whatever the placement (there is no margin to scale); no reference."""
    cfg = LossConfig(base="sft", weight_placement=placement)
    assert not cfg.needs_reference
    w = np.array([1.0, 2.0, 0.5, 1.5])
    out = preference_loss(cfg, t(PC), t(PR), None, None, t(LC), t(LR), t(w))
    expected = w * (-PC / LC)
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-12)
    assert out.loss.item() == pytest.approx(expected.mean(), rel=1e-12)
    # The ranking metric still compares per-token log-probs of chosen and rejected.
    assert out.metrics["rewards/accuracy"] == pytest.approx(np.mean(PC / LC > PR / LR))


def test_sft_trains_chosen_only():
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    out = preference_loss(LossConfig(base="sft"), pc, pr, None, None, t(LC), t(LR), t(np.ones(4)))
    out.loss.backward()
    np.testing.assert_allclose(pc.grad.numpy(), -1.0 / (4 * LC), rtol=1e-12)
    assert pr.grad is None or torch.count_nonzero(pr.grad) == 0


@pytest.mark.parametrize("kw", [{"focal": FocalConfig(gamma=1.0)}, {"gamma_po": GammaPOConfig(enabled=True)}])
def test_sft_refuses_the_preference_plugins(kw):
    with pytest.raises(ValueError, match="sft"):
        LossConfig(base="sft", **kw)


@pytest.mark.parametrize("placement", ["margin", "loss"])
@pytest.mark.parametrize("base", ["dpo", "ipo", "simpo"])
def test_nll_weight_adds_the_chosen_per_token_nll(base, placement):
    """RPO: per pair f(·) + λ_nll · (−π_w/|y_w|), the sum inside the weight under loss placement."""
    w = np.array([1.0, 2.0, 0.5, 1.5])
    plain = run(cfg_for(base, weight_placement=placement), w=w).losses.numpy()
    rpo = run(cfg_for(base, weight_placement=placement, nll_weight=0.7), w=w).losses.numpy()
    nll = -PC / LC
    expected = plain + (w if placement == "loss" else 1.0) * 0.7 * nll
    np.testing.assert_allclose(rpo, expected, rtol=1e-12)


def test_nll_weight_on_sft_is_refused():
    with pytest.raises(ValueError, match="nll_weight"):
        LossConfig(base="sft", nll_weight=1.0)
