"""REINFORCE++ (Hu et al. 2025, arXiv:2501.03262): REINFORCE with PPO's clipped ratio and no critic;
per-token advantages r − β·Σ_{i≥t} KL_i normalised over the global batch, or (``baseline: group``,
REINFORCE++-baseline) the score first centred on the mean of its prompt's k samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from preftune.algorithms.grpo import ClippedConfig, ClippedPolicyGradient
from preftune.config import ConfigError, doc
from preftune.rollout.advantages import reinforce_pp_advantages, zero_variance_groups


@dataclass
class ReinforcePPConfig(ClippedConfig):
    baseline: Literal["group", "none"] = doc(
        "group", "'group': REINFORCE++-baseline, subtract the mean score of the prompt's k samples before the global "
        "normalisation (needs samples_per_prompt >= 2); 'none': REINFORCE++, the global normalisation alone.",
    )
    kl_coef: float = doc(0.01, "β: weight of the KL to the reference (0 = no reference model kept).")
    kl_estimator: Literal["k1", "k2", "k3"] = doc("k1", "Per-token KL estimator (Schulman): k1 = log π/π_ref (in the reward), k2, k3 (as a loss term).")
    kl_in_reward: bool = doc(True, "true: β·KL_t is a per-token reward, summed to go into the advantage (REINFORCE++); false: a k3/k2 loss term.")

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.baseline == "group" and self.samples_per_prompt < 2:
            raise ConfigError(f"{path}.baseline: 'group' needs samples_per_prompt >= 2, got {self.samples_per_prompt}")


class ReinforcePP(ClippedPolicyGradient):
    """REINFORCE++: clipped REINFORCE with globally normalised token advantages (or a group baseline first)."""

    name = "reinforce_pp"
    Config = ReinforcePPConfig
    token_fields = ("old_logps", "ref_logps", "advantages")

    def advantages(self, rows, *, scores, rewards, forward, global_rewards, accelerator):
        c = self.config
        mask = forward["mask"]
        kl = forward["kl"] if c.kl_in_reward and self.uses_reference() else None
        dev = accelerator.device
        k = c.samples_per_prompt if c.baseline == "group" else None
        adv = reinforce_pp_advantages(scores, kl, mask, kl_coef=self.kl_ctl.value, k=k,
                                      reduce_sum=lambda t: accelerator.reduce(t.to(dev), reduction="sum").cpu())
        for i, row in enumerate(rows):
            row["advantages"] = adv[i][mask[i]].tolist()
        n = mask.sum(-1).clamp(min=1)
        extra = {"advantage/mean": (adv * mask).sum(-1) / n, "advantage/abs": (adv.abs() * mask).sum(-1) / n}
        if c.samples_per_prompt > 1:
            extra["zero_variance_groups"] = zero_variance_groups(scores, c.samples_per_prompt).float().repeat_interleave(c.samples_per_prompt)
        return rows, extra
