"""Tokenized examples -> batch dicts (see docs/contracts.md): padding, packing, pair layouts.

All masks are built from lengths, never by comparing token ids with the pad id: SmolLM2's pad token
IS its EOS, and the EOS that ends a completion must be scored (the model has to learn to stop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_SEQUENCE_KEYS = ("prompt_ids", "completion_ids", "chosen_ids", "rejected_ids")
# Per-example "label" (contracts.md: tokenized examples) becomes the batch's "labels" BoolTensor[B].
_RENAMED = {"label": "labels"}


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _pad(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_token_id: int,
         pad_to_multiple_of: int | None) -> dict[str, torch.Tensor]:
    """Right-pad prompt+completion rows to one length.

    Returns input_ids LongTensor[N, T], attention_mask LongTensor[N, T], completion_mask
    BoolTensor[N, T] (True on the completion's positions).
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    n, t = len(lengths), _round_up(max(lengths, default=0), pad_to_multiple_of)
    input_ids = torch.full((n, t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    completion_mask = torch.zeros((n, t), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : lengths[i]] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, : lengths[i]] = 1
        # The first token of a row has no prefix to predict it from (an empty prompt with no BOS):
        # it is never scored, so it must not count in the loss normaliser either.
        completion_mask[i, max(len(p), 1): lengths[i]] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask}


def _extras(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack per-example scalars (bool -> BoolTensor, int -> LongTensor, float -> FloatTensor)."""
    out = {}
    for key in examples[0]:
        if key in _SEQUENCE_KEYS:
            continue
        values = [ex[key] for ex in examples]
        if not all(isinstance(v, (bool, int, float)) for v in values):
            raise TypeError(f"cannot collate key {key!r}: only scalar extras (bool/int/float) ride "
                            f"along with a batch")
        dtype = (torch.bool if all(isinstance(v, bool) for v in values)
                 else torch.long if all(isinstance(v, int) for v in values) else torch.float32)
        out[_RENAMED.get(key, key)] = torch.tensor(values, dtype=dtype)
    return out


def collate_completions(examples: Sequence[dict], pad_token_id: int, *,
                        pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """``[{"prompt_ids", "completion_ids"(, scalars)}]`` -> a right-padded batch of B rows.

    Keys: input_ids LongTensor[B, T], attention_mask LongTensor[B, T], completion_mask
    BoolTensor[B, T], plus each scalar extra as a [B] tensor ("label" -> "labels").
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    batch = _pad([ex["prompt_ids"] for ex in examples], [ex["completion_ids"] for ex in examples],
                 pad_token_id, pad_to_multiple_of)
    batch.update(_extras(examples))
    return batch


def pack_completions(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Concatenate all examples into ONE row (no padding): B = 1.

    Keys: input_ids LongTensor[1, L], position_ids LongTensor[1, L] (restarting at 0 at each
    sequence, which is how transformers finds the boundaries when attention_mask is None and
    use_cache=False), completion_mask BoolTensor[1, L], seq_lengths LongTensor[n], and scalar extras
    as [n] tensors. No attention_mask key: its absence marks the batch as packed.
    """
    if not examples:
        raise ValueError("cannot pack an empty list of examples")
    ids, positions, mask, lengths = [], [], [], []
    for ex in examples:
        p, c = ex["prompt_ids"], ex["completion_ids"]
        ids += p + c
        positions += range(len(p) + len(c))
        row_mask = [False] * len(p) + [True] * len(c)
        row_mask[:1] = [False]  # a sequence's first token is never scored (nothing precedes it)
        mask += row_mask
        lengths.append(len(p) + len(c))
    batch = {"input_ids": torch.tensor([ids], dtype=torch.long),
             "position_ids": torch.tensor([positions], dtype=torch.long),
             "completion_mask": torch.tensor([mask], dtype=torch.bool),
             "seq_lengths": torch.tensor(lengths, dtype=torch.long)}
    batch.update(_extras(examples))
    return batch


def collate_pairs(examples: Sequence[dict], pad_token_id: int, *,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """``[{"prompt_ids", "chosen_ids", "rejected_ids"}]`` -> 2B rows padded to one length.

    Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected (same order), so one forward pass
    scores both (the DPO reference code's ``concatenated_forward``). Scalar extras are [B] tensors.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    prompts = [ex["prompt_ids"] for ex in examples]
    completions = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
    batch = _pad(prompts + prompts, completions, pad_token_id, pad_to_multiple_of)
    batch.update(_extras(examples))
    return batch


def collate_shared_pairs(examples: Sequence[dict], pad_token_id: int, *,
                         pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """``[{"prompt_ids", "chosen_ids", "rejected_ids"}]`` -> B rows, one per pair: prompt + chosen + rejected.

    The shared-prompt pair layout: the prompt is in each row once, so one forward over B rows scores
    both completions of B pairs (:func:`collate_pairs` runs every prompt twice and pads every row to
    the longest prompt + completion). Within a row of prompt length P, chosen length C and rejected
    length R:

    * position ids run 0..P+C-1 over prompt + chosen and restart at P for the rejected tokens, which
      continue the prompt;
    * the attention mask is causal over prompt + chosen; a rejected token sees the prompt and the
      rejected tokens before it, never a chosen token; a padding position sees only itself (an empty
      softmax row would give NaN);
    * the first rejected token is predicted from the last prompt position, not from the chosen
      token before it: :func:`preftune.models.logprobs.per_token_logps` reads that from
      ``pair_lengths``.

    A model then computes exactly the log-probs it computes on :func:`collate_pairs` rows, if its
    attention honours a custom 4-D mask and its positions come from ``position_ids``
    (:func:`preftune.models.logprobs.shared_prompt_unsupported` says which models do).

    Keys: input_ids LongTensor[B, T], position_ids LongTensor[B, T] (0 on padding), attention_mask
    BoolTensor[B, 1, T, T] (``[b, 0, q, k]``: position q may attend to k), completion_mask
    BoolTensor[B, T] (the scored tokens of both completions), pair_lengths LongTensor[B, 3] (P, C, R;
    its presence marks the layout), plus each scalar extra as a [B] tensor.
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    lengths = [(len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])) for ex in examples]
    b, t = len(examples), _round_up(max(sum(n) for n in lengths), pad_to_multiple_of)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    completion_mask = torch.zeros((b, t), dtype=torch.bool)
    attention_mask = torch.eye(t, dtype=torch.bool).repeat(b, 1, 1, 1)  # padding: itself only
    causal = torch.ones((t, t), dtype=torch.bool).tril()
    for i, (ex, (p, c, r)) in enumerate(zip(examples, lengths)):
        n = p + c + r
        input_ids[i, :n] = torch.tensor(ex["prompt_ids"] + ex["chosen_ids"] + ex["rejected_ids"], dtype=torch.long)
        position_ids[i, : p + c] = torch.arange(p + c)
        position_ids[i, p + c : n] = torch.arange(p, p + r)
        allowed = attention_mask[i, 0]
        allowed[:n, :n] = causal[:n, :n]
        allowed[p + c : n, p : p + c] = False  # rejected never sees chosen
        # As in collate_pairs, a completion token with nothing before it (empty prompt) is not scored.
        completion_mask[i, max(p, 1) : p + c] = True
        completion_mask[i, p + c + (p == 0) : n] = True
    batch = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
             "completion_mask": completion_mask, "pair_lengths": torch.tensor(lengths, dtype=torch.long)}
    batch.update(_extras(examples))
    return batch


def count_completion_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of scored (completion) tokens in a batch, padded or packed."""
    return int(batch["completion_mask"].sum())


_COLLATE_KINDS = {"completions": collate_completions, "pairs": collate_pairs, "shared_pairs": collate_shared_pairs}


@dataclass
class Collator:
    """A DataLoader ``collate_fn``: ``kind`` "completions" (SFT/unpaired), "pairs" (:func:`collate_pairs`)
    or "shared_pairs" (:func:`collate_shared_pairs`).

    ``packing=True`` (completions only) packs the micro-batch into one row, dropping all padding.
    """

    pad_token_id: int | None = None
    packing: bool = False
    kind: str = "completions"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.kind not in _COLLATE_KINDS:
            raise ValueError(f"unknown collator kind {self.kind!r}; expected one of {', '.join(map(repr, _COLLATE_KINDS))}")
        if self.packing and self.kind != "completions":
            raise ValueError("packing is only supported for kind='completions'")
        if not self.packing and self.pad_token_id is None:
            raise ValueError("pad_token_id is required unless packing=True")

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if self.packing:
            return pack_completions(examples)
        return _COLLATE_KINDS[self.kind](examples, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
