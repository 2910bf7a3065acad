"""Rollout backends: what draws an online algorithm's samples.

An online algorithm asks its backend for completions of token-id prompts and, after its optimizer
updates, hands it the policy again; nothing else of the algorithm knows which engine sampled:

    backend = make_backend("hf", tokenizer)
    backend.sync(policy)                       # before every rollout: the backend holds the latest weights
    rows = backend.generate(prompt_ids, SamplingSettings(max_new_tokens=32, temperature=1.0), seed=0)
    rows[i]["completion_ids"], rows[i]["logps"]   # sampled ids; log π_sampler per token (return_logps)

A backend returns, per prompt and in input order, the dicts of
:func:`preftune.rollout.sampling.generate_completions` with ``return_token_ids`` (``prompt_ids``,
``completion_ids``, ``completion``, ``completion_tokens``, ``finished``) and, when asked, ``logps`` /
``entropy``: the sampler's own per-token log-probs of the untempered distribution. ``exact`` says whether
those log-probs are the training forward's (to float rounding): only then may an algorithm reuse them
as the old policy's (``reuse_sampler_logps``); otherwise the old policy is recomputed by the training
forward and the sampler's log-probs feed truncated importance sampling (``tis_cap``).

Backends: ``hf`` (the policy's own ``generate``, the default), ``int8`` and ``fp16`` (``quantized.py``:
a dynamically quantized copy of the policy on CPU). A vLLM-style engine would be a third class with the same three members:
``generate`` sampling from its own copy of the weights, ``sync`` pushing the policy's (LoRA merged)
weights into it after each update, ``exact = False``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol

from preftune.models.fsdp import full_weights
from preftune.rollout.sampling import generate_completions

__all__ = ["SAMPLERS", "HFBackend", "RolloutBackend", "SamplingSettings", "make_backend"]

SAMPLERS = ("hf", "int8", "fp16")
"""The backends ``<algorithm>.sampler`` chooses from."""


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16


class RolloutBackend(Protocol):
    name: str
    exact: bool
    """Whether the sampler's log-probs equal the training forward's (fp32, the policy's own weights)."""

    def sync(self, policy) -> None:
        """Take the policy's current weights (called before every rollout, i.e. after the updates since the last)."""

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, *, seed: int, return_logps: bool = False,
                 autocast: Callable[[], ContextManager] = nullcontext) -> list[dict[str, Any]]:
        """One completion per prompt (seeded: the same seed, weights and settings give the same samples)."""


def sample(model, tokenizer, prompt_ids: list[list[int]], settings: SamplingSettings, *, seed: int, return_logps: bool) -> list[dict]:
    """:func:`generate_completions` on token-id prompts with the rollout's settings (EOS-stopped)."""
    return generate_completions(
        model, tokenizer, [list(p) for p in prompt_ids], max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, batch_size=settings.batch_size,
        seed=seed, return_token_ids=True, return_logps=return_logps,
    )


class HFBackend:
    """The policy's own ``generate`` (KV cache, left padding; see ``sampling.py``), under the training
    precision's autocast and, when sharded, on gathered weights. ``sync`` only keeps a reference: the
    backend samples from the training weights themselves."""

    name = "hf"

    def __init__(self, tokenizer, *, exact: bool = True):
        self.tokenizer, self.exact, self.policy = tokenizer, exact, None

    def sync(self, policy) -> None:
        self.policy = policy

    def generate(self, prompt_ids, settings, *, seed, return_logps=False, autocast=nullcontext):
        if self.policy is None:
            raise RuntimeError("sync(policy) before generate")
        with autocast(), full_weights(self.policy):  # sharded: decode on gathered weights
            return sample(self.policy, self.tokenizer, prompt_ids, settings, seed=seed, return_logps=return_logps)


def make_backend(name: str, tokenizer, *, exact: bool = True) -> RolloutBackend:
    """The backend called ``name`` (one of :data:`SAMPLERS`). ``exact``: for ``hf``, whether the training
    precision is fp32 (under bf16/fp16 autocast the decode rounds differently from a full forward)."""
    if name == "hf":
        return HFBackend(tokenizer, exact=exact)
    if name in ("int8", "fp16"):
        # here, not at the top: quantized.py builds on this module's SamplingSettings and sample
        from preftune.rollout.quantized import QuantizedBackend

        return QuantizedBackend(tokenizer, name)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
