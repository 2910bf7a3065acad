"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300) and its repairs, on the one loop:
k samples per prompt, group-normalised advantages, the clipped ratio over μ epochs of each rollout
(the rollout source replays it, as for PPO), and the KL to the reference as a loss term (k3) or in
the reward. Options: the loss aggregation (GRPO ``sequence``, DAPO ``token``, Dr. GRPO ``dr_grpo``),
DAPO's clip-higher, dynamic sampling and overlong shaping (Yu et al. 2025, arXiv:2503.14476), GSPO's
sequence-level ratio (Zheng et al. 2025, arXiv:2507.18071; also the ``gspo`` algorithm), and
truncated importance sampling (TIS) when the sampler's log-probs differ from the training forward's.

``ClippedPolicyGradient`` holds what GRPO, GSPO and REINFORCE++ share; they differ in advantages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from preftune.algorithms.base import Needs
from preftune.algorithms.online import TIS_HELP, OnlineAlgorithm, RolloutConfig
from preftune.algorithms.rloo import REUSE_SAMPLER_HELP
from preftune.config import ConfigError, doc
from preftune.losses.grpo import (
    aggregate_rows,
    aggregation_units,
    clipped_policy_loss,
    gspo_policy_loss,
)
from preftune.models.logprobs import _scored, per_token_logps
from preftune.rollout.advantages import group_normalized_advantages, overlong_penalty, zero_variance_groups
from preftune.rollout.kl import kl_estimate


@dataclass
class ClippedConfig(RolloutConfig):
    samples_per_prompt: int = doc(4, "k: completions sampled per prompt (the group).")
    kl_coef: float = doc(0.0, "β: weight of the KL to the reference. 0 = no KL and no reference model kept (DAPO, Dr. GRPO).")
    kl_estimator: Literal["k1", "k2", "k3"] = doc("k3", "Per-token KL estimator (Schulman): k1 = log π/π_ref, k2 = ½(log π/π_ref)², k3 = (π_ref/π − 1) − log π_ref/π (GRPO's loss term).")
    kl_in_reward: bool = doc(False, "false: β·KL is a per-token loss term inside the aggregation (GRPO); true: β·KL is subtracted from the reward before advantages.")
    aggregation: Literal["token", "sequence", "dr_grpo"] = doc(
        "token", "How per-token losses become the loss: 'token' = sum over every token of the global batch / its token count "
        "(DAPO, TRL's default); 'sequence' = mean over each sequence's tokens, then over sequences (original GRPO); "
        "'dr_grpo' = sum over tokens / (sequences x max_new_tokens), a constant normaliser (Dr. GRPO).",
    )
    epsilon_low: float = doc(0.2, "ε_low: the ratio is clipped below at 1 − ε_low.")
    epsilon_high: float = doc(0.2, "ε_high: the ratio is clipped above at 1 + ε_high (DAPO's clip-higher: 0.28).")
    num_epochs: int = doc(1, "μ: passes over each rollout (replayed by the rollout source; the ratio is 1 on the first pass).")
    minibatches: int = doc(1, "Optimizer steps per pass over a rollout (a rollout holds minibatches global batches).")
    reuse_sampler_logps: bool = doc(True, REUSE_SAMPLER_HELP)
    tis_cap: Optional[float] = doc(None, TIS_HELP)
    dynamic_sampling: bool = doc(
        False, "DAPO dynamic sampling: drop groups whose k rewards are all equal (zero advantage, no signal) and refill "
        "with freshly sampled prompts, up to dynamic_sampling_rounds extra rounds (then zero-variance groups fill the rest).",
    )
    dynamic_sampling_rounds: int = doc(3, "Most extra sampling rounds per rollout for dynamic sampling.")
    overlong_buffer: Optional[int] = doc(
        None, "DAPO overlong shaping: over the last N tokens before max_new_tokens the reward gets a linear penalty from 0 "
        "to −overlong_penalty (soft overlong punishment). null = off.",
    )
    overlong_penalty: float = doc(1.0, "Size of the overlong penalty at max_new_tokens.")

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.epsilon_low < 0 or self.epsilon_high < 0 or self.epsilon_low >= 1:
            raise ConfigError(f"{path}: epsilon_low must lie in [0, 1) and epsilon_high be >= 0, got {self.epsilon_low}, {self.epsilon_high}")
        if self.num_epochs < 1 or self.minibatches < 1 or self.dynamic_sampling_rounds < 0:
            raise ConfigError(f"{path}: num_epochs and minibatches must be >= 1, dynamic_sampling_rounds >= 0")
        if self.kl_target is not None and self.kl_coef <= 0:
            raise ConfigError(f"{path}.kl_target: the adaptive KL controller starts from kl_coef, which must then be > 0 (got {self.kl_coef})")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ConfigError(f"{path}.dynamic_sampling: needs samples_per_prompt >= 2, got {self.samples_per_prompt}")
        if self.overlong_buffer is not None and not 0 < self.overlong_buffer <= self.max_new_tokens:
            raise ConfigError(f"{path}.overlong_buffer: must lie in [1, max_new_tokens={self.max_new_tokens}], got {self.overlong_buffer}")


