"""Diverse-preference losses: closed forms and recovery of known groups."""

import math

import pytest
import torch

from preftune.losses.diverse import (aggregate_rewards, fit_bt_mixture, group_robust_dpo_loss, group_robust_weights,
                                     mixture_responsibilities, weighted_bradley_terry_loss)
from preftune.losses.preference import dpo_loss


def test_weighted_bt_by_hand():
    # diff 0 -> ln 2; diff ln 3 -> −log(3/4) = log(4/3); weights 2 and 0.5.
    losses, m = weighted_bradley_terry_loss(torch.tensor([0.0, math.log(3)]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.5]))
    assert losses.tolist() == pytest.approx([2 * math.log(2), 0.5 * math.log(4 / 3)])
    assert m["weights"].tolist() == [2.0, 0.5]


def test_responsibilities_by_hand():
    # Annotator 0: two pairs with log-lik (log .9, log .1) under (k=0, k=1) -> γ ∝ (.81, .01).
    ll = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8]]))
    gamma = mixture_responsibilities(ll, torch.tensor([0, 0, 1]), 3)
    assert gamma[0].tolist() == pytest.approx([0.81 / 0.82, 0.01 / 0.82])
    assert gamma[1].tolist() == pytest.approx([0.2, 0.8])
    assert gamma[2].tolist() == pytest.approx([0.5, 0.5])  # no pairs: the prior
    prior = torch.log(torch.tensor([0.25, 0.75]))
    assert mixture_responsibilities(ll, torch.tensor([0, 0, 1]), 3, prior)[2].tolist() == pytest.approx([0.25, 0.75])


def test_em_recovers_two_known_reward_vectors():
    torch.manual_seed(0)
    items, annotators, pairs_each = 10, 40, 30
    r_a = torch.linspace(-2, 2, items)
    r_b = torch.tensor([1.5, -1.5, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 0.0])
    truth = torch.tensor([0] * 28 + [1] * 12)  # 70/30 mix
    chosen, rejected, who = [], [], []
    for a in range(annotators):
        r = r_a if truth[a] == 0 else r_b
        i, j = torch.randint(items, (2, pairs_each))
        keep = i != j
        i, j = i[keep], j[keep]
        win = torch.rand(len(i)) < torch.sigmoid(r[i] - r[j])
        chosen.append(torch.where(win, i, j))
        rejected.append(torch.where(win, j, i))
        who.append(torch.full((len(i),), a))
    fit = fit_bt_mixture(torch.cat(chosen), torch.cat(rejected), torch.cat(who), num_items=items,
                         num_annotators=annotators, num_components=2, iterations=15, m_steps=30, restarts=2, seed=0)
    assign = fit["responsibilities"].argmax(-1)
    # Components are unlabelled: match them to the truth by the better of the two labellings.
    agree = max((assign == truth).float().mean(), (assign != truth).float().mean())
    assert agree >= 0.9
    flip = (assign == truth).float().mean() < 0.5
    rewards = fit["rewards"].flip(0) if flip else fit["rewards"]
    for k, r in enumerate((r_a, r_b)):
        corr = torch.corrcoef(torch.stack([rewards[k], r - r.mean()]))[0, 1]
        assert corr > 0.9, (k, corr)
    assert fit["prior"][1 if flip else 0] == pytest.approx(0.7, abs=0.1)


def _logps(seed, b=6):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g) * 5 + 1) for _ in range(4)]


def test_group_robust_dpo_with_one_group_is_dpo():
    pc, pr, rc, rr = (t.requires_grad_(True) if i < 2 else t for i, t in enumerate(_logps(1)))
    ref_losses, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    losses, m = group_robust_dpo_loss(pc, pr, rc, rr, torch.zeros(6, dtype=torch.long), torch.tensor([1.0]),
                                      torch.tensor([6.0]), beta=0.3)
    assert torch.allclose(losses, ref_losses)
    g1 = torch.autograd.grad(losses.sum(), pc, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref_losses.sum(), pc)[0]
    assert torch.allclose(g1, g2)
    assert torch.allclose(m["dpo_losses"], ref_losses)


