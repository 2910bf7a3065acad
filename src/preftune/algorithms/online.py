"""Online RL with a KL leash (seed 000, RLHF step 3): maximise E[r(x, y)] − β·KL(π_θ‖π_ref).

An online algorithm's batch source is a RolloutSource (preftune/rollout/source.py): prompts ->
samples from the current policy (drawn by the rollout backend, ``<algorithm>.sampler``: see
preftune/rollout/backends.py) -> reward -> old-policy log-probs (a no-grad policy forward over the
rollout; by default RLOO and the GRPO family take them from an exact sampler's own logits instead, see
preftune/rollout/sampling.py; a single-pass GRPO / GSPO / REINFORCE++ update with the KL out of the
reward scores no old policy at all and takes π_old from its training forward, see
``OnlineAlgorithm.old_policy_in_training``) -> KL to the reference -> the algorithm's advantages. The loop is the same
one every algorithm uses. Subclasses say how a scored rollout becomes training rows (``advantages``)
and how a batch becomes a loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import torch

from preftune.algorithms.base import Algorithm, Needs
from preftune.config import ConfigError, doc, shared
from preftune.data.batches import RolloutBatch
from preftune.data.collate import collate_completions
from preftune.losses.grpo import truncated_importance_weights
from preftune.losses.metrics import row_metrics
from preftune.models.reference import reference_model
from preftune.rewards.spec import check_reward_spec, resolve_reward
from preftune.rollout.health import rollout_health, warn_nonfinite_rewards
from preftune.rollout.kl import AdaptiveKLController, FixedKLController, kl_estimate
from preftune.rollout.samples import log_samples
from preftune.rollout.backends import SamplingSettings, make_backend
from preftune.rollout.scoring import REFERENCE_ADAPTER_OFF, scatter_tokens, score_tokens
from preftune.rollout.source import RolloutSource, pad_token_fields

log = logging.getLogger("preftune.rl")

TOKEN_FIELDS = ("old_logps", "ref_logps")

TIS_HELP = (
    "Truncated importance sampling: keep the sampler's log-probs, take the old policy's from the policy's own "
    "forward (a no-grad forward of the rollout; for a single-pass grpo/gspo/reinforce_pp update with the KL out of "
    "the reward, the training forward itself, detached) and weight each token's policy-gradient term by "
    "min(π_old/π_sampler, cap) (e.g. 2.0); logs the mismatch (tis/ratio, tis/kl: KL(π_sampler‖π_old), "
    "tis/truncated). For samplers that differ from the training forward (bf16 decode, sampler=fp16 / int8, which "
    "require it). null = off."
)
SAMPLER_HELP = (
    "Rollout backend (preftune/rollout/backends.py). 'hf': the policy's own generate (KV cache; exact). 'int8' / "
    "'fp16': a dynamically quantized copy of the policy with int8 / fp16 linear weights (CPU, LoRA merged), "
    "re-quantized from the policy before every rollout; their samples are corrected by truncated importance "
    "sampling, so they need tis_cap, and the old-policy log-probs come from the fp32 policy (a no-grad forward "
    "of the rollout, or for a single-pass grpo/gspo/reinforce_pp update with the KL out of the reward the "
    "training forward itself: no extra forward). "
    "On SmolLM2-135M: int8 decodes ~1.7x faster but is far from the policy (KL ~0.5 nats/token: activation "
    "outliers), fp16 ~1.3x faster within KL ~3e-6."
)


@dataclass
class RolloutConfig:
    reward: str = doc(
        "vader",
        "Reward source: 'vader' (VADER sentiment of the completion), 'module:function' or 'file.py:function' "
        "(texts in, floats out), or trained reward model(s): a run directory or model folder, comma-separated "
        "for an ensemble.",
    )
    samples_per_prompt: int = doc(2, "Completions sampled per prompt in each rollout.")
    max_new_tokens: int = shared("max_new_tokens", 48)
    temperature: float = shared("temperature", note="Rollouts need > 0.")
    top_p: float = shared("top_p")
    top_k: int = shared("top_k")
    generation_batch_size: int = doc(16, "Sequences per generate call (KV cache on, left padding).")
    kl_coef: float = doc(0.05, "β: weight of the KL penalty to the reference policy (the initial value when adaptive).")
    kl_estimator: Literal["k1", "k2", "k3"] = doc(
        "k1", "Per-token KL estimator (Schulman): k1 = log π/π_ref, k2 = ½(log π/π_ref)², k3 = (π_ref/π − 1) − log π_ref/π."
    )
    kl_in_reward: bool = doc(
        True, "true: subtract β·KL from the reward (InstructGPT); false: add β·KL as a loss term (GRPO-style; needs "
        "kl_estimator k3 or k2, since k1's gradient is zero in expectation)."
    )
    kl_target: Optional[float] = doc(
        None, "Adaptive KL controller (Ziegler et al. 2019): target KL per sequence. null = fixed β."
    )
    kl_horizon: int = doc(10000, "Adaptive KL controller horizon (in samples).")
    missing_eos_penalty: Optional[float] = doc(
        None, "Subtract this from the score of completions that never emit EOS (hit max_new_tokens). null = none."
    )
    disable_dropout: bool = doc(
        True,
        "Set every dropout probability of the policy (LoRA dropout included) to 0, so that the ratio π/π_old "
        "and the KL measure the policy and not dropout noise.",
    )
    log_samples_steps: int = doc(10, "Write a few prompt/response/reward samples to OUTPUT_DIR/samples.jsonl every N rollouts (0 = never).")
    sampler: Literal["hf", "int8", "fp16"] = doc("hf", SAMPLER_HELP)

    def validate(self, path: str) -> None:
        if self.samples_per_prompt < 1 or self.max_new_tokens < 1 or self.generation_batch_size < 1:
            raise ConfigError(f"{path}: samples_per_prompt, max_new_tokens and generation_batch_size must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"{path}.temperature: RL samples need temperature > 0, got {self.temperature}")
        if self.kl_coef < 0:
            raise ConfigError(f"{path}.kl_coef: must be >= 0, got {self.kl_coef}")
        if not self.kl_in_reward and self.kl_estimator == "k1" and (self.kl_coef > 0 or self.kl_target is not None):
            raise ConfigError(
                f"{path}.kl_estimator: k1 as a loss term (kl_in_reward=false) has zero expected gradient, so it would "
                "not hold the policy near the reference; use k3 (GRPO's choice: gradient of KL(π_ref‖π)) or k2 "
                "(gradient of KL(π‖π_ref)), or keep the KL in the reward"
            )

        cap = getattr(self, "tis_cap", None)
        if cap is not None and cap <= 0:
            raise ConfigError(f"{path}.tis_cap: must be > 0 (or null), got {cap}")
        if self.sampler != "hf" and cap is None:
            raise ConfigError(
                f"{path}.sampler: the {self.sampler} sampler's log-probs differ from the policy's, so its samples need "
                f"truncated importance sampling: set {path}.tis_cap (e.g. 2.0)" if hasattr(self, "tis_cap") else
                f"{path}.sampler: {self.sampler} needs truncated importance sampling (tis_cap), which this algorithm "
                "does not have; use rloo, grpo, gspo or reinforce_pp, or sampler=hf"
            )
        try:
            check_reward_spec(self.reward)  # fail before any model loads, not after
        except ValueError as err:
            raise ConfigError(f"{path}.reward: {err}") from None


class OnlineAlgorithm(Algorithm):
    needs = Needs(data_kind="prompts", loss_unit="row", reference_model=True)
    online = True
    token_fields: ClassVar[tuple[str, ...]] = TOKEN_FIELDS
    """Per-completion-token lists a rollout row carries into its training batch."""

    def __init__(self, config: Any, policy, tokenizer, run):
        super().__init__(config, policy, tokenizer, run)
        if config.disable_dropout:
            dropouts = [m for m in self.policy.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
            for m in dropouts:
                m.p = 0.0
            if dropouts:
                log.info("disabled %d dropout layer(s) of the policy (%s.disable_dropout)", len(dropouts), self.name)

        self.reward_fn = resolve_reward(config.reward, allow_nonfinite=True)  # the loop's guard judges NaN/inf
        if config.kl_target is not None:
            self.kl_ctl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(config.kl_coef)
        self.reference_model = reference_model(policy, copy_policy=self.needs.reference_model and self.uses_reference())
        if config.sampler != "hf" and run.train.sharding != "none":
            raise ConfigError(f"{self.name}.sampler={config.sampler}: not supported with train.sharding={run.train.sharding} "
                              "(the quantized copy needs the full weights on every process); use sampler=hf")
        if self.old_policy_in_training():  # the training forward supplies π_old (and no reference: no KL to take)
            self.token_fields = tuple(f for f in self.token_fields if f != "old_logps" and (f != "ref_logps" or self.uses_reference()))
        if self.tis_cap() is not None:
            self.token_fields = self.token_fields + ("sampler_logps",)
        self.sampler = make_backend(config.sampler, tokenizer, exact=run.model.dtype == "fp32")
        self.sampler.sync(policy)

    def uses_reference(self) -> bool:
        """Whether the reference policy is scored at all (GRPO with β = 0 keeps none: no KL to measure)."""
        return True

    def old_policy_in_training(self) -> bool:
        """Whether π_old is the training forward's own log-probs, detached, instead of a rollout forward.

        True only where that is the same policy and nothing at rollout time reads π_old (see
        ``ClippedPolicyGradient``): the rollout then scores only the reference, and the metrics of π_old
        (``entropy``, ``kl``, ``reward/with_kl``, ``tis/ratio|kl|truncated``) come from the training forward.
        """
        return False

    # -- layout of a rollout ---------------------------------------------------------------------
    def rows_per_prompt(self) -> int:
        return self.config.samples_per_prompt

    def minibatches(self) -> int:
        return 1

    def epochs(self) -> int:
        return 1

    def make_source(self, examples: list[dict], accelerator: Any):
        return RolloutSource(self, examples, accelerator, rows_per_prompt=self.rows_per_prompt(),
                             minibatches=self.minibatches(), epochs=self.epochs())

    def tokenize(self, records: list, source: str):
        examples, report = super().tokenize(records, source)
        for ex, rec in zip(examples, records):
            ex["prompt"] = rec.prompt  # reward sources score the original prompt (text or messages)
        return examples, report

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference_model is not None:
            self.reference_model.eval()
        return self

    # -- rollouts --------------------------------------------------------------------------------
    def make_rollout(self, prompts: list[dict], *, seed: int, accelerator, rollout: int) -> tuple[list[dict], dict]:
        c = self.config
        self._gen_seconds, self._gen_samples = 0.0, 0  # over every generate call of this rollout
        sync_s = self._sync_sampler(accelerator)
        repeated, samples, raw_scores, scores, sampling_metrics = self.sample_groups(prompts, seed=seed, accelerator=accelerator)
        finished = torch.tensor([s["finished"] for s in samples], dtype=torch.bool)
        rows = [{"prompt": p["prompt"], "prompt_ids": s["prompt_ids"], "completion_ids": s["completion_ids"] or [self.tokenizer.eos_token_id],
                 "completion": s["completion"], "reward_score": float(r)} for p, s, r in zip(repeated, samples, raw_scores.tolist())]
        warn_nonfinite_rewards(rows, c.reward)
        tis = self.tis_cap() is not None
        deferred = self.old_policy_in_training()
        forward = self._score_rows(rows, accelerator, sampled=samples if self._from_sampler() and not tis else None,
                                   old_policy=not deferred)
        mask = forward["mask"]
        # [N] Σ_t of the per-token KL estimate; deferred: never in the reward, measured by the training forward
        seq_kl = torch.zeros(len(rows)) if deferred else forward["kl"].sum(-1)
        beta = self.kl_ctl.value
        rewards = scores - beta * seq_kl if c.kl_in_reward else scores
        global_rewards = accelerator.gather(rewards.to(accelerator.device)).cpu()
        rows, extra = self.advantages(rows, scores=scores, rewards=rewards, forward=forward, global_rewards=global_rewards,
                                      accelerator=accelerator)
        if not deferred:  # deferred: no adaptive controller (kl_target needs the KL here, before the step)
            self.kl_ctl.update(float(accelerator.reduce(seq_kl.mean().to(accelerator.device), reduction="mean")), len(samples) * accelerator.num_processes)
        lengths = mask.sum(-1).float()
        metrics = {
            "reward/score": scores, "reward/raw_score": raw_scores, "response_length": lengths, "eos_fraction": finished.float(),
            **extra, **rollout_health(raw_scores, scores, rows, c.samples_per_prompt),
        }
        if deferred:  # the π_old metrics come from the training forward (old_policy_metrics), which reads the score
            for row, score in zip(rows, scores.tolist()):
                row["score"] = score
        else:
            metrics["entropy"] = (forward["entropy"] * mask).sum(-1) / lengths.clamp(min=1)
            if self.uses_reference():
                metrics.update({"kl": seq_kl, "reward/with_kl": scores - beta * seq_kl})
        per_row = row_metrics({k: v.detach().cpu() for k, v in metrics.items()}, accelerator.device)
        one = torch.tensor(1.0, device=accelerator.device)
        per_row["kl_coef"] = (torch.tensor(beta, device=accelerator.device), one)
        per_row["samples_per_s"] = (torch.tensor(self._gen_samples / max(self._gen_seconds, 1e-9), device=accelerator.device), one)
        per_row.update({k: (torch.tensor(float(v), device=accelerator.device), one) for k, v in sampling_metrics.items()})
        if c.sampler != "hf":
            per_row["sampler/sync_s"] = (torch.tensor(sync_s, device=accelerator.device), one)
        if tis:
            per_row.update(self._attach_sampler_logps(rows, samples, forward, accelerator.device))
        self._log_samples(rows[: min(4, len(rows))], scores, rollout, accelerator)
        return rows, per_row

    def _sync_sampler(self, accelerator) -> float:
        """Hand the rollout backend the current policy (the updates since the last rollout); seconds taken."""
        if self.config.sampler != "hf" and accelerator.device.type != "cpu":
            raise ConfigError(f"{self.name}.sampler={self.config.sampler} runs on CPU (x86 fbgemm kernels); this run "
                              f"trains on {accelerator.device}: use sampler=hf")
        start = time.perf_counter()
        self.sampler.sync(self.policy)
        return time.perf_counter() - start

    def _from_sampler(self) -> bool:
        """Whether the sampler keeps its per-token log-probs.

        Algorithms that reuse sampler log-probs (RLOO, the GRPO family: :meth:`reuse_sampler_logps`) may take the
        old-policy log-probs and entropies from the sampler's own logits (preftune/rollout/sampling.py): one forward
        fewer. Only from an exact backend (the policy's own fp32 decode): under bf16/fp16 autocast the incremental
        decode and a full forward round differently, which would bias the KL to the reference (computed by a full
        forward) by that rounding, and a quantized copy is another model; and not when the training forward gives
        π_old (:meth:`old_policy_in_training`). With TIS (``tis_cap``) the sampler's log-probs are always kept,
        and the old policy's computed by the policy.
        """
        reuse = self.reuse_sampler_logps() and self.sampler.exact and not self.old_policy_in_training()
        return reuse or self.tis_cap() is not None

    def reuse_sampler_logps(self) -> bool:
        """Whether the old policy's log-probs may be the sampler's own (RLOO's ``reuse_sampler_logps``)."""
        return False

    def tis_cap(self) -> Optional[float]:
        """The truncated-importance-sampling cap of the clipped family (``tis_cap``); None = no TIS."""
        return None

    def sample_groups(self, prompts: list[dict], *, seed: int, accelerator) -> tuple[list[dict], list[dict], torch.Tensor, torch.Tensor, dict]:
        """Sample ``samples_per_prompt`` completions per prompt and score them.

        Returns (prompt of each row, samples, raw scores [N], shaped scores [N], per-rollout scalar
        metrics). Local to this process (no collective), so an override may sample more than once."""
        repeated = [p for p in prompts for _ in range(self.config.samples_per_prompt)]
        samples = self._generate(repeated, seed=seed, accelerator=accelerator)
        raw, scores = self._scores(repeated, samples)
        return repeated, samples, raw, scores, {}

    def _generate(self, repeated: list[dict], *, seed: int, accelerator) -> list[dict]:
        c = self.config
        start = time.perf_counter()
        settings = SamplingSettings(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                    batch_size=c.generation_batch_size)
        samples = self.sampler.generate([p["prompt_ids"] for p in repeated], settings, seed=seed,
                                        return_logps=self._from_sampler(), autocast=accelerator.autocast)
        self._gen_seconds = getattr(self, "_gen_seconds", 0.0) + time.perf_counter() - start
        self._gen_samples = getattr(self, "_gen_samples", 0) + len(samples)
        return samples

    def _scores(self, repeated: list[dict], samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw reward [N], reward after the configured shaping [N])."""
        raw = torch.tensor(list(self.reward_fn([p["prompt"] for p in repeated], [s["completion"] for s in samples])), dtype=torch.float32)
        return raw, self.shape_scores(raw, samples)

    def shape_scores(self, scores: torch.Tensor, samples: list[dict]) -> torch.Tensor:
        """Reward shaping before advantages: the missing-EOS penalty (GRPO adds overlong shaping)."""
        penalty = self.config.missing_eos_penalty
        if penalty is None:
            return scores
        finished = torch.tensor([s["finished"] for s in samples], dtype=torch.bool)
        return torch.where(finished, scores, scores - penalty)

    def _attach_sampler_logps(self, rows: list[dict], samples: list[dict], forward: dict, device) -> dict:
        """TIS: keep the sampler's per-token log-probs in each row; return the mismatch metrics
        (π_old/π_sampler, its truncated fraction, KL(π_sampler‖π_old)) as token means -- or none, when
        π_old is the training forward's (:meth:`tis_weights` measures them there)."""
        mask = forward["mask"]
        for row, s, n in zip(rows, samples, mask.sum(-1).tolist()):
            if len(s["logps"]) == n:
                row["sampler_logps"] = list(s["logps"])
            else:  # a replaced empty completion has none: weight 1 (NaN = "π_sampler is π_old", see tis_weights)
                row["sampler_logps"] = list(row["old_logps"]) if "old_logps" in row else [float("nan")] * n
        if forward["logps"] is None:
            return {}
        sampler = scatter_tokens(mask, [r["sampler_logps"] for r in rows])
        _, m = truncated_importance_weights(forward["logps"], sampler, mask, cap=self.tis_cap())
        n = torch.tensor(float(mask.sum()), device=device)
        return {f"tis/{k}": (v.sum().to(device), n) for k, v in m.items()}

    def tis_weights(self, batch: dict, mask: torch.Tensor, *, mismatch: bool = False) -> tuple[Optional[torch.Tensor], dict]:
        """TIS: the per-token weights min(π_old/π_sampler, cap) [B, T] of a training batch and their mean
        as a metric; (None, {}) without ``tis_cap``. ``mismatch``: also the rollout's mismatch metrics
        (``tis/ratio``, ``tis/truncated``, ``tis/kl``), for a ``batch["old_logps"]`` the training forward gave."""
        cap = self.tis_cap()
        if cap is None:
            return None, {}
        old = batch["old_logps"]
        sampler = torch.where(torch.isnan(batch["sampler_logps"]), old.detach(), batch["sampler_logps"])
        weights, m = truncated_importance_weights(old, sampler, mask, cap=cap)
        n = mask.sum().float()
        metrics = {f"tis/{k}": (v.sum(), n) for k, v in m.items()} if mismatch else {}
        return weights, {**metrics, "tis/weight": (weights.sum(), n)}

    @torch.no_grad()
    def _score_rows(self, rows: list[dict], accelerator, sampled: Optional[list[dict]] = None, old_policy: bool = True) -> dict[str, torch.Tensor]:
        """Old-policy and reference log-probs, entropy and KL for every rollout row, [N, T] padded
        like a training batch of all rows (:func:`preftune.rollout.scoring.score_tokens`; ``old_policy=False``:
        the reference's alone); also writes the per-token lists ``old_logps`` / ``ref_logps`` into the rows."""
        batch = {k: v.to(accelerator.device) for k, v in self._collate_ids(rows).items()}
        reference = self.reference_model if self.reference_model is not None else REFERENCE_ADAPTER_OFF
        out = score_tokens(self.policy, reference if self.uses_reference() else None, batch, kl_estimator=self.config.kl_estimator,
                           sampled=sampled, autocast=accelerator.autocast, old_policy=old_policy)
        for key, field in (("logps", "old_logps"), ("ref_logps", "ref_logps")):
            if out[key] is not None:
                for row, values, m in zip(rows, out[key], out["mask"]):
                    row[field] = values[m].tolist()
        return out

    def _collate_ids(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return collate_completions([{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]} for r in rows], self.tokenizer.pad_token_id)

    def collate(self, rows: list[dict]) -> RolloutBatch:
        batch = self._collate_ids(rows)
        batch = pad_token_fields(rows, batch, self.token_fields)
        for key in ("advantage", "score"):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        return batch

    def advantages(self, rows: list[dict], *, scores, rewards, forward, global_rewards, accelerator) -> tuple[list[dict], dict]:
        """Attach what the loss needs to each row; return (rows, extra per-row metrics).

        scores: [N] rewards of this process's rows; rewards: [N] scores − β·KL when the KL is in the
        reward; forward: old/reference log-probs etc. ([N, T]); global_rewards: rewards of every process;
        accelerator: for statistics over every process's rows (e.g. PPO's advantage whitening)."""
        raise NotImplementedError

    # -- hooks of the source ---------------------------------------------------------------------
    def stop_replay(self, metrics: dict) -> bool:
        return False

    def online_state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_online_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def _log_samples(self, rows: list[dict], scores: torch.Tensor, rollout: int, accelerator) -> None:
        every = self.config.log_samples_steps
        if every and rollout % every == 0 and accelerator.is_main_process:
            log_samples(Path(self.run.output_dir) / "samples.jsonl", rows, scores, rollout)

    # -- loss helpers ----------------------------------------------------------------------------
    def kl_loss_term(self, logps: torch.Tensor, batch: dict) -> torch.Tensor:
        """β·KL per token as a loss term [B, T] (only when kl_in_reward is false and a reference is scored)."""
        if self.config.kl_in_reward or not self.uses_reference():
            return torch.zeros_like(logps)
        return self.kl_ctl.value * kl_estimate(logps, batch["ref_logps"], self.config.kl_estimator)


def masked_row_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum(-1)