@dataclass
class GRPOConfig(ClippedConfig):
    scale_rewards: Optional[bool] = doc(
        None, "Divide group-centred rewards by the group's std (GRPO). null = true, except with aggregation dr_grpo "
        "(Dr. GRPO drops it: it up-weights prompts whose samples score nearly the same).",
    )
    ratio_level: Literal["token", "sequence"] = doc(
        "token", "'token': one importance ratio per token (GRPO); 'sequence': GSPO's length-normalised sequence ratio "
        "exp(mean_t log π/π_old), clipped per sequence (use small epsilons, e.g. 3e-4 / 4e-4).",
    )

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.samples_per_prompt < 2:
            raise ConfigError(f"{path}.samples_per_prompt: group-relative advantages need at least 2 samples per prompt, got {self.samples_per_prompt}")


@dataclass
class GSPOConfig(GRPOConfig):
    ratio_level: Literal["token", "sequence"] = doc("sequence", "'sequence': GSPO's length-normalised sequence ratio (the point of gspo); 'token': GRPO's.")
    aggregation: Literal["token", "sequence", "dr_grpo"] = doc("sequence", "Loss aggregation (see grpo.aggregation); GSPO averages its sequence losses: 'sequence'.")
    epsilon_low: float = doc(3e-4, "ε_low of the sequence ratio (GSPO paper: 3e-4).")
    epsilon_high: float = doc(4e-4, "ε_high of the sequence ratio (GSPO paper: 4e-4).")


