"""The GRPO family's pure functions against hand-worked numbers: clipped ratio with asymmetric clip,
GSPO's sequence ratio, the three aggregations, TIS, overlong shaping, dynamic sampling's filter,
REINFORCE++ advantages, and the RPO / DPO-Positive losses."""

import math

import pytest
import torch

from preftune.losses.grpo import (
    aggregate_rows,
    aggregation_units,
    clipped_policy_loss,
    gspo_policy_loss,
    truncated_importance_weights,
)
from preftune.losses.preference import dpo_loss, dpop_loss, rpo_loss
from preftune.rollout.advantages import overlong_penalty, reinforce_pp_advantages, zero_variance_groups


def test_clipped_loss_asymmetric_clip_hand_values_and_gradients():
    # log-ratios and advantages of six tokens in one row; ε_low = 0.2, ε_high = 0.28
    log_ratio = torch.tensor([[0.5, -0.5, 0.5, -0.5, 0.25, math.log(0.79)]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0]])
    old = torch.full_like(log_ratio, -3.0)
    logps = (old + log_ratio).requires_grad_(True)
    mask = torch.ones_like(logps, dtype=torch.bool)
    losses, m = clipped_policy_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28)
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.5), math.exp(-0.5), math.exp(0.25), 0.79]
    # r=1.649,A=+1 -> clip at 1.28; r=0.607,A=-1 -> clip at 0.8; r=1.649,A=-1 -> -r·A; r=0.607,A=+1 -> -r;
    # r=1.284 > 1.28, A=+1 -> 1.28 (with a symmetric 0.2 it would clip at 1.2); r=0.79 < 0.8, A=-1 -> 0.8
    expected = [-1.28, 0.8, r[2], -r[3], -1.28, 0.8]
    torch.testing.assert_close(losses[0], torch.tensor(expected), atol=1e-6, rtol=0)
    assert m["clip_high"][0].tolist() == [1, 0, 0, 0, 1, 0]
    assert m["clip_low"][0].tolist() == [0, 1, 0, 0, 0, 1]
    torch.testing.assert_close(m["ratio"][0], torch.tensor(r), atol=1e-6, rtol=0)
    losses.sum().backward()
    # d(−r·A)/d logp = −r·A where unclipped, 0 where the clipped side is active
    torch.testing.assert_close(logps.grad[0], torch.tensor([0.0, 0.0, r[2], -r[3], 0.0, 0.0]), atol=1e-6, rtol=0)


def test_clipped_loss_masks_and_broadcasts_sequence_advantages():
    logps = torch.tensor([[-1.0, -2.0, 99.0]])
    mask = torch.tensor([[True, True, False]])
    losses, m = clipped_policy_loss(logps, logps.clone(), torch.tensor([2.0]), mask, epsilon_low=0.2, epsilon_high=0.2)
    assert losses.tolist() == [[-2.0, -2.0, 0.0]]  # ratio 1: loss −A per token, nothing off the mask
    assert m["approx_kl"].abs().sum() == 0 and m["ratio"][0, 2] == 0


def test_gspo_sequence_ratio_and_clip():
    old = torch.zeros(2, 3)
    log_ratio = torch.tensor([[0.3, 0.1, 0.0], [-0.1, -0.2, -0.3]])  # row 0 has 2 tokens, row 1 has 3
    mask = torch.tensor([[True, True, False], [True, True, True]])
    logps = log_ratio.clone().requires_grad_(True)
    losses, m = gspo_policy_loss(logps, old, torch.tensor([1.0, 1.0]), mask, epsilon_low=0.1, epsilon_high=0.1)
    s0, s1 = math.exp(0.2), math.exp(-0.2)  # exp(mean log-ratio) per sequence
    # s0 = 1.221 > 1.1 with A > 0: clipped at 1.1; s1 = 0.819 < 0.9 but A > 0: the unclipped s1 is the min
    torch.testing.assert_close(losses, torch.tensor([[-1.1, -1.1, 0.0], [-s1, -s1, -s1]]), atol=1e-6, rtol=0)
    assert m["clip_high"].tolist() == [[1, 1, 0], [0, 0, 0]]
    torch.testing.assert_close(m["ratio"][:, 0], torch.tensor([s0, s1]))  # the sequence ratio, on every token
    rows = aggregate_rows(losses, mask, "sequence", max_tokens=3)
    torch.testing.assert_close(rows, torch.tensor([-1.1, -s1]), atol=1e-6, rtol=0)  # the paper's per-sequence loss
    rows.sum().backward()
    # ∂(−s1)/∂logp_t = −s1/|y| for each token of row 1; row 0 is clipped: 0
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, 0.0], [-s1 / 3] * 3]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one advantage per sequence"):
        gspo_policy_loss(logps, old, torch.ones(2, 3), mask, epsilon_low=0.1, epsilon_high=0.1)


