"""Estimated seconds of each stage of the sentiment study, for the ETA of the progress line and for
sizing a study before running it (``preftune study CONFIG --plan``... see :func:`plan_seconds`).

The coefficients are wall seconds measured on the project's 2-core CPU machine (AMD EPYC, SmolLM2-135M
with LoRA r=16, batch 16 for sampling; see the README's timing table); they scale linearly with the
number of sampled tokens or trained rows. Only the ratios matter for the ETA, which rescales them by
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
PER_ROLLOUT_TOKEN = {"rloo": 0.0153, "ppo": 0.030, "best_of_n": 0.010, "reinforce": 0.0153}
"""Online training, per sampled token of a step's rollout (sampling, scoring, the update)."""
PAIRS_PER_PROMPT = 0.87
"""Pairs kept per training prompt (VADER ties dropped), as measured on the built-in prompts."""


def _rollout_tokens(cfg: Any, name: str) -> float:
    from preftune.algorithms import ALGORITHMS

    samples = getattr(ALGORITHMS[name].Config(), "samples_per_prompt", 1)
    accum = 1 if name == "ppo" else 2
    prompts = cfg.micro_batch_size * accum / (samples if name == "rloo" else 1)
    return prompts * samples * cfg.max_new_tokens


def estimate_seconds(cfg: Any, kind: str) -> float:
    """Estimated seconds of one stage: 'pairs', 'evaluate' (one model), 'best_of_n_curve', 'reward'
    (the proxy reward model) or a training job's algorithm name, for a ``StudyConfig``."""
    pairs = PAIRS_PER_PROMPT * cfg.train_prompts
    if kind == "pairs":
        return LOAD + SAMPLE * 2 * cfg.train_prompts * cfg.max_new_tokens
    if kind == "evaluate":
        return LOAD + EVAL * cfg.test_prompts * cfg.eval_samples * cfg.max_new_tokens
    if kind == "best_of_n_curve":
        return LOAD + SAMPLE * cfg.test_prompts * max(cfg.best_of_n) * cfg.max_new_tokens
    if kind in PER_ROLLOUT_TOKEN:
        return LOAD + PER_ROLLOUT_TOKEN[kind] * cfg.online_steps * _rollout_tokens(cfg, kind)
    rows = pairs * cfg.offline_epochs * cfg.max_length / 80
    return LOAD + PER_PAIR_EPOCH.get(kind, PER_PAIR_EPOCH["dpo"]) * rows
