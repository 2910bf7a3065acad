"""The distributional (mean-and-variance) reward, reward.groups=distributional: its loss in closed form and
a short run through the CLI."""

import json
import math

import pytest
import torch

from preftune.losses.diverse import mean_variance_preference_loss
from tests.conftest import cli


def test_mean_variance_loss_in_closed_form():
    # z = (1.5 − 0.5) / √(0.6² + 0.8²) = 1: −log Φ(1); equal means: −log Φ(0) = ln 2 whatever σ.
    losses, m = mean_variance_preference_loss(torch.tensor([1.5, 0.0]), torch.tensor([0.6, 3.0]),
                                              torch.tensor([0.5, 0.0]), torch.tensor([0.8, 4.0]))
    phi_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert losses.tolist() == pytest.approx([-math.log(phi_1), math.log(2)], rel=1e-6)
    assert m["pair_std"].tolist() == pytest.approx([1.0, 5.0]) and m["accuracies"].tolist() == [1.0, 0.0]


def test_a_three_to_one_vote_is_learnt_as_its_share():
    """One pair labelled y0 ≻ y1 three times and y1 ≻ y0 once: the maximum likelihood has Φ(z) = 3/4,
    z = Φ⁻¹(0.75) = 0.6745, whatever the scale of μ and σ."""
    mean = torch.zeros(2, requires_grad=True)
    log_std = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([mean, log_std], lr=0.05)
    win, lose = torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1, 1, 0])
    for _ in range(800):
        opt.zero_grad()
        std = log_std.exp()
        losses, _ = mean_variance_preference_loss(mean[win], std[win], mean[lose], std[lose])
        losses.mean().backward()
        opt.step()
    z = (mean[0] - mean[1]) / log_std.exp().square().sum().sqrt()
    assert float(z.detach()) == pytest.approx(0.6745, abs=5e-3)


def test_distributional_reward_through_cli(tmp_path):
    from preftune.rewards.model import RewardModel

    out = tmp_path / "dist"
    proc = cli("train", "configs/reward_conditioned_tiny.yaml", f"output_dir={out}", "reward.groups=distributional",
               "train.max_steps=10", "train.eval_steps=10", "train.progress_bar=false", env={"PREFTUNE_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "reward_eval.json").read_text())
    assert report == json.loads((out / "mean" / "reward_eval.json").read_text()) | {"std": report["std"]}
    assert set(report["std"]["groups"]) == {"A", "B"} and report["std"]["pairs"]["count"] == report["pairs"] == 32
    assert all(v > 0 for v in report["std"]["groups"].values())
    mean = RewardModel.load(out / "mean")  # μ is a one-label reward model like any other
    assert len(mean(["Q: red?"], [" yes red"]).scores) == 1
