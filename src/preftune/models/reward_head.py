"""Scalar rewards from a sequence classifier (``AutoModelForSequenceClassification``, one label).

Two kinds of head, chosen by the model's structure (:func:`pooling_kind`):

- ``"last_token"`` -- decoder models (Llama, Qwen2, Mistral, GPT-2, ...): a linear ``score`` layer
  on the hidden state of the last real token. transformers' own forward finds that token as "the
  rightmost token that is not ``pad_token_id``"; with pad == eos (SmolLM2, the tiny presets) that
  skips a final EOS, and it ignores ``attention_mask``. Here the token comes from the attention mask
  alone, and position ids are rebuilt from it, so left and right padding give the same rewards.
- ``"model"`` -- encoders (BERT, MiniLM): the model's own head, which pools the first ([CLS]) token
  through ``attention_mask``; batches are right-padded, so that token is always real.

What the reward is read at: :func:`finish_reward_ids` drops trailing pad-id tokens from a completion
(with pad == eos, the EOS a chat template ends the turn with), so the last real token is never the
pad token. transformers' pad-id search then lands on the same token as the mask, and a model saved
by preftune scores identically in plain transformers, with or without that EOS (causal attention:
the hidden state of a token does not depend on what follows).

A reward mixture (``reward.groups=mixture``) is one backbone with K heads, a K-label classifier:
:func:`sequence_scores` reads all K (and, for the EM's start, the features the heads read), and
:func:`component_classifier` cuts one head out as a plain one-label reward model.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from preftune.models.logprobs import _is_fsdp_sharded
from preftune.models.lora import unwrap

PoolingKind = Literal["last_token", "model"]


def base_classifier(model):
    """The transformers classifier inside DDP / peft wrappers (peft's LoRA layers stay injected)."""
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def pooling_kind(model) -> PoolingKind:
    inner = base_classifier(model)
    prefix = getattr(inner, "base_model_prefix", None)
    if hasattr(inner, "score") and prefix and hasattr(inner, prefix):
        return "last_token"
    return "model"


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the rightmost attended token of each row, LongTensor[B]; any padding side."""
    t = attention_mask.shape[-1]
    return (t - 1 - attention_mask.long().flip(-1).argmax(-1)).long()


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over the real tokens of each row (left padding shifts nothing), LongTensor[B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_rewards(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """One scalar reward per row, Tensor[B] (fp32 master weights; autocast dtype if active).

    Args:
        model: a one-label sequence classifier, possibly peft/DDP wrapped.
        input_ids: LongTensor[B, T]; attention_mask: LongTensor[B, T], 1 on real tokens. Every row
            must have at least one real token.
    """
    scores = sequence_scores(model, input_ids, attention_mask)
    if scores.shape[-1] != 1:
        raise ValueError(f"this reward model has {scores.shape[-1]} score heads (a mixture's shared model); score "
                         "one component's folder (OUTPUT_DIR/component-k) or the run's OUTPUT_DIR")
    return scores[:, 0]


def sequence_scores(model, input_ids: Tensor, attention_mask: Tensor, *, with_features: bool = False):
    """Every label's score per row, Tensor[B, L] (L = 1 for a reward model, K for a mixture's K heads);
    with ``with_features`` also the representation the head reads, Tensor[B, H] (decoders: the last
    real token's final hidden state; encoders: the final hidden state of the first, [CLS], token)."""
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("a row has no tokens (empty prompt and completion)")
    inner = base_classifier(model)
    if pooling_kind(model) == "model":
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_features)
        return (out.logits, out.hidden_states[-1][:, 0]) if with_features else out.logits
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask), use_cache=False)

    if _is_fsdp_sharded(inner):
        # FSDP2 gathers the classifier's root unit (backbone embeddings, norm, score) only in its own
        # forward (preftune/train/sharding.py); the last hidden state is the backbone's output.
        hidden = inner(**inputs, output_hidden_states=True).hidden_states[-1]
    else:
        hidden = getattr(inner, inner.base_model_prefix)(**inputs).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask).to(hidden.device)]  # [B, H]
    scores = inner.score(last)
    return (scores, last) if with_features else scores


def component_classifier(model, component: int):
    """A plain one-label classifier scoring with head ``component`` of a K-label one (a mixture's shared
    backbone): a copy, LoRA merged in, whose output layer keeps that row only. ``model`` is unchanged."""
    single = copy.deepcopy(unwrap(model))  # merge_and_unload folds an adapter in place
    if hasattr(single, "merge_and_unload"):
        single = single.merge_and_unload()
    k = single.config.num_labels
    name, head = [(n, m) for n, m in single.named_modules() if isinstance(m, nn.Linear) and m.out_features == k][-1]
    one = nn.Linear(head.in_features, 1, bias=head.bias is not None).to(head.weight.device, head.weight.dtype)
    with torch.no_grad():
        one.weight.copy_(head.weight[component : component + 1])
        if head.bias is not None:
            one.bias.copy_(head.bias[component : component + 1])
    parent, _, attr = name.rpartition(".")
    setattr(single.get_submodule(parent) if parent else single, attr, one)
    single.config.num_labels = 1
    return single


def finish_reward_ids(prompt_ids: list[int], completion_ids: list[int], tokenizer, kind: PoolingKind) -> tuple[list[int], list[int]]:
    """Token ids of one (prompt, completion) as the reward model reads them.

    Decoders: trailing pad-id tokens of the completion are dropped (see the module docstring).
    Encoders with [CLS]/[SEP] tokens: ``[CLS] prompt completion [SEP]`` (their head pools [CLS]).
    """
    completion_ids = list(completion_ids)
    if kind == "model" and tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
        prompt_ids = list(prompt_ids)
        if not prompt_ids or prompt_ids[0] != tokenizer.cls_token_id:
            prompt_ids = [tokenizer.cls_token_id] + prompt_ids
        if not completion_ids or completion_ids[-1] != tokenizer.sep_token_id:
            completion_ids = completion_ids + [tokenizer.sep_token_id]
        return prompt_ids, completion_ids
    pad = tokenizer.pad_token_id
    while completion_ids and completion_ids[-1] == pad:
        completion_ids.pop()
    return list(prompt_ids), completion_ids


def extra_special_tokens(kind: PoolingKind, tokenizer) -> int:
    """Tokens :func:`finish_reward_ids` may add (so truncation can leave room for them)."""
    if kind == "model" and tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
        return 2
    return 0
