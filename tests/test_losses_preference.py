"""Closed-form tests of the pairwise preference losses: expected values are worked out by hand with
math.log / math.exp, never by calling the function under test a second time."""

import math

import pytest
import torch

from preftune.losses.preference import (
    cdpo_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    log1mexp,
    orpo_loss,
    reference_free_dpo_loss,
    robust_dpo_loss,
    simpo_loss,
    unlikelihood_loss,
)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-9, atol=1e-12)


# A worked example used by several tests: log-ratios chosen = +1, rejected = −1, so h = 2.
PC, PR, RC, RR = t(-10.0), t(-12.0), t(-11.0), t(-11.0)


# -- DPO --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
def test_dpo_is_ln2_when_policy_equals_reference(beta):
    g = torch.Generator().manual_seed(0)
    chosen = -50 * torch.rand(7, generator=g, dtype=torch.float64)
    rejected = -50 * torch.rand(7, generator=g, dtype=torch.float64)
    losses, metrics = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta)
    close(losses, torch.full((7,), math.log(2), dtype=torch.float64))
    close(metrics["margins"], torch.zeros(7, dtype=torch.float64))
    close(metrics["grad_weights"], torch.full((7,), 0.5, dtype=torch.float64))
    close(metrics["accuracies"], torch.zeros(7, dtype=torch.float64))  # ties are not correct rankings


def test_dpo_worked_example():
    losses, m = dpo_loss(PC, PR, RC, RR, beta=0.5)
    # z = β·h = 0.5 · ((−10 + 11) − (−12 + 11)) = 1;  −log σ(1) = log(1 + e^−1)
    close(losses, [softplus(-1.0)])
    close(m["chosen_rewards"], [0.5])
    close(m["rejected_rewards"], [-0.5])
    close(m["margins"], [1.0])
    close(m["accuracies"], [1.0])
    close(m["grad_weights"], [sigmoid(-1.0)])


def test_dpo_gradient_matches_seed_002():
    """∇ wrt log π(y_w) = −β σ(r̂_l − r̂_w); wrt log π(y_l) = +β σ(r̂_l − r̂_w); none into the reference."""
    beta = 0.3
    pc, pr = t(-4.0, -20.0, -7.5, grad=True), t(-6.0, -18.0, -7.5, grad=True)
    rc, rr = t(-5.0, -19.0, -7.0), t(-5.5, -21.0, -8.0)
    losses, m = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    r_w = [beta * (a - b) for a, b in zip([-4.0, -20.0, -7.5], [-5.0, -19.0, -7.0])]
    r_l = [beta * (a - b) for a, b in zip([-6.0, -18.0, -7.5], [-5.5, -21.0, -8.0])]
    weights = [sigmoid(l - w) for w, l in zip(r_w, r_l)]
    close(pc.grad, [-beta * w for w in weights])
    close(pr.grad, [beta * w for w in weights])
    close(m["grad_weights"], weights)
    assert not m["grad_weights"].requires_grad and not m["chosen_rewards"].requires_grad


def test_dpo_finite_for_extreme_margins():
    losses, _ = dpo_loss(t(0.0, -1e4), t(-1e4, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=1.0)
    assert torch.isfinite(losses).all()
    close(losses[0], 0.0)
    close(losses[1], 1e4)  # z = −1e4: −log σ(−1e4) = 1e4 + log(1 + e^−1e4)


def test_metrics_on_hand_example():
    # log-ratios (chosen, rejected): (+2, 0), (−1, +1), (0.5, 0.5); β = 0.1
    pc, rc = t(-8.0, -9.0, -3.0), t(-10.0, -8.0, -3.5)
    pr, rr = t(-5.0, -4.0, -6.0), t(-5.0, -5.0, -6.5)
    _, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    close(m["chosen_rewards"], [0.2, -0.1, 0.05])
    close(m["rejected_rewards"], [0.0, 0.1, 0.05])
    close(m["margins"], [0.2, -0.2, 0.0])
    close(m["accuracies"], [1.0, 0.0, 0.0])
    assert set(m) >= {"chosen_rewards", "rejected_rewards", "margins", "accuracies", "grad_weights"}
    assert all(v.shape == (3,) for v in m.values())


# -- cDPO and robust DPO ----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [cdpo_loss, robust_dpo_loss])
def test_label_smoothing_zero_is_dpo(fn):
    pc, pr, rc, rr = t(-3.0, -9.0), t(-4.0, -2.0), t(-3.5, -8.0), t(-3.0, -2.5)
    expected, expected_m = dpo_loss(pc, pr, rc, rr, beta=0.7)
    losses, m = fn(pc, pr, rc, rr, beta=0.7, label_smoothing=0.0)
    close(losses, expected)
    for key, value in expected_m.items():
        close(m[key], value)


def test_cdpo_hand_value():
    losses, m = cdpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    # z = 1:  0.9·(−log σ(1)) + 0.1·(−log σ(−1))
    close(losses, [0.9 * softplus(-1.0) + 0.1 * softplus(1.0)])
    close(m["grad_weights"], [0.9 * sigmoid(-1.0) - 0.1 * sigmoid(1.0)])


def test_cdpo_stops_pushing_at_target_probability():
    """cDPO's minimum is at σ(βh) = 1 − ε: zero gradient there, and the weight turns negative beyond."""
    eps, beta = 0.2, 1.0
    h = math.log((1 - eps) / eps)  # σ(h) = 0.8
    pc = t(h, h + 1.0, grad=True)
    losses, m = cdpo_loss(pc, t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=beta, label_smoothing=eps)
    losses.sum().backward()
    close(pc.grad[0], 0.0)
    assert m["grad_weights"][1] < 0


def test_robust_dpo_hand_value():
    eps = 0.2
    losses, m = robust_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=eps)
    # z = 1:  [0.8·(−log σ(1)) − 0.2·(−log σ(−1))] / (1 − 0.4)
    close(losses, [(0.8 * softplus(-1.0) - 0.2 * softplus(1.0)) / 0.6])
    close(m["grad_weights"], [(0.8 * sigmoid(-1.0) + 0.2 * sigmoid(1.0)) / 0.6])


