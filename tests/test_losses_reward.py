"""Reward-model losses and report functions against closed forms (preftune.losses.reward, preftune.rewards.evaluation)."""

import itertools
import math

import pytest
import torch

from preftune.losses.reward import bradley_terry_loss, centering_penalty, plackett_luce_loss
from preftune.rewards.evaluation import average_ranks, calibration, pair_report, pearson, reward_stats, spearman
from preftune.rewards.model import combine_scores


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------------------ Bradley-Terry


def test_bt_loss_values_and_metrics():
    chosen, rejected = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    losses, m = bradley_terry_loss(chosen, rejected)
    expected = [-math.log(sigmoid(1.0)), math.log(2.0), -math.log(sigmoid(-3.0))]
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    assert m["accuracies"].tolist() == [1.0, 0.0, 0.0]  # a tie is not a correct ranking
    assert m["margins"].tolist() == [1.0, 0.0, -3.0]
    assert torch.allclose(m["log_likelihood"], -losses)


def test_bt_loss_with_margin_and_gradient_match_closed_form():
    chosen = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.25, -1.0], dtype=torch.float64, requires_grad=True)
    margin = torch.tensor([1.0, 0.5], dtype=torch.float64)
    losses, m = bradley_terry_loss(chosen, rejected, margin=margin)
    z = [0.5 - 0.25 - 1.0, 2.0 + 1.0 - 0.5]
    assert torch.allclose(losses.double(), torch.tensor([-math.log(sigmoid(v)) for v in z], dtype=torch.float64))
    # the BT log-likelihood metric is of the label, without the margin
    assert torch.allclose(m["log_likelihood"].double(), torch.tensor([math.log(sigmoid(0.25)), math.log(sigmoid(3.0))], dtype=torch.float64), atol=1e-6)
    losses.sum().backward()
    # d/dr_w −log σ(z) = −σ(−z) = −(1 − σ(z)); d/dr_l = +(1 − σ(z))
    expected = torch.tensor([-(1 - sigmoid(v)) for v in z], dtype=torch.float64)
    assert torch.allclose(chosen.grad, expected, atol=1e-6)
    assert torch.allclose(rejected.grad, -expected, atol=1e-6)
    scalar, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0)
    assert scalar.item() == pytest.approx(math.log(2.0))


def test_bt_loss_is_fp32_for_bf16_rewards():
    losses, m = bradley_terry_loss(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0.0], dtype=torch.bfloat16))
    assert losses.dtype == torch.float32 and m["accuracies"].dtype == torch.float32


def test_centering_penalty():
    rewards = torch.tensor([[1.0, -1.0], [2.0, 1.0]], requires_grad=True)
    pen = centering_penalty(rewards, 0.01)
    assert torch.allclose(pen, torch.tensor([0.0, 0.09]))
    pen.sum().backward()  # d/dr_k coef (Σ r)^2 = 2 coef Σ r
    assert torch.allclose(rewards.grad, torch.tensor([[0.0, 0.0], [0.06, 0.06]]))
    masked = centering_penalty(torch.tensor([[1.0, 2.0, 99.0]]), 1.0, mask=torch.tensor([[True, True, False]]))
    assert masked.item() == pytest.approx(9.0)


# ------------------------------------------------------------------------------------ Plackett-Luce


def brute_force_pl(rewards: list[float], groups: list[list[int]]) -> float:
    """log Σ over every ordering consistent with the tie groups of its Plackett-Luce probability."""
    level = {i: g for g, group in enumerate(groups) for i in group}
    items = sorted(level)
    total = 0.0
    for perm in itertools.permutations(items):
        if any(level[perm[a]] > level[perm[a + 1]] for a in range(len(perm) - 1)):
            continue
        p, left = 1.0, list(perm)
        for i in perm:
            p *= math.exp(rewards[i]) / sum(math.exp(rewards[j]) for j in left)
            left.remove(i)
        total += p
    return math.log(total)


def levels_of(groups: list[list[int]], k: int) -> list[int]:
    out = [-1] * k
    for g, group in enumerate(groups):
        for i in group:
            out[i] = g
    return out


def test_pl_with_k2_equals_bt():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(6), torch.randn(6)
    pl, m = plackett_luce_loss(torch.stack([chosen, rejected], 1), torch.tensor([[0, 1]] * 6))
    bt, bm = bradley_terry_loss(chosen, rejected)
    assert torch.allclose(pl, bt, atol=1e-6)
    assert m["correct_pairs"].tolist() == bm["accuracies"].tolist() and m["ordered_pairs"].tolist() == [1.0] * 6
    # order of the completions in the row does not matter, only their levels
    swapped, _ = plackett_luce_loss(torch.stack([rejected, chosen], 1), torch.tensor([[1, 0]] * 6))
    assert torch.allclose(swapped, bt, atol=1e-6)


