"""Batched sampling of completions from a causal LM: the one sampler of evaluation, online RL rollouts
and ``preftune generate``.

Prompts are padded on the LEFT by hand (the tokenizer is never mutated), so every row's last prompt
token sits at the same column and the KV-cached decode appends to all rows in step. Prompts are sorted
by length first to cut padding; outputs come back in input order.

``return_logps`` keeps what the sampler already computed: the log-probability (and entropy) of every
sampled token under the sampling policy. A KV-cached decode computes the policy's logits at every
completion position anyway; a separate "old-policy" forward over prompt + completion recomputes the
same numbers. With it, ``generate`` is asked for the raw logits (before temperature / top-p / top-k)
and every sampled token gets ``log softmax(logits)[token]``, i.e. log π(y_t | x, y_<t) of the
untempered policy, which is what the training forward computes. In fp32 the two agree to float
rounding (the decode attends over a left-padded KV cache, the training forward over a right-padded
batch); under bf16 autocast they differ by bf16 rounding, which is why PPO, whose clipped ratio
compares them token by token, keeps the separate forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

__all__ = ["generate_completions", "sample_rollout"]


Prompt = str | list[dict[str, str]] | list[int]


def _encode(tokenizer, prompt: Prompt, text_as_chat: bool) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # already tokenized (rollouts sample from the exact training prompt ids)
    if isinstance(prompt, str) and not text_as_chat:
        return tokenizer(prompt).input_ids  # raw text: the tokenizer adds BOS if its model wants one
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"a prompt is a string or a list of {{'role', 'content'}} dicts, got {type(prompt)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational prompts need a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the rendered template already holds any BOS; adding special tokens again would double it
    return tokenizer(text, add_special_tokens=False).input_ids


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models often list several)."""
    ids = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    out: list[int] = []
    for item in ids:
        for i in item if isinstance(item, (list, tuple)) else [item]:
            if i is not None and i not in out:
                out.append(int(i))
    return out


