"""RL math of issue 5 against closed forms, hand-worked values and plain reference loops."""

import math
import statistics

import pytest
import torch

from preftune.losses.rl import entropy_from_logits, explained_variance, ppo_policy_loss, ppo_value_loss, reinforce_loss
from preftune.rollout.advantages import (MovingAverageBaseline, gae, group_normalized_advantages, masked_mean,
                                         masked_var, masked_whiten, rloo_advantages, token_level_rewards)
from preftune.rollout.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3

D = torch.float64


def ragged_mask(starts, lengths, T):
    mask = torch.zeros(len(starts), T, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        mask[i, s:s + n] = True
    return mask


# ---------------------------------------------------------------- masked statistics

def test_masked_mean_var_whiten_match_the_selected_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=D)
    mask = ragged_mask([0, 2, 0, 1], [7, 3, 1, 5], 7)
    x_garbage = torch.where(mask, x, torch.tensor(float("nan"), dtype=D))  # outside the mask is never read
    sel = x[mask]
    assert torch.allclose(masked_mean(x_garbage, mask), sel.mean())
    assert torch.allclose(masked_var(x_garbage, mask), sel.var(unbiased=True))
    assert torch.allclose(masked_var(x_garbage, mask, unbiased=False), sel.var(unbiased=False))
    row_means = masked_mean(x_garbage, mask, dim=1)
    assert torch.allclose(row_means, torch.stack([x[i][mask[i]].mean() for i in range(4)]))

    w = masked_whiten(x_garbage, mask)
    assert torch.all(w[~mask] == 0)
    assert abs(float(w[mask].mean())) < 1e-12 and abs(float(w[mask].std()) - 1) < 1e-6
    w_keep = masked_whiten(x_garbage, mask, shift_mean=False)
    assert torch.allclose(w_keep[mask].mean(), sel.mean()) and abs(float(w_keep[mask].std()) - 1) < 1e-6