def test_pl_without_ties_is_the_softmax_chain():
    r = [0.3, -1.2, 2.0]
    loss, _ = plackett_luce_loss(torch.tensor([r]), torch.tensor([[1, 2, 0]]))  # ranking 2 > 0 > 1
    e = [math.exp(v) for v in r]
    expected = -math.log(e[2] / sum(e) * e[0] / (e[0] + e[1]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pl_tied_top_group_closed_form():
    a, b, c = 0.4, -0.3, 0.1  # {a, b} tied above c: both must beat c
    loss, m = plackett_luce_loss(torch.tensor([[a, b, c]]), torch.tensor([[0, 0, 1]]))
    ea, eb, ec = math.exp(a), math.exp(b), math.exp(c)
    z = ea + eb + ec
    expected = ea / z * eb / (eb + ec) + eb / z * ea / (ea + ec)
    assert loss.item() == pytest.approx(-math.log(expected), rel=1e-6)
    assert m["ordered_pairs"].item() == 2 and m["correct_pairs"].item() == 1  # a > c right, b > c wrong


@pytest.mark.parametrize(
    "groups",
    [[[0], [1, 2], [3]], [[1, 3], [0], [2, 4]], [[0, 1, 2], [3]], [[4], [0, 1, 2, 3]], [[2, 0], [1, 4], [3]]],
)
def test_pl_ties_match_brute_force_enumeration(groups):
    k = sum(len(g) for g in groups)
    r = torch.randn(k, generator=torch.Generator().manual_seed(k * 7 + len(groups)), dtype=torch.float64)
    loss, _ = plackett_luce_loss(r[None], torch.tensor([levels_of(groups, k)]))
    assert loss.item() == pytest.approx(-brute_force_pl(r.tolist(), groups), rel=1e-9, abs=1e-12)


def test_pl_all_tied_or_tied_last_carries_no_signal():
    r = torch.tensor([[1.0, 5.0, -2.0]], requires_grad=True)
    loss, m = plackett_luce_loss(r, torch.tensor([[0, 0, 0]]))
    assert loss.item() == 0.0 and m["ordered_pairs"].item() == 0
    loss.sum().backward()
    assert torch.equal(r.grad, torch.zeros_like(r))
    # ties among the worst completions: only the top one's softmax term
    loss2, _ = plackett_luce_loss(torch.tensor([[1.0, 5.0, -2.0]]), torch.tensor([[0, 1, 1]]))
    e = torch.tensor([1.0, 5.0, -2.0]).exp()
    assert loss2.item() == pytest.approx(-math.log(e[0] / e.sum()), rel=1e-6)


def test_pl_padding_is_ignored_and_gradients_finite():
    r = torch.tensor([[0.7, -0.2, 9.0, 9.0], [0.1, 0.4, 0.3, -0.5]], requires_grad=True)
    levels = torch.tensor([[0, 1, -1, -1], [0, 0, 1, 2]])  # row 0 is a pair padded to K = 4
    loss, m = plackett_luce_loss(r, levels)
    bt, _ = bradley_terry_loss(torch.tensor([0.7]), torch.tensor([-0.2]))
    assert loss[0].item() == pytest.approx(bt.item(), rel=1e-6)
    loss.sum().backward()
    assert torch.isfinite(r.grad).all() and (r.grad[0, 2:] == 0).all()
    assert m["ordered_pairs"].tolist() == [1.0, 5.0]
    assert torch.autograd.gradcheck(
        lambda x: plackett_luce_loss(x, levels)[0], (r.detach().double().requires_grad_(),)
    )


def test_pl_rejects_bad_shapes_and_huge_tie_groups():
    with pytest.raises(ValueError, match="must both be"):
        plackett_luce_loss(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="tie group of 9"):
        plackett_luce_loss(torch.zeros(1, 10), torch.tensor([[0] * 9 + [1]]))


# ------------------------------------------------------------------------------------ reports


def test_calibration_bins_and_ece():
    # claims σ(|d|): d = 0 -> 0.5 (half right), d = ±ln 3 -> 0.75, d = 10 -> ~1
    d = [0.0, math.log(3), -math.log(3), 10.0]
    cal = calibration(torch.tensor(d), torch.zeros(4), bins=2)
    low, high = cal["bins"]
    assert low["count"] == 1 and low["predicted"] == pytest.approx(0.5) and low["observed"] == 0.5
    assert high["count"] == 3 and high["observed"] == pytest.approx(2 / 3)
    assert high["predicted"] == pytest.approx((0.75 + 0.75 + sigmoid(10.0)) / 3)
    assert cal["ece"] == pytest.approx(3 / 4 * abs(high["predicted"] - 2 / 3))


def test_correlations_and_stats():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    stats = reward_stats([1.0, 2.0, 3.0, 4.0])
    assert stats["mean"] == 2.5 and stats["std"] == pytest.approx(math.sqrt(1.25)) and stats["p50"] == 2.5


def test_pair_report_with_gold_and_members():
    rep = pair_report(
        [2.0, 0.0, 1.0], [1.0, 1.0, 1.0], gold_chosen=[1.0, 1.0, 3.0], gold_rejected=[0.0, 0.0, 3.0],
        member_chosen=torch.tensor([[2.0, 0.0, 1.0], [2.0, 1.0, 1.0]]), member_rejected=torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]),
    )  # fmt: skip
    assert rep["pairs"] == 3 and rep["accuracy"] == pytest.approx(1 / 3) and rep["ties"] == 1
    assert rep["mean_margin"] == pytest.approx(0.0)
    assert rep["gold"]["label_agreement"] == pytest.approx(2 / 3)
    # gold orders pairs 0 and 1 (pair 2 is a gold tie): learned agrees on pair 0, disagrees on pair 1
    assert rep["gold"]["pair_agreement"] == pytest.approx(0.5)
    assert rep["ensemble"]["member_accuracy"] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]


def test_combine_rules():
    members = torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    mean, m, std = combine_scores(members, "mean")
    assert mean.tolist() == [2.0, 2.0] and std.tolist() == [1.0, 2.0]  # population std
    assert combine_scores(members, "mean_minus_std", k=0.5)[0].tolist() == [1.5, 1.0]
    assert combine_scores(members, "min")[0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown combine rule"):
        combine_scores(members, "max")
