"""The batches that travel from collation to an algorithm's forward, as typed dictionaries: every key
a batch may carry, its shape and what it means. They are plain ``dict[str, Tensor]`` at run time (the
loop moves them to the device key by key), so these classes cost nothing; they are the contract.

Names follow the DPO reference code: ``*_logps`` per sequence or per completion token as documented,
``per_token_*`` per token. ``B`` rows, ``T`` padded length.
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor


class TokenBatch(TypedDict, total=False):
    """What every collated batch has (``data/collate.collate_completions``)."""

    input_ids: Tensor
    """LongTensor[B, T], right-padded."""
    attention_mask: Tensor
    """LongTensor[B, T], 1 = real token. Absent in packed batches."""
    position_ids: Tensor
    """LongTensor[B, T]; packed batches only (restarts at 0 at every sequence start)."""
    seq_lengths: Tensor
    """LongTensor[n]: the lengths of the n sequences packed into one row (packed batches only)."""
    completion_mask: Tensor
    """BoolTensor[B, T]: True where the token AT that position is a completion token (scored). Built
    from lengths, never from token ids (pad == EOS for SmolLM2; the final EOS is scored)."""
    labels: Tensor
    """BoolTensor[B]: desirable (True) or not, of unpaired rows (KTO)."""


class PairBatch(TokenBatch, total=False):
    """Preference pairs (``collate_pairs``): rows 0..B-1 are the chosen completions, rows B..2B-1 the
    rejected ones of the same prompts, padded to one length so both go through one forward."""

    margin: Tensor
    """FloatTensor[B]: a pair's preference strength, when the data has one (reward models)."""
    group: Tensor
    """LongTensor[B]: the pair's annotator group index (group-robust DPO)."""
    reference_chosen_logps: Tensor
    """FloatTensor[B]: log π_ref(chosen | prompt), summed, when precomputed into the examples."""
    reference_rejected_logps: Tensor
    """FloatTensor[B]: log π_ref(rejected | prompt), summed, when precomputed."""


class SharedPairBatch(PairBatch, total=False):
    """Shared-prompt pairs (``collate_shared_pairs``): one row per pair, prompt + chosen + rejected.
    ``position_ids`` restart at the prompt length for the rejected tokens, ``attention_mask`` is a
    BoolTensor[B, 1, T, T] (rejected tokens never see chosen ones), ``completion_mask`` covers both."""

    pair_lengths: Tensor
    """LongTensor[B, 3]: (prompt, chosen, rejected) lengths; its presence marks the layout."""


class RolloutBatch(TokenBatch, total=False):
    """A minibatch of rollout rows of an online algorithm (``OnlineAlgorithm.collate``). Per-token
    fields are FloatTensor[B, T] aligned with ``completion_mask`` (0 elsewhere)."""

    old_logps: Tensor
    """Per token: log π_old of the sampled tokens (the policy that sampled the rollout)."""
    ref_logps: Tensor
    """Per token: log π_ref of the sampled tokens (equal to old_logps when there is no reference)."""
    sampler_logps: Tensor
    """Per token: the sampler's own log-probs (truncated importance sampling, ``tis_cap``)."""
    advantage: Tensor
    """FloatTensor[B]: one advantage per completion (RLOO, REINFORCE, GRPO, best-of-n)."""
    advantages: Tensor
    """Per token: advantages of token-level algorithms (PPO's GAE, REINFORCE++)."""
    returns: Tensor
    """Per token: PPO's value targets."""
    old_values: Tensor
    """Per token: PPO's value-head outputs at rollout time (for value clipping)."""
    score: Tensor
    """FloatTensor[B]: the completion's reward after shaping."""


PTX_PREFIX = "ptx_"
"""PPO-ptx: the keys of an SFT micro-batch riding along with a rollout batch carry this prefix
(``ptx_input_ids``, ...), see rollout/source.py."""