def test_robust_dpo_rejects_uninformative_labels():
    with pytest.raises(ValueError, match="0.5"):
        robust_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.5)


@pytest.mark.parametrize(
    "fn, kwargs",
    [
        (dpo_loss, {"beta": 0.4}),
        (cdpo_loss, {"beta": 0.4, "label_smoothing": 0.15}),
        (robust_dpo_loss, {"beta": 0.4, "label_smoothing": 0.15}),
        (hinge_loss, {"beta": 0.4}),
    ],
)
def test_grad_weights_are_minus_dloss_dz(fn, kwargs):
    """grad_weights = −∂loss/∂(βh), so ∂loss/∂policy_chosen_logps = −β·grad_weights."""
    pc = t(-3.0, -9.0, -1.0, -2.0, grad=True)
    losses, m = fn(pc, t(-4.0, -2.0, -6.0, -2.0), t(-3.5, -8.0, -1.0, -1.0), t(-3.0, -2.5, -1.0, -3.0), **kwargs)
    losses.sum().backward()
    close(pc.grad, -kwargs["beta"] * m["grad_weights"])


# -- IPO ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_ipo_minimum_at_half_inverse_tau(tau):
    target = 1 / (2 * tau)
    pc = t(-1.0 + target, grad=True)
    losses, _ = ipo_loss(pc, t(-2.0), t(-1.0), t(-2.0), tau=tau)  # h = target exactly
    losses.sum().backward()
    close(losses, [0.0])
    close(pc.grad, [0.0])


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_ipo_at_zero_gap(tau):
    losses, m = ipo_loss(t(-0.7), t(-1.2), t(-0.7), t(-1.2), tau=tau)
    close(losses, [1 / (4 * tau**2)])
    close(m["margins"], [0.0])


def test_ipo_rewards_use_tau():
    _, m = ipo_loss(t(-0.5), t(-1.5), t(-1.0), t(-1.0), tau=0.25)
    close(m["chosen_rewards"], [0.125])
    close(m["rejected_rewards"], [-0.125])


# -- hinge --------------------------------------------------------------------------------------------


def test_hinge_values():
    # β = 0.5; h = 4, 2, 1, 0, −2  →  βh = 2, 1, 0.5, 0, −1  →  relu(1 − βh) = 0, 0, 0.5, 1, 2
    pc = t(4.0, 2.0, 1.0, 0.0, -2.0, grad=True)
    zeros = t(0.0, 0.0, 0.0, 0.0, 0.0)
    losses, m = hinge_loss(pc, zeros, zeros, zeros, beta=0.5)
    close(losses, [0.0, 0.0, 0.5, 1.0, 2.0])
    losses.sum().backward()
    close(pc.grad, [0.0, 0.0, -0.5, -0.5, -0.5])  # linear with slope −β inside the margin
    close(m["grad_weights"], [0.0, 0.0, 1.0, 1.0, 1.0])


# -- reference-free losses ------------------------------------------------------------------------------


def test_simpo_worked_example():
    beta, gamma = 2.0, 0.5
    losses, m = simpo_loss(t(-0.5, -2.0), t(-1.5, -1.0), beta=beta, gamma=gamma)
    z0 = 2.0 * -0.5 - 2.0 * -1.5 - 0.5  # = 1.5
    z1 = 2.0 * -2.0 - 2.0 * -1.0 - 0.5  # = −2.5
    close(losses, [math.log(1 + math.exp(-z0)), math.log(1 + math.exp(-z1))])
    close(m["chosen_rewards"], [-1.0, -4.0])
    close(m["rejected_rewards"], [-3.0, -2.0])
    close(m["margins"], [2.0, -2.0])  # the margin is reported without γ
    close(m["accuracies"], [1.0, 0.0])
    close(m["grad_weights"], [1 / (1 + math.exp(z0)), 1 / (1 + math.exp(z1))])


