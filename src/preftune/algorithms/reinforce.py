"""REINFORCE with a moving-average baseline (seed 000's derivation of the policy gradient)."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.algorithms.online import OnlineAlgorithm, RolloutConfig
from preftune.algorithms.rloo import policy_gradient_forward
from preftune.config import ConfigError, doc
from preftune.rollout.advantages import MovingAverageBaseline


@dataclass
class ReinforceConfig(RolloutConfig):
    baseline_decay: float = doc(0.9, "Decay of the moving-average reward baseline b ← d·b + (1 − d)·mean(r).")

    def validate(self, path: str) -> None:
        super().validate(path)
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ConfigError(f"{path}.baseline_decay: must lie in [0, 1), got {self.baseline_decay}")


class Reinforce(OnlineAlgorithm):
    """REINFORCE: advantage = reward − a moving-average baseline of past rewards."""

    name = "reinforce"
    Config = ReinforceConfig

    def __init__(self, config, policy, tokenizer, run):
        super().__init__(config, policy, tokenizer, run)

        self.baseline = MovingAverageBaseline(config.baseline_decay)

    def advantages(self, rows, *, scores, rewards, forward, global_rewards, accelerator):
        b = self.baseline.update(global_rewards)  # from earlier batches only (unbiased); same on every process
        adv = rewards - b
        for row, a in zip(rows, adv.tolist()):
            row["advantage"] = a
        return rows, {"advantage/mean": adv, "advantage/abs": adv.abs(), "baseline": adv * 0 + b}

    def forward(self, batch):
        return policy_gradient_forward(self, batch)

    def online_state_dict(self):
        return {**super().online_state_dict(), "baseline": self.baseline.state_dict()}

    def load_online_state_dict(self, state):
        super().load_online_state_dict(state)
        self.baseline.load_state_dict(state["baseline"])
