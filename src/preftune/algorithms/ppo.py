"""PPO for language models (Schulman et al. 2017; seed 000 "PPO additional details"; Ziegler et al.
2019; InstructGPT): token-level rewards with a per-token KL penalty and the score at the last token,
a value head, GAE(γ, λ), whitened advantages, the clipped policy ratio, the clipped value loss,
several minibatch epochs per rollout (the rollout source replays it), approximate-KL monitoring with
an optional early stop, and PPO-ptx: the SFT/pretraining loss mixed in with coefficient γ_ptx.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from preftune.algorithms.base import Needs
from preftune.algorithms.online import OnlineAlgorithm, RolloutConfig
from preftune.config import ConfigError, doc
from preftune.data.batches import PTX_PREFIX
from preftune.data.collate import collate_completions
from preftune.data.loaders import load_records
from preftune.data.tokenize import tokenize_sft
from preftune.losses.rl import explained_variance, ppo_policy_loss, ppo_value_loss
from preftune.losses.sft import sft_loss
from preftune.models.logprobs import _fast_parts, per_token_logps, policy_forward
from preftune.rollout.advantages import gae, masked_whiten, token_level_rewards

PTX = PTX_PREFIX


@dataclass
class PPOConfig(RolloutConfig):
    samples_per_prompt: int = doc(1, "Completions sampled per prompt in each rollout.")
    ppo_epochs: int = doc(2, "Passes over each rollout.")
    minibatches: int = doc(1, "Optimizer steps per pass over a rollout (a rollout holds minibatches global batches).")
    clip_range: float = doc(0.2, "ε of the clipped policy ratio.")
    clip_range_value: float = doc(0.2, "ε_v of the clipped value loss (in reward units).")
    vf_coef: float = doc(0.1, "Weight of the value loss.")
    gamma: float = doc(1.0, "Discount γ of GAE.")
    lam: float = doc(0.95, "λ of GAE.")
    whiten_advantages: bool = doc(True, "Normalise advantages to zero mean, unit variance over each rollout's tokens.")
    value_model: Literal["shared", "separate"] = doc(
        "shared", "'shared': a scalar value head on the policy's last hidden state; 'separate': a copy of the policy's "
        "transformer with its own scalar head (twice the memory, no interference with the policy)."
    )
    target_kl: Optional[float] = doc(
        None, "Stop replaying a rollout once the approximate KL(π_old‖π_θ) of a step exceeds this. null = never."
    )
    ptx_data: Optional[str] = doc(None, "PPO-ptx: SFT/pretraining data (any SFT format) whose NLL is mixed into the loss.")
    ptx_coef: float = doc(0.0, "γ_ptx: weight of the per-token NLL on ptx_data.")

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.ppo_epochs < 1 or self.minibatches < 1:
            raise ConfigError(f"{path}: ppo_epochs and minibatches must be >= 1")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError(f"{path}.ptx_data: required when ptx_coef > 0")


class PPO(OnlineAlgorithm):
    """PPO: value head, GAE, clipped ratio and value losses, minibatch epochs, adaptive KL, optional ptx."""

    name = "ppo"
    Config = PPOConfig
    needs = Needs(data_kind="prompts", loss_unit="token", reference_model=True)
    token_fields = ("old_logps", "ref_logps", "advantages", "returns", "old_values")

    def __init__(self, config, policy, tokenizer, run):
        super().__init__(config, policy, tokenizer, run)

        inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        hidden = inner.config.get_text_config().hidden_size if hasattr(inner.config, "get_text_config") else inner.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the returns
        nn.init.zeros_(self.value_head.bias)
        self.value_backbone = None
        if config.value_model == "separate":
            parts = _fast_parts(policy)
            if parts is None:
                raise ConfigError(f"ppo.value_model=separate: unsupported architecture {inner.config.model_type}")
            self.value_backbone = copy.deepcopy(inner.get_decoder()).requires_grad_(True)
        self._ptx_scale: torch.Tensor | None = None
        self._ptx_examples: list[dict] = []
        if config.ptx_data:
            d = run.data
            records = load_records(config.ptx_data, "sft")
            self._ptx_examples, _ = tokenize_sft(records, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                                                 truncation=d.truncation, text_as_chat=d.text_as_chat, source=config.ptx_data)

    def minibatches(self) -> int:
        return self.config.minibatches

    def epochs(self) -> int:
        return self.config.ppo_epochs

    def make_source(self, examples, accelerator):
        source = super().make_source(examples, accelerator)
        if self._ptx_examples:
            pad = self.tokenizer.pad_token_id
            source.companion = self.offline_source(self._ptx_examples, lambda rows: collate_completions(rows, pad), accelerator,
                                                   source=self.config.ptx_data, rows="ptx rows", seed=self.run.train.seed + 1)
        return source

    # -- values ----------------------------------------------------------------------------------
    def _values(self, out: dict, batch: dict) -> torch.Tensor:
        """V(s_t) for every scored position [B, T], from the policy's hidden states or a separate model."""
        mask = out["mask"]
        if self.value_backbone is None:
            hidden = out["hidden"]
        else:
            h = self.value_backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
            hidden = h[:, :-1][mask[:, 1:]]
        flat = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return torch.zeros(mask.shape, dtype=torch.float32, device=flat.device).masked_scatter(mask, flat)

    def advantages(self, rows, *, scores, rewards, forward, global_rewards, accelerator):
        c = self.config
        mask = forward["mask"]
        with torch.no_grad():
            values = self._values({"hidden": forward["hidden"], "mask": mask.to(forward["hidden"].device)}, forward["batch"]).cpu()
        kl = forward["kl"] if c.kl_in_reward else None
        token_rewards = token_level_rewards(scores, kl, mask, kl_coef=self.kl_ctl.value)
        adv, returns = gae(token_rewards, values, mask, gamma=c.gamma, lam=c.lam)
        if c.whiten_advantages:  # every process must take part: no local condition here
            # over every process's tokens: the update then does not depend on the number of processes
            dev = accelerator.device
            adv = masked_whiten(adv, mask, reduce_sum=lambda t: accelerator.reduce(t.to(dev), reduction="sum").cpu())
        for i, row in enumerate(rows):
            m = mask[i]
            row["advantages"], row["returns"], row["old_values"] = adv[i][m].tolist(), returns[i][m].tolist(), values[i][m].tolist()
        ev = explained_variance(values, returns, mask)
        n = mask.sum(-1).clamp(min=1)
        return rows, {"value/explained_variance": ev.expand(len(rows)), "value/mean": (values * mask).sum(-1) / n,
                      "advantage/mean": (adv * mask).sum(-1) / n, "returns/mean": (returns * mask).sum(-1) / n}

    # -- the step ---------------------------------------------------------------------------------
    def before_step(self, micro_batches, accelerator):
        """PPO-ptx normalisation: the ptx NLL is a mean over the ptx tokens of the global batch, while the
        loop divides the loss by the global number of response tokens; precompute the ratio."""
        if not self._ptx_examples:
            return
        dev = accelerator.device
        counts = torch.tensor([sum(float(b["completion_mask"][:, 1:].sum()) for b in micro_batches),
                               sum(float(b[PTX + "completion_mask"][:, 1:].sum()) for b in micro_batches)], device=dev)
        counts = accelerator.reduce(counts, reduction="sum").clamp(min=1)
        self._ptx_scale = counts[0] / counts[1]

    def forward(self, batch):
        c = self.config
        out = policy_forward(self.policy, batch)
        mask, logps = out["mask"], out["logps"]
        values = self._values(out, batch)
        pg, pm = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip_range=c.clip_range)
        vf, vm = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip_range_value=c.clip_range_value)
        per_token = pg + c.vf_coef * vf + self.kl_loss_term(logps, batch)
        loss = torch.where(mask, per_token, 0.0).sum()
        n = mask.sum().float()
        metrics = {
            "policy/loss": (torch.where(mask, pg, 0.0).sum().detach(), n), "value/loss": (torch.where(mask, vf, 0.0).sum().detach(), n),
            "policy/clipfrac": (pm["clipfrac"].sum(), n), "approx_kl": (pm["approx_kl"].sum(), n),
            "value/clipfrac": (vm["vf_clipfrac"].sum(), n),
        }
        if self._ptx_examples and PTX + "input_ids" in batch:
            ptx = {k[len(PTX):]: v for k, v in batch.items() if k.startswith(PTX)}
            nll_sum, _ = sft_loss(per_token_logps(self.policy, ptx), ptx["completion_mask"])
            scale = self._ptx_scale if self._ptx_scale is not None else n / ptx["completion_mask"][:, 1:].sum().clamp(min=1)
            loss = loss + c.ptx_coef * nll_sum * scale
            metrics["ptx/nll"] = (nll_sum.detach(), ptx["completion_mask"][:, 1:].sum().float())
        return loss, metrics

    def stop_replay(self, metrics: dict) -> bool:
        return self.config.target_kl is not None and metrics.get("approx_kl", 0.0) > self.config.target_kl