def _generation_config(max_new_tokens, temperature, top_p, top_k, pad_id, eos_ids, stop_at_eos):
    # Every field that changes the distribution is set explicitly: in transformers 5 unset (None) fields
    # are filled from the model's generation_config.json, which could add e.g. a repetition penalty.
    sampling = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=sampling,
        temperature=temperature if sampling else 1.0,
        top_p=top_p if sampling else 1.0,
        top_k=top_k if sampling else 50,  # greedy ignores it; 50 is the value transformers does not warn about
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad_id,
        # an empty list (not None, which would be filled from the model's config) disables EOS stopping
        eos_token_id=eos_ids if stop_at_eos else [],
        use_cache=True,
    )


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _rng_scope(device: torch.device):
    """Seeding inside this scope leaves the caller's global RNG state untouched."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    text_as_chat: bool = False,
    stop_at_eos: bool = True,
    progress: bool = False,
    return_token_ids: bool = False,
    return_logps: bool = False,
) -> list[dict[str, Any]]:
    """Sample one completion per prompt.

    Args:
        prompts: strings (used raw unless ``text_as_chat``, which wraps each as one user message),
            conversations (lists of ``{"role", "content"}``), rendered with the chat template and
            ``add_generation_prompt=True``, or lists of token ids used as they are.
        temperature: 0 means greedy decoding; otherwise sampling with ``top_p`` / ``top_k`` (0 = off).
        seed: the same seed and settings give the same outputs on repeated calls (the caller's global
            RNG state is left as it was). Samples may change with ``batch_size`` or the prompt set.
        stop_at_eos: stop each row at its first EOS. False: always produce ``max_new_tokens`` tokens.
        return_token_ids: also return ``prompt_ids`` and ``completion_ids`` (exactly the sampled ids,
            EOS included when finished), for rollouts that must not re-tokenise text.
        return_logps: also return ``logps`` and ``entropy``: one fp32 value per completion token (EOS
            included when finished), log π and the entropy of π at that position, from the raw logits
            (see the module docstring). Implies ``return_token_ids``.

    Returns:
        One dict per prompt, in input order: ``prompt`` (as given), ``completion`` (decoded, special
        tokens and padding removed), ``completion_tokens`` (generated tokens, counting the final EOS),
        ``finished`` (the completion ended with EOS rather than at ``max_new_tokens``).
    """
    _check_settings(temperature, top_p, top_k, max_new_tokens, batch_size)
    prompts = list(prompts)
    if not prompts:
        return []

    eos_ids, pad_id = _eos_and_pad(model, tokenizer)
    config = _generation_config(max_new_tokens, temperature, top_p, top_k, pad_id, eos_ids, stop_at_eos)
    encoded = _encode_all(tokenizer, prompts, text_as_chat)
    decode = dict(tokenizer=tokenizer, eos_ids=eos_ids, stop_at_eos=stop_at_eos,
                  return_token_ids=return_token_ids or return_logps, return_logps=return_logps)
    was_training = model.training
    model.eval()
    try:
        with _rng_scope(next(model.parameters()).device), torch.inference_mode():
            torch.manual_seed(seed)
            return _sample_all(model, prompts, encoded, batch_size, pad_id, config, progress, decode)
    finally:
        model.train(was_training)


def _sample_all(model, prompts: list, encoded: list[list[int]], batch_size: int, pad_id: int, config, progress: bool,
                decode: dict) -> list[dict[str, Any]]:
    """Every prompt's sample, batched longest first (padding is cut, and an out-of-memory error shows
    on the first batch); in input order."""
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        input_ids, attention_mask = _left_pad([encoded[i] for i in index], pad_id, device)
        rows = _sample_batch(model, input_ids, attention_mask, config, decode["return_logps"])
        for row, i in zip(rows, index):
            results[i] = _result(prompts[i], encoded[i], *row, **decode)
        bar.update(len(index))
    bar.close()
    return results  # type: ignore[return-value]


def _eos_and_pad(model, tokenizer) -> tuple[list[int], int]:
    eos_ids = _eos_ids(model, tokenizer)
    if not eos_ids:
        raise ValueError("the tokenizer has no EOS token")
    return eos_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _encode_all(tokenizer, prompts: list, text_as_chat: bool) -> list[list[int]]:
    encoded = [_encode(tokenizer, p, text_as_chat) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens")
    return encoded


def _check_settings(temperature: float, top_p: float, top_k: int, max_new_tokens: int, batch_size: int) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("top_k must be >= 0, max_new_tokens and batch_size >= 1")


def _sample_batch(model, input_ids, attention_mask, config, return_logps: bool) -> list[tuple]:
    """One ``generate`` call -> per row (generated ids, per-token log-probs or None, entropies or None)."""
    if not return_logps:
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        return [(output[row, input_ids.shape[1] :].tolist(), None, None) for row in range(len(input_ids))]
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
        output_logits=True, return_dict_in_generate=True,
    )
    generated = out.sequences[:, input_ids.shape[1] :]
    logps, entropy = _token_stats(out.logits, generated)
    return list(zip(generated.tolist(), logps.tolist(), entropy.tolist()))


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
    """Sample one completion per prompt (token ids in, EOS-stopped) and keep the sampler's log-probs:
    :func:`generate_completions` with ``return_logps=True``, for rollouts (temperature > 0)."""
    if temperature <= 0:
        raise ValueError(f"rollouts sample with temperature > 0, got {temperature}")
    return generate_completions(model, tokenizer, [list(p) for p in prompt_ids], max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed,
                                return_logps=True)


def _result(prompt, prompt_ids, generated, logps, entropy, *, tokenizer, eos_ids, stop_at_eos, return_token_ids, return_logps):
    if stop_at_eos:
        # Rows that stop early are filled with pad (== EOS for SmolLM2), so cut at the FIRST EOS.
        first = next((k for k, t in enumerate(generated) if t in eos_ids), None)
        if first is not None:
            generated = generated[: first + 1]
    result = {
        "prompt": prompt,
        "completion": tokenizer.decode(generated, skip_special_tokens=True),
        "completion_tokens": len(generated),
        "finished": bool(generated) and generated[-1] in eos_ids,
    }
    if return_token_ids:
        result["prompt_ids"] = list(prompt_ids)
        result["completion_ids"] = generated
    if return_logps:
        result["logps"], result["entropy"] = logps[: len(generated)], entropy[: len(generated)]
    return result


def _token_stats(logits: Sequence[torch.Tensor], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step's raw logits [B, V] and the sampled tokens [B, S] -> (log π(token), entropy), each [B, S]."""
    logps, entropy = [], []
    for step, step_logits in enumerate(logits):
        logp = torch.log_softmax(step_logits.float(), dim=-1)
        logps.append(logp.gather(-1, tokens[:, step : step + 1]).squeeze(-1))
        entropy.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(logps, 1), torch.stack(entropy, 1)
