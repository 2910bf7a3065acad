"""Estimated seconds of each stage of the sentiment study, for the ETA of the progress line and for
sizing a study before running it (``preftune study CONFIG --plan``... see :func:`plan_seconds`).

The coefficients are wall seconds of `preftune demo` measured on a quiet 2-core AMD EPYC (SmolLM2-135M,
LoRA r=16, sampling in batches of 16; the README's timing table), PPO and best-of-n relative to RLOO
as measured by the quick study; they scale linearly with the sampled tokens or the trained rows. Only the ratios matter for the ETA, which rescales them by
how fast the finished stages ran.
"""

from __future__ import annotations

from typing import Any

__all__ = ["estimate_seconds"]

LOAD = 4.0
"""Loading the model once (a stage's fixed cost)."""
SAMPLE = 0.012
"""Sampling, per completion token (batched 16 at a time, the reward scored too)."""
EVAL = 0.022
"""Evaluation, per completion token: sampling plus the model's and the reference's log-probs."""
PER_PAIR_EPOCH = {"dpo": 0.46, "sft": 0.22, "kto": 0.50, "unlikelihood": 0.30, "reward": 0.30}
"""Offline training, per preference pair per epoch at max_length 80 (other DPO-family losses: as DPO)."""
PER_STEP = {"rloo": 11.75, "reinforce": 11.75, "ppo": 5.4, "best_of_n": 82.0}
"""Online training, per step at micro_batch_size 8 and 24 new tokens (the rollout and the update)."""
PAIRS_PER_PROMPT = 0.87
"""Pairs kept per training prompt (VADER ties dropped), as measured on the built-in prompts."""


def estimate_seconds(cfg: Any, kind: str) -> float:
    """Estimated seconds of one stage: 'pairs', 'evaluate' (one model), 'best_of_n_curve', 'reward'
    (the proxy reward model) or a training job's algorithm name, for a ``StudyConfig``."""
    per_prompt = getattr(cfg, "pairs_per_prompt", 1)  # the diverse study's; the sentiment study draws one pair
    pairs = PAIRS_PER_PROMPT * cfg.train_prompts * per_prompt
    if kind == "pairs":
        return LOAD + SAMPLE * 2 * per_prompt * cfg.train_prompts * cfg.max_new_tokens
    if kind == "evaluate":
        return LOAD + EVAL * cfg.test_prompts * cfg.eval_samples * cfg.max_new_tokens
    if kind == "best_of_n_curve":
        return LOAD + SAMPLE * cfg.test_prompts * max(cfg.best_of_n) * cfg.max_new_tokens
    if kind in PER_STEP:
        return LOAD + PER_STEP[kind] * cfg.online_steps * (cfg.max_new_tokens / 24) * (cfg.micro_batch_size / 8)
    rows = pairs * cfg.offline_epochs * cfg.max_length / 80
    return LOAD + PER_PAIR_EPOCH.get(kind, PER_PAIR_EPOCH["dpo"]) * rows
