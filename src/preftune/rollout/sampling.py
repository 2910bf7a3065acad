"""Rollout sampling that keeps what the sampler already computed: the log-probability (and entropy)
of every sampled token under the sampling policy.

A KV-cached decode computes the policy's logits at every completion position anyway; a separate
"old-policy" forward over prompt + completion recomputes the same numbers. ``sample_rollout`` asks
``generate`` for the raw logits (before temperature / top-p / top-k) and returns
``log softmax(logits)[token]`` per sampled token, i.e. log π(y_t | x, y_<t) of the untempered
policy, which is what the training forward computes. In fp32 the two agree to float rounding (the
decode attends over a left-padded KV cache, the training forward over a right-padded batch); under
bf16 autocast they differ by bf16 rounding, which is why PPO, whose clipped ratio compares them
token by token, keeps the separate forward.

Batching, padding, seeding and EOS handling are those of :func:`preftune.generate.generate_completions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from preftune.generate import _eos_ids, _generation_config, _left_pad, _result, _rng_scope

__all__ = ["sample_rollout"]


def sample_rollout(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Sample one completion per prompt (token ids in, EOS-stopped) and score it with the sampler's logits.

    Returns, per prompt in input order, what ``generate_completions(..., return_token_ids=True)``
    returns (``prompt``, ``completion``, ``completion_tokens``, ``finished``, ``prompt_ids``,
    ``completion_ids``) plus ``logps`` and ``entropy``: one fp32 value per completion token (EOS
    included when finished), log π and the entropy of π at that position, from the raw logits.
    """
    if temperature <= 0:
        raise ValueError(f"rollouts sample with temperature > 0, got {temperature}")
    prompt_ids = [list(p) for p in prompt_ids]
    if not prompt_ids:
        return []
    eos_ids = _eos_ids(model, tokenizer)
    if not eos_ids:
        raise ValueError("the tokenizer has no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = _generation_config(max_new_tokens, temperature, top_p, top_k, pad_id, eos_ids, True)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # as generate_completions
    device = next(model.parameters()).device
    results: list[dict[str, Any] | None] = [None] * len(prompt_ids)

    was_training = model.training
    model.eval()
    try:
        with _rng_scope(device), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                input_ids, attention_mask = _left_pad([prompt_ids[i] for i in index], pad_id, device)
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                    output_logits=True, return_dict_in_generate=True,
                )
                generated = out.sequences[:, input_ids.shape[1] :]
                logps, entropy = _token_stats(out.logits, generated)
                generated, logps, entropy = generated.tolist(), logps.tolist(), entropy.tolist()
                for row, i in enumerate(index):
                    r = _result(prompt_ids[i], prompt_ids[i], generated[row], tokenizer, eos_ids, True, True)
                    n = len(r["completion_ids"])
                    r["logps"], r["entropy"] = logps[row][:n], entropy[row][:n]
                    results[i] = r
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _token_stats(logits: Sequence[torch.Tensor], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step's raw logits [B, V] and the sampled tokens [B, S] -> (log π(token), entropy), each [B, S]."""
    logps, entropy = [], []
    for step, step_logits in enumerate(logits):
        logp = torch.log_softmax(step_logits.float(), dim=-1)
        logps.append(logp.gather(-1, tokens[:, step : step + 1]).squeeze(-1))
        entropy.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(logps, 1), torch.stack(entropy, 1)