def test_reference_free_dpo_worked_example():
    losses, m = reference_free_dpo_loss(t(-3.0), t(-5.0), beta=0.1)
    close(losses, [math.log(1 + math.exp(-0.2))])
    close(m["chosen_rewards"], [-0.3])
    close(m["margins"], [0.2])


def test_orpo_worked_example():
    pw, pl, nll, lam = -0.2, -1.0, 0.2, 0.1
    losses, m = orpo_loss(t(pw), t(pl), t(nll), lam=lam)
    log_odds_w = pw - math.log(1 - math.exp(pw))
    log_odds_l = pl - math.log(1 - math.exp(pl))
    ratio = log_odds_w - log_odds_l
    or_loss = math.log(1 + math.exp(-ratio))
    close(losses, [nll + lam * or_loss])
    close(m["log_odds_ratio"], [ratio])
    close(m["or_loss"], [or_loss])
    close(m["nll"], [nll])
    close(m["chosen_rewards"], [lam * pw])
    close(m["rejected_rewards"], [lam * pl])
    close(m["grad_weights"], [1 / (1 + math.exp(ratio))])


def test_orpo_gradient_flows_through_nll_and_odds():
    pw, pl = t(-0.2, grad=True), t(-1.0, grad=True)
    nll = t(0.2, grad=True)
    losses, _ = orpo_loss(pw, pl, nll, lam=0.5)
    losses.sum().backward()
    close(nll.grad, [1.0])
    # d log odds / dx = 1 + e^x / (1 − e^x) = 1 / (1 − e^x);  dL/dpw = −λ σ(−ratio) / (1 − e^pw)
    ratio = (-0.2 - math.log(1 - math.exp(-0.2))) - (-1.0 - math.log(1 - math.exp(-1.0)))
    close(pw.grad, [-0.5 * sigmoid(-ratio) / (1 - math.exp(-0.2))])
    close(pl.grad, [0.5 * sigmoid(-ratio) / (1 - math.exp(-1.0))])


def test_orpo_finite_when_average_probability_is_one():
    pw = t(0.0, -1e-12, grad=True)
    losses, m = orpo_loss(pw, t(-1.0, -1.0), t(0.0, 0.0), lam=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pw.grad).all()
    assert torch.isfinite(m["log_odds_ratio"]).all()


def test_log1mexp_matches_naive_formula_and_is_accurate_near_zero():
    x = t(-1e-5, -0.1, -0.69, -0.7, -5.0, -50.0)
    expected = [math.log(-math.expm1(v)) for v in (-1e-5, -0.1, -0.69, -0.7, -5.0, -50.0)]
    close(log1mexp(x), expected)


# -- unlikelihood ----------------------------------------------------------------------------------------


def test_unlikelihood_worked_example():
    pad = float("-inf")  # padding may hold anything; −inf must not leak into value or gradient
    chosen = t([math.log(0.5), math.log(0.25), pad], [math.log(0.8), pad, pad]).requires_grad_()
    chosen_mask = torch.tensor([[True, True, False], [True, False, False]])
    rejected = t([math.log(0.5), pad, pad], [math.log(0.9), math.log(0.6), 0.0]).requires_grad_()
    rejected_mask = torch.tensor([[True, False, False], [True, True, False]])
    losses, m = unlikelihood_loss(chosen, chosen_mask, rejected, rejected_mask, alpha=2.0)
    row0 = -(math.log(0.5) + math.log(0.25)) / 2 - 2.0 * math.log(1 - 0.5)
    row1 = -math.log(0.8) - 2.0 * (math.log(1 - 0.9) + math.log(1 - 0.6)) / 2
    close(losses, [row0, row1])
    close(m["chosen_logps"], [(math.log(0.5) + math.log(0.25)) / 2, math.log(0.8)])
    close(m["rejected_logps"], [math.log(0.5), (math.log(0.9) + math.log(0.6)) / 2])
    close(m["accuracies"], [0.0, 1.0])
    losses.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    close(chosen.grad[:, 2], [0.0, 0.0])  # unscored positions get no gradient
    close(rejected.grad[1, 2], 0.0)


def test_unlikelihood_large_but_finite_when_rejected_tokens_are_certain():
    mask = torch.tensor([[True, True]])
    chosen = t([math.log(0.5), math.log(0.5)])
    values = []
    for p in (0.5, 0.99, 0.999999, 1.0):
        rejected = t([math.log(p), math.log(p)]).requires_grad_()
        losses, _ = unlikelihood_loss(chosen, mask, rejected, mask)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(rejected.grad).all()
        values.append(losses.item())
    assert values == sorted(values)  # cost grows as the rejected tokens become likely
    assert values[-1] > math.log(2) + 13  # p = 1 costs −log(1e-6) ≈ 13.8 per token (the clamp)


def test_unlikelihood_row_without_tokens_contributes_zero():
    mask = torch.tensor([[False, False]])
    losses, m = unlikelihood_loss(t([-1.0, -1.0]), mask, t([-1.0, -1.0]), mask)
    close(losses, [0.0])
    close(m["chosen_logps"], [0.0])
