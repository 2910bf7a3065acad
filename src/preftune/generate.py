"""Batched sampling of completions and the JSONL writer of ``preftune generate``, where callers find them:
the sampler lives in preftune/rollout/sampling.py, atomic writes in preftune/models/cache.py."""

from __future__ import annotations

from preftune.models.cache import write_jsonl
from preftune.rollout.sampling import generate_completions

__all__ = ["generate_completions", "write_jsonl"]