def test_masked_stats_edge_cases():
    x = torch.tensor([[3.0, 5.0]])
    none, one = torch.tensor([[False, False]]), torch.tensor([[True, False]])
    assert float(masked_mean(x, none)) == 0.0  # count clamped: no NaN
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, one)
    assert float(masked_var(x, one, unbiased=False)) == 0.0
    assert torch.equal(masked_whiten(x, one), torch.tensor([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="no entry"):
        masked_whiten(x, none)


# ---------------------------------------------------------------- GAE

def gae_reference(rewards, values, mask, gamma, lam):
    """Plain Python double loop: each row's masked steps form one episode, V = 0 after the last."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        steps = [t for t in range(T) if mask[b][t]]
        last = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_v = values[b][steps[i + 1]] if i + 1 < len(steps) else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + values[b][t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_python_loop_on_ragged_rows(gamma, lam):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 11
    # Right-padded rows of different lengths, plus rows whose response starts after a prompt.
    mask = ragged_mask([0, 0, 0, 3, 5, 0], [11, 4, 1, 6, 2, 7], T)
    mask[5, 2:4] = False  # a gap (e.g. tool output inside the response): skipped, not a step
    rewards = torch.randn(B, T, generator=g, dtype=D)
    values = torch.randn(B, T, generator=g, dtype=D)
    adv_ref, ret_ref = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    nan = torch.tensor(float("nan"), dtype=D)
    adv, ret = gae(torch.where(mask, rewards, nan), torch.where(mask, values, nan), mask, gamma=gamma, lam=lam)
    assert torch.allclose(adv, torch.tensor(adv_ref, dtype=D), atol=1e-12)
    assert torch.allclose(ret, torch.tensor(ret_ref, dtype=D), atol=1e-12)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


def test_gae_closed_forms_and_no_grad():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 7.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    # γ = λ = 1: A_t = (sum of future rewards) − V_t, the Monte Carlo advantage.
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.6, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert not adv.requires_grad and not ret.requires_grad
    # λ = 0: A_t = δ_t = r_t + γ V_{t+1} − V_t, with V = 0 after the last response token.
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    assert torch.allclose(adv, torch.tensor([[0.5 * 0.2 - 0.5, 0.5 * 0.4 - 0.2, 1.0 - 0.4, 0.0]]))


# ---------------------------------------------------------------- grouped advantages

def test_rloo_matches_leave_one_out_definition():
    g = torch.Generator().manual_seed(2)
    P, k = 5, 4
    rewards = torch.randn(P * k, generator=g, dtype=D)
    expected = []
    for p in range(P):
        group = rewards[p * k:(p + 1) * k].tolist()
        for i in range(k):
            others = group[:i] + group[i + 1:]
            expected.append(group[i] - sum(others) / (k - 1))
    adv = rloo_advantages(rewards, k)
    assert adv.shape == (P * k,)
    assert torch.allclose(adv, torch.tensor(expected, dtype=D))
    assert torch.allclose(rloo_advantages(rewards.reshape(P, k), k), adv)
    # Identity: A_i = k/(k−1)·(r_i − group mean), and each group's advantages sum to 0.
    grouped = rewards.reshape(P, k)
    assert torch.allclose(adv.reshape(P, k), k / (k - 1) * (grouped - grouped.mean(1, keepdim=True)))
    assert torch.allclose(adv.reshape(P, k).sum(1), torch.zeros(P, dtype=D), atol=1e-12)


def test_grouped_advantages_validate_k_and_shape():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="k >= 2"):
        group_normalized_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="k=3"):
        rloo_advantages(torch.ones(4), 3)
    with pytest.raises(ValueError, match=r"\[P, k=2\]"):
        rloo_advantages(torch.ones(2, 3), 2)


def test_group_normalized_advantages_match_definition():
    rewards = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 0.5], dtype=D)
    adv = group_normalized_advantages(rewards, 3, eps=1e-6)
    g1 = [1.0, 2.0, 4.0]
    m, s = statistics.mean(g1), statistics.stdev(g1)
    assert torch.allclose(adv[:3], torch.tensor([(r - m) / (s + 1e-6) for r in g1], dtype=D))
    assert torch.equal(adv[3:], torch.zeros(3, dtype=D))  # an all-equal group: 0, not NaN
    unscaled = group_normalized_advantages(rewards.reshape(2, 3), 3, scale=False)
    assert torch.allclose(unscaled[:3], torch.tensor([r - m for r in g1], dtype=D))


# ---------------------------------------------------------------- baselines and reward shaping

def test_moving_average_baseline_update_and_resume():
    b = MovingAverageBaseline(0.9)
    assert b.update(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)  # no history: this batch's mean
    assert b.update([4.0]) == pytest.approx(2.0)
    assert b.value == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    resumed = MovingAverageBaseline(0.9)
    resumed.load_state_dict(b.state_dict())
    assert b.update([0.0]) == resumed.update([0.0]) == pytest.approx(2.2)
    assert b.value == resumed.value == pytest.approx(1.98)

    zero = MovingAverageBaseline(0.9, initial=0.0)
    assert zero.update([2.0]) == 0.0 and zero.value == pytest.approx(0.2)
    with pytest.raises(ValueError, match="decay"):
        MovingAverageBaseline(1.0)


def test_token_level_rewards_put_score_on_last_response_token():
    mask = torch.tensor([[True, True, True, False], [False, True, True, False], [True, False, False, False]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [9.0, 0.5, -0.4, 9.0], [0.2, 9.0, 9.0, 9.0]])
    scores = torch.tensor([1.0, 2.0, -1.0])
    out = token_level_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [0.0, -0.25, 0.2 + 2.0, 0.0], [-0.1 - 1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(out, expected)
    # Summed over the response: score − β·Σ kl (the seed's regularized objective).
    assert torch.allclose(out.sum(1), scores - 0.5 * torch.where(mask, kl, 0.0).sum(1))
    no_kl = token_level_rewards(scores, None, mask, kl_coef=0.5)
    assert torch.equal(no_kl, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        token_level_rewards(scores[:2], None, torch.tensor([[True, False], [False, False]]), kl_coef=0.1)


# ---------------------------------------------------------------- KL estimators

def test_kl_estimators_on_hand_values():
    logps = torch.tensor([[-1.0, -2.0, -0.7]], dtype=D)
    ref = torch.tensor([[-2.0, -1.0, -0.7]], dtype=D)
    assert torch.allclose(kl_k1(logps, ref), torch.tensor([[1.0, -1.0, 0.0]], dtype=D))
    assert torch.allclose(kl_k2(logps, ref), torch.tensor([[0.5, 0.5, 0.0]], dtype=D))
    # k3 = (e^r − 1) − r with r = ref − logp: r = −1 -> e^−1; r = 1 -> e − 2.
    assert torch.allclose(kl_k3(logps, ref), torch.tensor([[math.exp(-1), math.e - 2, 0.0]], dtype=D))
    for kind, fn in [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)]:
        assert torch.equal(kl_estimate(logps, ref, kind), fn(logps, ref))
    mask = torch.tensor([[True, False, True]])
    assert torch.equal(kl_estimate(logps, ref, "k1", mask), torch.tensor([[1.0, 0.0, 0.0]], dtype=D))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logps, ref, "k4")


def test_kl_estimators_expectations_on_a_known_distribution():
    g = torch.Generator().manual_seed(3)
    p_logits = torch.randn(8, generator=g, dtype=D)
    q_logits = p_logits + 0.5 * torch.randn(8, generator=g, dtype=D)
    logp_all, logq_all = torch.log_softmax(p_logits, 0), torch.log_softmax(q_logits, 0)
    p = logp_all.exp()
    kl_exact = float((p * (logp_all - logq_all)).sum())

    n = 200_000
    y = torch.multinomial(p, n, replacement=True, generator=g)
    logps, ref = logp_all[y], logq_all[y]
    k1, k2, k3 = kl_k1(logps, ref), kl_k2(logps, ref), kl_k3(logps, ref)
    for est in (k1, k3):  # unbiased: within 4 standard errors
        se = float(est.std()) / math.sqrt(n)
        assert abs(float(est.mean()) - kl_exact) < 4 * se
    assert bool((k3 >= 0).all()) and bool((k2 >= 0).all())
    assert float(k3.var()) < float(k1.var())  # Schulman's point: same mean, lower variance
    # k2 is biased; its exact expectation is still what the samples average to.
    k2_exact = float((p * 0.5 * (logp_all - logq_all) ** 2).sum())
    assert abs(float(k2.mean()) - k2_exact) < 4 * float(k2.std()) / math.sqrt(n)

    # For close p and q, E_p[k2] ≈ KL (the bias is third order in the log-ratio).
    q_close = torch.log_softmax(p_logits + 0.05 * torch.randn(8, generator=g, dtype=D), 0)
    kl_close = float((p * (logp_all - q_close)).sum())
    k2_close = float((p * 0.5 * (logp_all - q_close) ** 2).sum())
    assert abs(k2_close - kl_close) < 0.05 * kl_close

    # k3 >= 0 even far from equality (no cancellation or rounding below 0).
    wide = torch.linspace(-30, 30, 1001, dtype=torch.float32)
    assert bool((kl_k3(torch.zeros_like(wide), wide) >= 0).all())
    assert bool((kl_k3(wide, wide + 1e-7) >= 0).all())


def test_kl_estimator_gradients_in_expectation():
    """With y ~ π held fixed, E[∇k1] = 0, E[∇k2] = ∇KL(π‖π_ref), E[∇k3] = ∇KL(π_ref‖π) (exact sums)."""
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(6, generator=g, dtype=D, requires_grad=True)
    logq = torch.log_softmax(torch.randn(6, generator=g, dtype=D), 0)

    def expected_grad(fn):
        logp = torch.log_softmax(theta, 0)
        (grad,) = torch.autograd.grad((logp.exp().detach() * fn(logp, logq)).sum(), theta)
        return grad

    def grad_of(f):
        logp = torch.log_softmax(theta, 0)
        (grad,) = torch.autograd.grad(f(logp), theta)
        return grad

    assert torch.allclose(expected_grad(kl_k1), torch.zeros(6, dtype=D), atol=1e-12)
    assert torch.allclose(expected_grad(kl_k2), grad_of(lambda lp: (lp.exp() * (lp - logq)).sum()))
    assert torch.allclose(expected_grad(kl_k3), grad_of(lambda lp: (logq.exp() * (logq - lp)).sum()))


# ---------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller_hand_values_and_resume():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 9 vs target 6: error 0.5 clipped to 0.2; β·(1 + 0.2·256/10000).
    assert ctl.update(9.0, 256) == pytest.approx(0.1 * 1.00512)
    assert ctl.value == pytest.approx(0.100512)
    ctl.update(torch.tensor(6.6), 1000)  # error 0.1
    assert ctl.value == pytest.approx(0.100512 * 1.01)
    ctl.update(6.0, 5000)  # on target: unchanged
    assert ctl.value == pytest.approx(0.100512 * 1.01)
    resumed = AdaptiveKLController(init_kl_coef=0.5, target=6.0, horizon=10_000)
    resumed.load_state_dict(ctl.state_dict())
    ctl.update(0.0, 10_000), resumed.update(0.0, 10_000)  # error −1 clipped to −0.2: ×0.8
    assert ctl.value == resumed.value == pytest.approx(0.100512 * 1.01 * 0.8)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)


def test_fixed_kl_controller_is_constant():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 512) == 0.05 and ctl.value == 0.05
    other = FixedKLController(0.2)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# ---------------------------------------------------------------- losses

def test_reinforce_loss_per_token():
    logps = torch.tensor([[-1.0, -2.0, 5.0], [-0.5, 5.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([2.0, -1.0], requires_grad=True)
    losses, metrics = reinforce_loss(logps, adv, mask)
    assert torch.allclose(losses, torch.tensor([[2.0, 4.0, 0.0], [-0.5, 0.0, 0.0]])) and metrics == {}
    losses.sum().backward()
    # ∇ = −A·∇log π(y|x): every response token of a row gets −A; nothing flows into the advantages.
    assert torch.equal(logps.grad, torch.tensor([[-2.0, -2.0, 0.0], [1.0, 0.0, 0.0]]))
    assert adv.grad is None
    per_token_adv, _ = reinforce_loss(logps, torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]]), mask)
    assert torch.equal(per_token_adv, losses)


def test_ppo_policy_loss_hand_values_and_zero_grad_where_clipped():
    # (advantage, ratio): inside, above, below the clip range for A > 0 and A < 0; ε = 0.2.
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -2.0, 3.0]])
    ratio = torch.tensor([[1.1, 1.5, 0.5, 1.5, 0.5, 0.9, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True] * 6 + [False]])
    old = torch.full((1, 7), -1.3, dtype=torch.float64)
    logps = (old + ratio.log()).requires_grad_()
    losses, m = ppo_policy_loss(logps, old, adv.double(), mask, clip_range=0.2)
    #               inside  clipped  unclipped  unclipped  clipped  inside  masked
    expected = [[-1.1, -1.2, -0.5, 1.5, 0.8, 1.8, 0.0]]
    assert torch.allclose(losses, torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(m["clipfrac"], torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    r = ratio[0, :6]
    assert torch.allclose(m["approx_kl"][0, :6], (r - 1) - r.log()) and float(m["approx_kl"][0, 6]) == 0
    assert torch.allclose(m["ratio"][0, :6], r) and not m["ratio"].requires_grad
    losses.sum().backward()
    # d/dlogp of −A·ratio is −A·ratio; zero where the clipped term won, and at the masked token.
    assert torch.allclose(logps.grad, torch.tensor([[-1.1, 0.0, -0.5, 1.5, 0.0, 1.8, 0.0]], dtype=torch.float64))


def test_ppo_policy_gradient_equals_reinforce_at_ratio_one():
    g = torch.Generator().manual_seed(5)
    logps = torch.randn(3, 5, generator=g).requires_grad_()
    adv = torch.randn(3, 5, generator=g)
    mask = ragged_mask([0, 1, 0], [5, 3, 2], 5)
    ppo, m = ppo_policy_loss(logps, logps.detach(), adv, mask, clip_range=0.2)
    (g_ppo,) = torch.autograd.grad(ppo.sum(), logps)
    rf, _ = reinforce_loss(logps, adv, mask)
    (g_rf,) = torch.autograd.grad(rf.sum(), logps)
    assert torch.allclose(g_ppo, g_rf) and float(m["clipfrac"].sum()) == 0 and float(m["approx_kl"].abs().sum()) == 0


def test_ppo_value_loss_clipping():
    # ε_v = 0.2; columns: clipped (far from R), inside, moved away but unclipped wins, two unclipped, clipped.
    old = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, 0.5, 0.0, 2.0, 0.0, 4.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 6 + [False]])
    losses, m = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert torch.allclose(losses, torch.tensor([[0.32, 0.405, 0.125, 2.0, 2.0, 0.32, 0.0]]))
    assert torch.equal(m["vf_clipfrac"], torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]]))
    losses.sum().backward()
    assert torch.allclose(values.grad, torch.tensor([[0.0, -0.9, 0.5, -2.0, 2.0, 0.0, 0.0]]))


def test_entropy_from_logits():
    V = 16
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 3, V)), torch.full((2, 3), math.log(V)))
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, V, generator=g, dtype=D) * 3
    p = torch.softmax(logits, -1)
    assert torch.allclose(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    # Huge logits stay finite; banned (−inf) tokens give 0 entropy and finite gradients.
    assert torch.isfinite(entropy_from_logits(torch.tensor([[1e4, -1e4, 0.0]]))).all()
    banned = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]], requires_grad=True)
    h = entropy_from_logits(banned)
    h.sum().backward()
    assert torch.allclose(h, torch.tensor([math.log(2)])) and torch.isfinite(banned.grad).all()
    assert entropy_from_logits(torch.zeros(3, V, dtype=torch.bfloat16)).dtype == torch.float32


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 4.0, 99.0], [0.0, 3.0, 99.0, 99.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    mean = returns[mask].mean()
    assert float(explained_variance(torch.full_like(returns, float(mean)), returns, mask)) == pytest.approx(0.0, abs=1e-6)
    worse = float(explained_variance(-returns, returns, mask))
    assert worse < 0
    assert math.isnan(float(explained_variance(returns, torch.ones_like(returns), mask)))


def test_masked_whiten_over_processes_equals_whitening_everything():
    """PPO whitens advantages over every process's tokens: two shards whitened with a summing
    all-reduce equal the whole batch whitened at once."""
    import threading

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen) * 3 + 1
    mask = torch.rand(6, 5, generator=gen) > 0.3
    whole = masked_whiten(x, mask)

    barrier, slots = threading.Barrier(2), [None, None]

    def all_reduce(rank):
        def reduce_sum(t):
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return reduce_sum

    out = [None, None]

    def shard(rank):
        rows = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal shards
        out[rank] = masked_whiten(x[rows], mask[rows], reduce_sum=all_reduce(rank))

    threads = [threading.Thread(target=shard, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close(torch.cat(out), whole, atol=1e-6, rtol=0)
    # one process: the identity reduce equals the local statistics
    torch.testing.assert_close(masked_whiten(x, mask, reduce_sum=lambda t: t), whole, atol=1e-6, rtol=0)
    kept = masked_whiten(x, mask, shift_mean=False, reduce_sum=lambda t: t)
    torch.testing.assert_close(kept, masked_whiten(x, mask, shift_mean=False), atol=1e-6, rtol=0)