def test_aggregations_match_their_definitions_and_split_freely():
    losses = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [5.0, 6.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, False, False]])

    def whole(mode):
        return float(aggregate_rows(losses, mask, mode, max_tokens=4).sum()) / aggregation_units(mask, mode)

    assert whole("sequence") == pytest.approx((2.0 + 4.0 + 5.5) / 3)  # GRPO: token mean, then sequence mean
    assert whole("token") == pytest.approx(21.0 / 6)  # DAPO: all tokens of the batch / their count
    assert whole("dr_grpo") == pytest.approx(21.0 / (3 * 4))  # Dr. GRPO: / (sequences x L_max)
    for mode in ("sequence", "token", "dr_grpo"):  # any split into micro-batches: sum numerators, sum units
        for parts in ([[0], [1, 2]], [[0, 1], [2]], [[0], [1], [2]]):
            num = sum(float(aggregate_rows(losses[p], mask[p], mode, max_tokens=4).sum()) for p in parts)
            den = sum(aggregation_units(mask[p], mode) for p in parts)
            assert num / den == pytest.approx(whole(mode)), (mode, parts)
    # the naive per-micro-batch token mean is NOT the DAPO loss: what the loop's global units avoid
    naive = (10.0 / 4 + 11.0 / 2) / 2  # micro-batches [rows 0, 1] and [row 2]: 4.0, not 3.5
    assert naive != pytest.approx(whole("token"))
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_rows(losses, mask, "mean", max_tokens=4)


def test_truncated_importance_weights_hand_values():
    old = torch.tensor([[0.5, -0.5, 2.0, 7.0]])
    sampler = torch.zeros(1, 4)
    mask = torch.tensor([[True, True, True, False]])
    w, m = truncated_importance_weights(old, sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), math.exp(-0.5), 2.0, 0.0]]))
    assert m["truncated"].tolist() == [[0, 0, 1, 0]]
    k3 = [math.exp(x) - 1 - x for x in (0.5, -0.5, 2.0)]  # (ρ − 1) − log ρ
    torch.testing.assert_close(m["kl"][0, :3], torch.tensor(k3))
    torch.testing.assert_close(m["ratio"][0, :3], torch.tensor([math.exp(0.5), math.exp(-0.5), math.exp(2.0)]))
    same, m1 = truncated_importance_weights(old, old, mask, cap=2.0)  # no mismatch: weight 1, KL 0
    assert same.tolist() == [[1.0, 1.0, 1.0, 0.0]] and m1["kl"].abs().sum() == 0
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(old, sampler, mask, cap=0.0)


def test_overlong_penalty_dapo_eq13():
    lengths = torch.tensor([5, 6, 7, 8, 10, 11])
    out = overlong_penalty(lengths, max_length=10, buffer=4)  # no penalty up to 10 − 4 = 6, then linear to −1
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, max_length=10, buffer=4, factor=0.5), out * 0.5)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_length=10, buffer=11)


def test_zero_variance_groups():
    assert zero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3, 0.3]), 2).tolist() == [True, False, True]


def test_reinforce_pp_advantages_reward_to_go_and_global_normalisation():
    mask = torch.tensor([[True, True], [True, False]])
    adv = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), None, mask, kl_coef=0.0)
    # returns-to-go [1, 1] and [0]: mean 2/3, unbiased std sqrt(1/3) -> (x − 2/3) / 0.57735
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([[(1 / 3) / s, (1 / 3) / s], [(-2 / 3) / s, 0.0]]), atol=1e-4, rtol=0)
    # KL in the reward: r_t = −β·kl_t, score at the last token; to-go of row 0 = [1 − 0.05 − 0.1, 1 − 0.1] = [0.85, 0.9]
    kl = torch.tensor([[0.1, 0.2], [0.4, 0.0]])
    with_kl = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), kl, mask, kl_coef=0.5)
    to_go = torch.tensor([0.85, 0.9, -0.2])
    ref = (to_go - to_go.mean()) / to_go.std()
    torch.testing.assert_close(with_kl[mask], ref, atol=1e-4, rtol=0)
    # group baseline (k = 2): scores [1, 0, 3, 3] -> centred [0.5, −0.5, 0, 0] before the global normalisation
    mask4 = torch.ones(4, 1, dtype=torch.bool)
    grouped = reinforce_pp_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), None, mask4, kl_coef=0.0, k=2)
    c = torch.tensor([0.5, -0.5, 0.0, 0.0])
    torch.testing.assert_close(grouped[:, 0], c / c.std(), atol=1e-4, rtol=0)


def test_rpo_is_dpo_plus_alpha_nll():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    nll = torch.tensor([2.0])  # mean NLL per chosen token
    losses, m = rpo_loss(pc, pr, rc, rr, nll, beta=0.1, alpha=0.5)
    dpo = math.log1p(math.exp(-0.2))  # h = 1 − (−1) = 2, −log σ(0.1 · 2)
    assert float(losses) == pytest.approx(dpo + 0.5 * 2.0)
    assert float(m["dpo_loss"]) == pytest.approx(dpo) and float(m["nll"]) == 2.0
    assert float(rpo_loss(pc, pr, rc, rr, nll, beta=0.1, alpha=0.0)[0]) == pytest.approx(float(dpo_loss(pc, pr, rc, rr, beta=0.1)[0]))


def test_dpop_penalises_chosen_below_reference():
    # chosen log-ratio −1 (below the reference), rejected −1: h = 0, penalty 1, z = 0.1 (0 − 5 · 1) = −0.5
    losses, m = dpop_loss(torch.tensor([-12.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1, lam=5.0)
    assert float(losses) == pytest.approx(math.log1p(math.exp(0.5)))
    assert float(m["penalty"]) == pytest.approx(1.0)
    # chosen above its reference: no penalty, DPO exactly
    args = (torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))
    assert float(dpop_loss(*args, beta=0.1, lam=50.0)[0]) == pytest.approx(float(dpo_loss(*args, beta=0.1)[0]))