def test_group_robust_dpo_is_weighted_group_means():
    pc, pr, rc, rr = _logps(2)
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    alpha = torch.tensor([0.25, 0.75])
    losses, _ = group_robust_dpo_loss(pc, pr, rc, rr, groups, alpha, torch.tensor([4.0, 2.0]), beta=0.1)
    plain, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    want = 0.25 * plain[:4].mean() + 0.75 * plain[4:].mean()
    assert losses.sum() / 6 == pytest.approx(want.item())
    # Split in two micro-batches with the global counts: the same total (accumulation invariance).
    a, _ = group_robust_dpo_loss(pc[:3], pr[:3], rc[:3], rr[:3], groups[:3], alpha, torch.tensor([4.0, 2.0]), beta=0.1)
    b, _ = group_robust_dpo_loss(pc[3:], pr[3:], rc[3:], rr[3:], groups[3:], alpha, torch.tensor([4.0, 2.0]), beta=0.1)
    assert (a.sum() + b.sum()).item() == pytest.approx(losses.sum().item())


def test_group_weights_update_by_hand():
    # α = (.5, .5), L = (0, ln 3), η = 1 -> α ∝ (.5, 1.5) -> (.25, .75).
    new = group_robust_weights(torch.tensor([0.5, 0.5]), torch.tensor([0.0, math.log(3)]), step_size=1.0)
    assert new.tolist() == pytest.approx([0.25, 0.75])
    same = group_robust_weights(torch.tensor([0.2, 0.8]), torch.tensor([5.0, 1.0]), step_size=0.0)
    assert same.tolist() == pytest.approx([0.2, 0.8])
    # A group absent from the batch keeps its weight before normalisation.
    absent = group_robust_weights(torch.tensor([0.5, 0.5]), torch.tensor([math.log(3), 9.0]), step_size=1.0,
                                  present=torch.tensor([True, False]))
    assert absent.tolist() == pytest.approx([0.75, 0.25])


def test_aggregation_min_gradient_goes_to_worst_group():
    rewards = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 0.7]], requires_grad=True)  # 2 groups x 3 rows
    agg = aggregate_rewards(rewards, "min")
    assert agg.tolist() == [0.0, -2.0, 0.5]
    (grad,) = torch.autograd.grad(agg.sum(), rewards)
    assert grad.tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]  # each row: only its worst-off group
    assert aggregate_rewards(rewards, "mean").tolist() == pytest.approx([0.5, 0.5, 0.6])
    w = aggregate_rewards(rewards, "weighted", torch.tensor([0.8, 0.2]))
    assert w.tolist() == pytest.approx([0.8, -1.0, 0.54])
    with pytest.raises(ValueError, match="one weight per reward"):
        aggregate_rewards(rewards, "weighted", torch.tensor([1.0]))


def test_em_with_features_and_too_many_components():
    torch.manual_seed(1)
    feats = torch.randn(30, 2)
    w = torch.tensor([[2.0, 0.0], [-2.0, 0.5]])
    truth = torch.tensor([0] * 6 + [1] * 4)
    chosen, rejected, who = [], [], []
    for a in range(10):
        r = feats @ w[truth[a]]
        i, j = torch.randint(30, (2, 40))
        win = torch.rand(40) < torch.sigmoid(r[i] - r[j])
        chosen.append(torch.where(win, i, j)), rejected.append(torch.where(win, j, i)), who.append(torch.full((40,), a))
    fit = fit_bt_mixture(torch.cat(chosen), torch.cat(rejected), torch.cat(who), num_items=30, num_annotators=10,
                         num_components=2, features=feats, iterations=10, m_steps=30, restarts=2)
    assign = fit["responsibilities"].argmax(-1)
    assert max((assign == truth).float().mean(), (assign != truth).float().mean()) >= 0.9
    assert fit["weights"].shape == (2, 2)
    with pytest.raises(ValueError, match="3 mixture components for 2 annotators"):
        fit_bt_mixture(torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), num_items=2, num_annotators=2, num_components=3)