class ClippedPolicyGradient(OnlineAlgorithm):
    """Shared by GRPO, GSPO and REINFORCE++: the clipped ratio, aggregation, epochs, TIS, DAPO's sampling.

    Single pass (``num_epochs = minibatches = 1``): no update happens between the rollout and the one
    optimizer step on it, so π_old is the policy of the training forward, and its log-probs, detached,
    are π_old's (as TRL's GRPOTrainer does for num_iterations = 1): the ratio is exactly 1 and the TIS
    weight min(exp(logps − sampler_logps), cap); the same gradient as with a rollout forward of the
    policy, without that forward (:meth:`old_policy_in_training`).
    """

    needs = Needs(data_kind="prompts", loss_unit="token", reference_model=True)

    def tis_cap(self):
        return self.config.tis_cap

    def reuse_sampler_logps(self) -> bool:
        return self.config.reuse_sampler_logps

    def old_policy_in_training(self) -> bool:
        """Single pass, and no rollout-time reader of π_old: the KL in the reward (rewards, REINFORCE++'s
        per-token advantages) and the adaptive KL controller (its update precedes the step) need the KL
        before the training forward; without a reference (β = 0) the KL is 0 and none of them applies."""
        c = self.config
        kl_at_rollout = self.uses_reference() and (c.kl_in_reward or c.kl_target is not None)
        return c.num_epochs == 1 and c.minibatches == 1 and not kl_at_rollout

    def __init__(self, config, policy, tokenizer, run):
        if getattr(config, "dynamic_sampling", False) and run.train.sharding != "none":
            # Refills are decided per process, but a sharded decode gathers weights collectively.
            raise ConfigError(f"{self.name}.dynamic_sampling: not supported with train.sharding={run.train.sharding} "
                              "(each process would sample a different number of times); turn one of them off")
        super().__init__(config, policy, tokenizer, run)
        self._pool: list[dict] = []

    def uses_reference(self) -> bool:
        return self.config.kl_coef > 0 or self.config.kl_target is not None

    def epochs(self) -> int:
        return self.config.num_epochs

    def minibatches(self) -> int:
        return self.config.minibatches

    def make_source(self, examples, accelerator):
        self._pool = examples  # prompts for dynamic sampling's refills
        return super().make_source(examples, accelerator)

    # -- sampling ----------------------------------------------------------------------------------
    def shape_scores(self, scores, samples):
        scores = super().shape_scores(scores, samples)
        c = self.config
        if c.overlong_buffer is None:
            return scores
        lengths = torch.tensor([len(s["completion_ids"]) for s in samples])
        return scores + overlong_penalty(lengths, max_length=c.max_new_tokens, buffer=c.overlong_buffer, factor=c.overlong_penalty)

    def sample_groups(self, prompts, *, seed, accelerator):
        """Dynamic sampling (DAPO §3.2): keep the groups whose rewards differ; refill the others with
        groups of prompts drawn (seeded) from the whole prompt set, for at most dynamic_sampling_rounds
        rounds; groups still missing are filled with zero-variance groups of the first draw."""
        first = super().sample_groups(prompts, seed=seed, accelerator=accelerator)
        if not self.config.dynamic_sampling:
            return first
        k, n_groups = self.config.samples_per_prompt, len(prompts)
        groups = _split_groups(first, k)
        flat = zero_variance_groups(first[3], k).tolist()
        kept, spare = [g for g, z in zip(groups, flat) if not z], [g for g, z in zip(groups, flat) if z]
        rng, rounds = random.Random(seed), 0
        while len(kept) < n_groups and rounds < self.config.dynamic_sampling_rounds:
            rounds += 1
            extra = [self._pool[rng.randrange(len(self._pool))] for _ in range(n_groups - len(kept))]
            draw = super().sample_groups(extra, seed=seed + 7919 * rounds, accelerator=accelerator)
            zero = zero_variance_groups(draw[3], k).tolist()
            kept += [g for g, z in zip(_split_groups(draw, k), zero) if not z][: n_groups - len(kept)]
        final = kept + spare[: n_groups - len(kept)]
        repeated, samples = [r for g in final for r in g[0]], [s for g in final for s in g[1]]
        raw, scores = torch.cat([g[2] for g in final]), torch.cat([g[3] for g in final])
        return repeated, samples, raw, scores, {
            "dynamic_sampling/zero_variance_fraction": sum(flat) / n_groups,
            "dynamic_sampling/kept_zero_variance_fraction": max(0, n_groups - len(kept)) / n_groups,
            "dynamic_sampling/rounds": rounds,
        }

    # -- the step ------------------------------------------------------------------------------------
    def count_units(self, batch):
        return aggregation_units(_scored(batch["completion_mask"]), self.config.aggregation)

    def policy_loss(self, logps, batch, mask):
        c = self.config
        adv = batch["advantages"] if "advantages" in batch else batch["advantage"]
        return clipped_policy_loss(logps, batch["old_logps"], adv, mask, epsilon_low=c.epsilon_low, epsilon_high=c.epsilon_high)

    def forward(self, batch):
        c = self.config
        mask = _scored(batch["completion_mask"])
        deferred = self.old_policy_in_training()
        if deferred:
            logps, entropy = per_token_logps(self.policy, batch, with_entropy=True)
            batch = {**batch, "old_logps": logps.detach()}
        else:
            logps = per_token_logps(self.policy, batch)
        pg, pm = self.policy_loss(logps, batch, mask)
        n = mask.sum().float()
        metrics = {f"policy/{k}": (v.sum(), n) for k, v in pm.items()}
        if deferred:
            metrics.update(self.old_policy_metrics(logps, entropy, batch, mask))
        weights, tis_metrics = self.tis_weights(batch, mask, mismatch=deferred)
        if weights is not None:
            pg = pg * weights
            metrics.update(tis_metrics)
        per_token = pg + self.kl_loss_term(logps, batch)
        if not c.kl_in_reward and self.uses_reference():
            metrics["kl/loss_term"] = (torch.where(mask, per_token - pg, 0.0).sum().detach(), n)
        metrics["policy/loss"] = (torch.where(mask, pg, 0.0).sum().detach(), n)
        rows = aggregate_rows(per_token, mask, c.aggregation, max_tokens=c.max_new_tokens)
        return rows.sum(), metrics

    @torch.no_grad()
    def old_policy_metrics(self, logps, entropy, batch, mask) -> dict:
        """The rollout metrics of π_old, measured by the training forward when it is π_old (same names and
        definitions as the rollout's, per row then averaged over rows): ``entropy`` (token mean of the row),
        ``kl`` (Σ_t of the per-token KL estimate to the reference) and ``reward/with_kl`` (score − β·kl)."""
        lengths = mask.sum(-1).float()
        rows = torch.tensor(float(mask.shape[0]), device=logps.device)
        out = {"entropy": ((torch.where(mask, entropy, 0.0).sum(-1) / lengths.clamp(min=1)).sum(), rows)}
        if self.uses_reference():
            seq_kl = kl_estimate(logps.detach(), batch["ref_logps"], self.config.kl_estimator, mask).sum(-1)
            out["kl"] = (seq_kl.sum(), rows)
            out["reward/with_kl"] = ((batch["score"] - self.kl_ctl.value * seq_kl).sum(), rows)
        return out


