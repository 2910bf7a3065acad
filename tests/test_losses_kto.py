"""Closed-form tests of the KTO loss, its KL reference point and its helpers."""

import math

import pytest
import torch

from preftune.losses.kto import kto_kl_estimate, kto_loss, kto_recommended_weights, mismatched_indices


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-9, atol=1e-12)


def test_kto_three_row_hand_example():
    beta, lam_d, lam_u = 0.5, 2.0, 1.5
    policy = t(-1.0, -2.0, -3.0, grad=True)
    reference = t(-1.5, -1.5, -2.0)
    labels = torch.tensor([True, False, True])
    kl_policy, kl_reference = t(-2.0, -3.0, -1.0), t(-2.5, -2.5, -2.0)
    losses, m = kto_loss(
        policy, reference, labels, kl_policy, kl_reference,
        beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u,
    )
    z = (0.5 - 0.5 + 1.0) / 3  # mean of the mismatched log-ratios, > 0 so not clamped
    r = [0.5, -0.5, -1.0]
    expected = [
        lam_d * (1 - sigmoid(beta * (r[0] - z))),
        lam_u * (1 - sigmoid(beta * (z - r[1]))),
        lam_d * (1 - sigmoid(beta * (r[2] - z))),
    ]
    close(losses, expected)
    close(m["kl"], [z, z, z])
    close(m["rewards"], [0.25, -0.25, -0.5])
    close(m["chosen_rewards"], [0.25, 0.0, -0.5])
    close(m["rejected_rewards"], [0.0, -0.25, 0.0])
    close(m["chosen_rows"], [1.0, 0.0, 1.0])
    close(m["rejected_rows"], [0.0, 1.0, 0.0])

    losses.sum().backward()
    # d/dr λ_D(1 − σ(β(r − z))) = −λ_D β σ(1 − σ);  d/dr λ_U(1 − σ(β(z − r))) = +λ_U β σ(1 − σ)
    s = [sigmoid(beta * (r[0] - z)), sigmoid(beta * (z - r[1])), sigmoid(beta * (r[2] - z))]
    close(policy.grad, [-lam_d * beta * s[0] * (1 - s[0]), lam_u * beta * s[1] * (1 - s[1]), -lam_d * beta * s[2] * (1 - s[2])])


def test_reference_point_is_clamped_at_zero_and_detached():
    kl_policy, kl_reference = t(-3.0, -4.0, grad=True), t(-2.0, -2.0, grad=True)  # mean log-ratio −1.5
    policy = t(-1.0, -1.0, grad=True)
    losses, m = kto_loss(policy, t(-1.0, -1.0), torch.tensor([True, False]), kl_policy, kl_reference, beta=0.1)
    close(m["kl"], [0.0, 0.0])
    close(losses, [0.5, 0.5])  # r = z_ref = 0  →  1 − σ(0)
    losses.sum().backward()
    assert policy.grad is not None
    assert kl_policy.grad is None and kl_reference.grad is None
    assert not kto_kl_estimate(kl_policy, kl_reference).requires_grad


@pytest.mark.parametrize("label", [True, False])
def test_finite_at_batch_size_one(label):
    policy, reference = t(-7.0, grad=True), t(-6.0)
    idx = mismatched_indices(1)
    close(idx.to(torch.float64), [0.0])
    # With B = 1 the "mismatched" pair is the row itself, so the KL inputs are its own log-probs.
    losses, m = kto_loss(policy, reference, torch.tensor([label]), policy[idx], reference[idx], beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()
    assert all(torch.isfinite(v).all() for v in m.values())
    close(m["kl"], [0.0])  # the only log-ratio is −1, clamped


@pytest.mark.parametrize("labels", [[True, False, True, True, False], [True] * 5, [False] * 5])
def test_odd_batch_and_single_class_batches(labels):
    g = torch.Generator().manual_seed(0)
    policy = (-20 * torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_()
    reference = -20 * torch.rand(5, generator=g, dtype=torch.float64)
    idx = mismatched_indices(5)
    kl_policy, kl_reference = reference[idx] + t(0.5, 1.0, -0.2, 0.3, 0.9), reference[idx]
    labels = torch.tensor(labels)
    losses, m = kto_loss(policy, reference, labels, kl_policy, kl_reference, beta=0.2, desirable_weight=1.3)
    losses.sum().backward()
    assert losses.shape == (5,) and torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()
    z = 0.5  # mean of (0.5, 1.0, −0.2, 0.3, 0.9)
    close(m["kl"], [z] * 5)
    for i in range(5):
        r = policy[i].item() - reference[i].item()
        want = 1.3 * (1 - sigmoid(0.2 * (r - z))) if labels[i] else 1 - sigmoid(0.2 * (z - r))
        close(losses[i], want)
    close(m["chosen_rows"].sum(), float(labels.sum()))


def test_global_kl_override_matches_full_batch():
    """Two halves with the all-reduced (sum, count) give the full batch's per-row losses."""
    policy, reference = t(-1.0, -2.0, -3.0, -4.0), t(-1.2, -1.9, -3.5, -3.0)
    labels = torch.tensor([True, False, False, True])
    kl_policy, kl_reference = t(-2.0, -1.0, -5.0, -3.0), t(-3.0, -1.5, -4.0, -5.0)
    full, full_m = kto_loss(policy, reference, labels, kl_policy, kl_reference, beta=0.3)
    total = (kl_policy - kl_reference).sum()
    for part in (slice(0, 2), slice(2, 4)):
        half, half_m = kto_loss(
            policy[part], reference[part], labels[part], kl_policy[part], kl_reference[part],
            beta=0.3, kl_sum_and_count=(total, torch.tensor(4)),
        )
        close(half, full[part])
        close(half_m["kl"], full_m["kl"][part])
    close(full_m["kl"], [0.625] * 4)  # (1 + 0.5 − 1 + 2) / 4


def test_mismatched_indices():
    assert mismatched_indices(4).tolist() == [1, 2, 3, 0]
    for b in (2, 3, 5):
        idx = mismatched_indices(b)
        assert idx.dtype == torch.long
        assert sorted(idx.tolist()) == list(range(b))  # a permutation ...
        assert (idx != torch.arange(b)).all()  # ... with no row paired with itself
    with pytest.raises(ValueError):
        mismatched_indices(0)


@pytest.mark.parametrize(
    "n_d, n_u, expected",
    [(1, 10, (10.0, 1.0)), (100, 100, (1.0, 1.0)), (120, 100, (1.0, 1.0)), (300, 100, (1.0, 3.0)), (0, 5, (1.0, 1.0))],
)
def test_recommended_weights_values(n_d, n_u, expected):
    assert kto_recommended_weights(n_d, n_u) == pytest.approx(expected)


def test_recommended_weights_ratio_in_paper_range():
    for n_d in (1, 3, 7, 50, 99, 100, 101, 133, 134, 1000):
        for n_u in (1, 2, 9, 75, 100, 1000):
            lam_d, lam_u = kto_recommended_weights(n_d, n_u)
            ratio = lam_d * n_d / (lam_u * n_u)
            assert 1 - 1e-12 <= ratio <= 4 / 3 + 1e-12, (n_d, n_u, ratio)
            assert lam_d >= 1 and lam_u >= 1
