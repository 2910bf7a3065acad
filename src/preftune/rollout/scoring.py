"""Scoring a rollout: the sampled tokens' log-probs under the policy that sampled them and under the
reference, the entropy, and the per-token KL estimate between the two -- functions an online
algorithm composes (algorithms/online.py), [N, T] padded like a training batch of all rows."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch
from torch import nn

from preftune.models.logprobs import _scored, policy_forward
from preftune.models.lora import reference_context
from preftune.rollout.kl import kl_estimate

REFERENCE_ADAPTER_OFF = "adapter_off"
"""The reference of a LoRA policy: the policy itself with its adapter disabled."""


def scatter_tokens(mask: torch.Tensor, values: list[list[float]]) -> torch.Tensor:
    """Per-row lists of per-completion-token values -> [N, T] at the scored positions of ``mask``."""
    counts = mask.sum(-1).tolist()
    flat: list[float] = []
    for n, v in zip(counts, values):
        flat += (list(v) + [0.0] * n)[:n]  # a row whose completion was replaced by EOS keeps 0 there
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return out.masked_scatter(mask, torch.tensor(flat, dtype=torch.float32, device=mask.device))


@torch.no_grad()
def score_tokens(policy: nn.Module, reference: Union[nn.Module, str, None], batch: dict, *, kl_estimator: str,
                 sampled: Optional[list[dict]] = None, autocast: Callable = contextlib.nullcontext,
                 old_policy: bool = True) -> dict:
    """Old-policy and reference per-token log-probs, entropy and KL of a collated rollout ``batch``.

    reference: a frozen model, :data:`REFERENCE_ADAPTER_OFF`, or None (no reference: KL 0, nothing
    scored). sampled: the sampler's per-token ``logps`` / ``entropy`` of each row (``return_logps``),
    used as the old policy's instead of a policy forward (no ``hidden`` then: PPO's value head needs
    the forward). ``autocast``: the precision context of the forwards. ``old_policy=False``: the old
    policy is not scored at all (a single-pass update takes π_old from its training forward, see
    ``ClippedPolicyGradient.old_policy_in_training``): ``logps``, ``kl`` and ``entropy`` are None and
    ``ref_logps`` is None without a reference.

    Returns ``logps``, ``ref_logps``, ``mask``, ``kl``, ``entropy`` ([N, T], on CPU), ``hidden`` (the
    policy's last hidden states, or None) and the ``batch``.
    """
    mask = _scored(batch["completion_mask"])
    if not old_policy:
        ref = None if reference is None else _reference_logps(policy, reference, batch, autocast).cpu()
        return {"logps": None, "ref_logps": ref, "mask": mask.cpu(), "kl": None, "entropy": None, "hidden": None, "batch": batch}
    if sampled is not None and any(len(s["logps"]) != n for s, n in zip(sampled, mask.sum(-1).tolist())):
        sampled = None  # an empty completion replaced by EOS has no sampler log-prob: score the old policy instead
    with autocast():
        out = policy_forward(policy, batch, with_entropy=True) if sampled is None else None
    if sampled is None:
        logps, entropy, hidden = out["logps"], out["entropy"], out["hidden"]
    else:
        logps, entropy = (scatter_tokens(mask, [s[key] for s in sampled]) for key in ("logps", "entropy"))
        hidden = None
    ref = logps if reference is None else _reference_logps(policy, reference, batch, autocast)
    kl = kl_estimate(logps, ref, kl_estimator, mask)
    return {"logps": logps.cpu(), "ref_logps": ref.cpu(), "mask": mask.cpu(), "kl": kl.cpu(),
            "entropy": entropy.cpu(), "hidden": hidden, "batch": batch}


def _reference_logps(policy: nn.Module, reference: Union[nn.Module, str], batch: dict, autocast: Callable) -> torch.Tensor:
    """Per-token log-probs [N, T] of the reference: a frozen model, or the policy with its adapter off."""
    with autocast():
        if reference == REFERENCE_ADAPTER_OFF:
            with reference_context(policy):
                return policy_forward(policy, batch)["logps"]
        return policy_forward(reference, batch)["logps"]