def _split_groups(draw: tuple, k: int) -> list[tuple]:
    """(repeated, samples, raw [N], scores [N], _) -> one (rows, samples, raw [k], scores [k]) per prompt."""
    repeated, samples, raw, scores = draw[:4]
    return [(repeated[i : i + k], samples[i : i + k], raw[i : i + k], scores[i : i + k]) for i in range(0, len(samples), k)]


class GRPO(ClippedPolicyGradient):
    """GRPO: group-normalised advantages, clipped ratio over μ epochs; DAPO / Dr. GRPO / GSPO / TIS options."""

    name = "grpo"
    Config = GRPOConfig

    def scale(self) -> bool:
        c = self.config
        return c.aggregation != "dr_grpo" if c.scale_rewards is None else c.scale_rewards

    def advantages(self, rows, *, scores, rewards, forward, global_rewards, accelerator):
        k = self.config.samples_per_prompt
        adv = group_normalized_advantages(rewards, k, scale=self.scale())
        for row, a in zip(rows, adv.tolist()):
            row["advantage"] = a
        # zero_variance_groups (of the task reward, before any KL) is reported for every online algorithm
        return rows, {"advantage/mean": adv, "advantage/abs": adv.abs()}

    def policy_loss(self, logps, batch, mask):
        if self.config.ratio_level == "token":
            return super().policy_loss(logps, batch, mask)

        c = self.config
        return gspo_policy_loss(logps, batch["old_logps"], batch["advantage"], mask, epsilon_low=c.epsilon_low, epsilon_high=c.epsilon_high)


class GSPO(GRPO):
    """GSPO (Zheng et al. 2025): GRPO with a length-normalised sequence-level ratio, clipped per sequence."""

    name = "gspo"
    Config = GSPOConfig
    needs = Needs(data_kind="prompts", loss_unit="row", reference_model=True)  # default aggregation: per sequence
