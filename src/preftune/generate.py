"""Batched sampling of completions from a causal LM (evaluation, online RL rollouts, the CLI).

Prompts are padded on the LEFT by hand (the tokenizer is never mutated), so every row's last prompt
token sits at the same column and the KV-cached decode appends to all rows in step. Prompts are sorted
by length first to cut padding; outputs come back in input order.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

__all__ = ["generate_completions", "write_jsonl"]

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

    Returns:
        One dict per prompt, in input order: ``prompt`` (as given), ``completion`` (decoded, special
        tokens and padding removed), ``completion_tokens`` (generated tokens, counting the final EOS),
        ``finished`` (the completion ended with EOS rather than at ``max_new_tokens``).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("top_k must be >= 0, max_new_tokens and batch_size >= 1")
    prompts = list(prompts)
    if not prompts:
        return []

    eos_ids = _eos_ids(model, tokenizer)
    if not eos_ids:
        raise ValueError("the tokenizer has no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = _generation_config(max_new_tokens, temperature, top_p, top_k, pad_id, eos_ids, stop_at_eos)
    encoded = [_encode(tokenizer, p, text_as_chat) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens")
    # Longest first: padding is cut, and an out-of-memory error shows on the first batch.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    results: list[dict[str, Any] | None] = [None] * len(prompts)

    was_training = model.training
    model.eval()
    try:
        with _rng_scope(device), torch.inference_mode():
            torch.manual_seed(seed)
            bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in index], pad_id, device)
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )
                for row, i in enumerate(index):
                    results[i] = _result(
                        prompts[i], encoded[i], output[row, input_ids.shape[1] :].tolist(),
                        tokenizer, eos_ids, stop_at_eos, return_token_ids,
                    )
                bar.update(len(index))
            bar.close()
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _result(prompt, prompt_ids, generated, tokenizer, eos_ids, stop_at_eos, return_token_ids):
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
    return result


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """Write one JSON object per line, atomically: a crash never leaves a half-written file at ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
