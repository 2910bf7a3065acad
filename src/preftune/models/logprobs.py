"""Log-probabilities of completion tokens under a causal LM.

Shapes: B = rows, T = sequence length, N = number of scored tokens in the batch, H = hidden size,
V = vocabulary size. Batch dictionaries follow docs/contracts.md.

Why not ``model(**batch).logits.log_softmax(-1)``: that materialises a [B, T, V] fp32 tensor (and keeps
it for backward), although only the completion tokens are scored. For SmolLM2 (V = 49152) one
4 x 512 batch is 400 MB of logits, most of them on prompt and padding. Here the backbone runs alone,
the hidden states of the N scored positions are gathered, and the output head + log-softmax run in
chunks of ``chunk_size`` rows in fp32. Autograd still keeps each chunk's logits for backward
(N x V in all) unless ``recompute_head``, which checkpoints each chunk: O(chunk_size x V) memory for
one extra head matmul. Measured on a SmolLM2-shaped model (V = 49152, 2 layers, fwd+bwd, 8 x 512
tokens, N = 3686 scored, 2 CPU cores, peak RSS over baseline / min time of 7): full logits 2.9 GB;
chunked 1.8 GB, 3.9 s; chunked + recompute at chunk_size=256 1.0 GB, 5.6 s. The extra head matmul
is ~1/3 of the head's fwd+bwd, i.e. an estimated ~7% of a full 30-layer SmolLM2 step, so recompute
is automatic only once the kept logits would pass 1 GiB (N > ~5400 scored tokens for SmolLM2).

Pair batches come in two layouts (``preftune.data.collate``): ``collate_pairs`` rows (prompt + chosen,
then prompt + rejected, all padded to one length) and ``collate_shared_pairs`` rows (prompt + chosen +
rejected, one row per pair, with position ids and a 4-D attention mask that keep the two completions
apart). :func:`concatenated_logps` scores either; the shared layout runs each prompt once and pads
only across pairs (on SmolLM2 with the benchmark data, 593 instead of 891 positions per step of 2
pairs), for models that :func:`shared_prompt_unsupported` accepts.

The fast path is used only for architectures whose causal-LM head is known to be
``lm_head(backbone(...).last_hidden_state)`` up to a trivial logit transform (``_HEAD_TRANSFORMS``);
anything else (unknown model types, DDP/compile wrappers, FSDP2-sharded models, peft prompt-learning adapters) takes the
plain ``model(...).logits`` path, which is correct but uses O(B x T x V) memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from preftune.models.zero import is_partitioned

__all__ = [
    "per_token_logps",
    "sequence_logps",
    "concatenated_logps",
    "unpack",
    "supports_fast_path",
    "shared_prompt_unsupported",
]


def _softcap(config) -> Callable[[Tensor], Tensor] | None:
    # Gemma 2/3: logits = c * tanh(logits / c)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        return None
    return lambda logits: torch.tanh(logits / cap) * cap


def _granite(config) -> Callable[[Tensor], Tensor] | None:
    scale = getattr(config, "logits_scaling", 1.0)
    return None if scale == 1.0 else (lambda logits: logits / scale)


def _cohere(config) -> Callable[[Tensor], Tensor] | None:
    scale = getattr(config, "logit_scale", 1.0)
    return None if scale == 1.0 else (lambda logits: logits * scale)


def _identity(config) -> None:
    return None


# model_type -> builder of the transform the causal-LM class applies to lm_head's output.
# Each entry is checked against the model's own logits in tests/test_logprobs.py.
_HEAD_TRANSFORMS: dict[str, Callable] = {
    "llama": _identity,
    "mistral": _identity,
    "qwen2": _identity,
    "qwen3": _identity,
    "gpt2": _identity,
    "gemma": _identity,
    "gemma2": _softcap,
    "gemma3_text": _softcap,
    "granite": _granite,
    "cohere": _cohere,
}


_RECOMPUTE_ABOVE_BYTES = 1 << 30


def _unwrap_peft(model):
    """The causal LM inside a peft ``PeftModel``, or None when the adapter must run through its wrapper.

    LoRA-style adapters are injected into the inner modules in place, so calling the inner model applies
    them (and ``disable_adapter()`` still switches them off). Prompt-learning adapters (prefix / prompt
    tuning) live in the wrapper's forward and cannot be bypassed.
    """
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        active = getattr(model, "active_peft_config", None)
        if active is not None and getattr(active, "is_prompt_learning", False):
            return None
        return model.get_base_model()
    return model


def _fast_parts(model):
    """(backbone, head, logit_transform) for the chunked path, or None for the plain path."""
    inner = _unwrap_peft(model)
    if _is_fsdp_sharded(inner):  # the root unit gathers only in the model's own forward (preftune/train/sharding.py)
        return None
    if is_partitioned(inner):  # ZeRO-3: a gather per head call, and each process scores its own number of chunks
        return None
    config = getattr(inner, "config", None)
    builder = _HEAD_TRANSFORMS.get(getattr(config, "model_type", None))
    if builder is None or not hasattr(inner, "get_decoder"):
        return None
    head = inner.get_output_embeddings()
    backbone = inner.get_decoder()
    if head is None or backbone is inner:
        return None
    return backbone, head, builder(config)


def _is_fsdp_sharded(model) -> bool:
    if not torch.distributed.is_available():  # builds without distributed support shard nothing
        return False
    from torch.distributed.fsdp import FSDPModule  # here: after the check that this build has it

    return isinstance(model, FSDPModule)


def supports_fast_path(model) -> bool:
    """True when :func:`per_token_logps` avoids materialising full-vocabulary logits for ``model``."""
    return _fast_parts(model) is not None


# model_type -> the architecture's attention applies a custom 4-D boolean mask as given (transformers
# passes 4-D masks through unchanged) and its positions come from position_ids. Each entry is checked
# against the padded layout in tests/test_pair_layout.py.
_SHARED_PROMPT_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})


def shared_prompt_unsupported(model, max_length: int | None = None) -> str | None:
    """Why ``model`` cannot score shared-prompt pair rows (``collate_shared_pairs``); None if it can.

    The layout needs an architecture in ``_SHARED_PROMPT_TYPES``, SDPA attention (it applies a boolean
    mask as given; eager attention would add it to the scores, and other kernels expect other mask
    forms) and no sliding window shorter than a sequence (``max_length`` tokens): transformers applies
    no window to a custom 4-D mask, so the window must not matter.
    """
    inner = _unwrap_peft(model)
    if inner is None:
        return "a prompt-learning adapter adds virtual tokens that the pair mask does not cover"
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _SHARED_PROMPT_TYPES:
        return f"model type {model_type!r} is not known to honour custom 4-D attention masks"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != "sdpa":
        return f"attention implementation {implementation!r} (the layout needs 'sdpa')"
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and (max_length is None or window < max_length):
        return f"sliding-window attention ({window} tokens) with sequences of up to {max_length} tokens"
    return None


def _scored(completion_mask: Tensor) -> Tensor:
    """completion_mask as bool with position 0 cleared: nothing precedes it, so it is never scored."""
    mask = completion_mask.bool().clone()
    mask[:, 0] = False
    return mask


def _predecessors(batch: Mapping[str, Tensor], rows: Tensor, cols: Tensor) -> Tensor:
    """[N] position whose output predicts the token at (rows, cols): the one before it, except for the
    first rejected token of a shared-prompt pair row, which continues the prompt (``pair_lengths``)."""
    sources = cols - 1
    lengths = batch.get("pair_lengths")
    if lengths is not None:
        lengths = lengths.to(cols.device)
        prompt, chosen = lengths[rows, 0], lengths[rows, 1]
        sources = torch.where(cols == prompt + chosen, prompt - 1, sources)
    return sources


def _chunk_logps(head, transform, hidden: Tensor, targets: Tensor, with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(head(hidden))[targets] for one chunk: [n, H], [n] -> [n] fp32; with ``with_entropy``
    also the entropy [n] of each softmax, from the same logits (no gradient, no second head matmul)."""
    logits = head(hidden).float()  # under autocast the matmul runs in bf16; the softmax never does
    if transform is not None:
        logits = transform(logits)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    if not with_entropy:
        return logps
    with torch.no_grad():
        return logps, _entropy(logits.detach())


def _cat_chunks(pieces: list, like: Tensor, with_entropy: bool) -> Tensor | tuple[Tensor, Tensor]:
    """The chunks' outputs of _chunk_logps laid end to end: [N] (and [N] entropies)."""
    if not pieces:
        empty = like.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if with_entropy else empty
    if not with_entropy:
        return torch.cat(pieces)
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def _logits_logps(logits: Tensor, targets: Tensor, chunk_size: int, with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Same as _chunk_logps for precomputed logits [N, V], in fp32 chunks."""
    out = [
        _chunk_logps(torch.nn.Identity(), None, logits[i : i + chunk_size], targets[i : i + chunk_size], with_entropy)
        for i in range(0, logits.shape[0], chunk_size)
    ]
    return _cat_chunks(out, logits, with_entropy)


def _model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # use_cache=False: a packed forward with a KV cache silently mixes sequences (see shared/ASSETS.md).
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if batch.get(key) is not None:
            inputs[key] = batch[key]
    return inputs


def _head_logps(parts, batch, rows, sources, targets, chunk_size: int, recompute_head: bool | None, with_entropy: bool):
    """The backbone's hidden states at the scored positions through the output head, in chunks of
    ``chunk_size`` rows (each recomputed in backward when ``recompute_head``; see :func:`per_token_logps`)."""
    backbone, head, transform = parts
    out = backbone(**_model_inputs(batch))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden[rows, sources]  # [N, H]
    if recompute_head is None:
        vocab = getattr(head, "out_features", None) or head.weight.shape[0]
        recompute_head = hidden.shape[0] * vocab * 4 > _RECOMPUTE_ABOVE_BYTES
    checkpointed = recompute_head and torch.is_grad_enabled()
    pieces = []
    for i in range(0, hidden.shape[0], chunk_size):
        args = (head, transform, hidden[i : i + chunk_size], targets[i : i + chunk_size], with_entropy)
        pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if checkpointed else _chunk_logps(*args))
    return _cat_chunks(pieces, hidden, with_entropy)


def per_token_logps(
    model,
    batch: Mapping[str, Tensor],
    *,
    chunk_size: int = 1024,
    recompute_head: bool | None = None,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the completion tokens.

    Args:
        model: a HF causal LM, optionally wrapped in a peft ``PeftModel``.
        batch: ``input_ids`` [B, T], ``completion_mask`` [B, T] (True where the token AT that position
            is scored), and ``attention_mask`` [B, T] and/or ``position_ids`` [B, T] (packed rows:
            position ids restart at 0 per sequence and there is no attention mask; transformers then
            builds a block-diagonal mask). Shared-prompt pair rows (``collate_shared_pairs``) carry a
            4-D ``attention_mask`` and ``pair_lengths`` [B, 3]; their first rejected token is then
            predicted from the last prompt position.
        chunk_size: rows of the output head evaluated at once (memory O(chunk_size x V)).
        recompute_head: when gradients are enabled, recompute each chunk's logits in backward instead
            of keeping all N x V of them alive (same gradients, one extra head matmul). None: only when
            the kept fp32 logits would exceed ``_RECOMPUTE_ABOVE_BYTES`` (1 GiB).
        with_entropy: also return the entropy of the model's next-token distribution at each scored
            position, computed from the logits the log-probs are taken from (no extra head matmul; a
            monitoring value without gradient).

    Returns:
        fp32 Tensor [B, T]: ``[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` where
        ``completion_mask[b, t]`` (t >= 1), else 0. Differentiable w.r.t. the model's parameters.
        With ``with_entropy``: (that tensor, entropy fp32 [B, T], 0 off the scored positions).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    input_ids = batch["input_ids"]
    mask = _scored(batch["completion_mask"].to(input_ids.device))
    rows, cols = mask.nonzero(as_tuple=True)  # [N] each, row-major: the order masked_scatter fills in
    targets = input_ids[rows, cols]
    sources = _predecessors(batch, rows, cols)

    parts = _fast_parts(model)
    if parts is None:
        logits = model(**_model_inputs(batch)).logits
        flat = _logits_logps(logits[rows, sources], targets, chunk_size, with_entropy)
    else:
        flat = _head_logps(parts, batch, rows, sources, targets, chunk_size, recompute_head, with_entropy)

    # Scatter the N values back to [B, T]; masked_scatter fills in the same row-major order as mask[...].
    if with_entropy:
        return _scatter(mask, flat[0]), _scatter(mask, flat[1])
    return _scatter(mask, flat)


def _scatter(mask: Tensor, flat: Tensor) -> Tensor:
    """[N] values of the scored positions -> fp32 [B, T], 0 elsewhere (row-major, the order of mask[...])."""
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=flat.device)
    return zeros.masked_scatter(mask, flat)


def sequence_logps(
    per_token_logps: Tensor,
    completion_mask: Tensor,
    *,
    average: bool = False,
    seq_lengths: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Sum (or mean, for length-normalised losses) of per-token log-probs over the scored tokens.

    Args:
        per_token_logps: [B, T] from :func:`per_token_logps`.
        completion_mask: [B, T]; position 0 is never counted.
        average: divide by the number of scored tokens (a row with none gives 0).
        seq_lengths: for packed batches: lengths of the sequences laid end to end in the row-major
            flattening of the [B, T] tensors (each packed row's sequences, then the next row's). Their
            sum may be less than B*T (trailing padding); a sequence must not straddle two rows.

    Returns:
        fp32 [B], or [len(seq_lengths)] when ``seq_lengths`` is given.
    """
    mask = _scored(completion_mask.to(per_token_logps.device))
    values = per_token_logps.float().masked_fill(~mask, 0.0)
    if seq_lengths is None:
        totals, counts = values.sum(-1), mask.sum(-1)
    else:
        lengths = torch.as_tensor(seq_lengths, dtype=torch.long, device=values.device)
        n = int(lengths.sum())
        if n > values.numel():
            raise ValueError(f"seq_lengths sum to {n} but the batch holds {values.numel()} tokens")
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
        totals = values.new_zeros(len(lengths)).index_add(0, segment, values.reshape(-1)[:n])
        counts = mask.new_zeros(len(lengths), dtype=torch.long).index_add(
            0, segment, mask.reshape(-1)[:n].long()
        )
    if average:
        return totals / counts.clamp(min=1)
    return totals


def unpack(per_token: Tensor, seq_lengths: Sequence[int] | Tensor) -> list[Tensor]:
    """Split a packed [1, N] (or [B, T], row-major) tensor into one 1-D tensor per sequence."""
    lengths = [int(x) for x in seq_lengths]
    flat = per_token.reshape(-1)
    if sum(lengths) > flat.numel():
        raise ValueError(f"seq_lengths sum to {sum(lengths)} but the tensor holds {flat.numel()} entries")
    return list(torch.split(flat[: sum(lengths)], lengths))


def concatenated_logps(
    model,
    pair_batch: Mapping[str, Tensor],
    *,
    average: bool = False,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """One forward over a batch of B pairs, in either layout (see docs/contracts.md):
    ``collate_pairs`` (rows 0..B-1 chosen, B..2B-1 rejected) or ``collate_shared_pairs`` (one row per
    pair, marked by ``pair_lengths``).

    Returns ``chosen_logps``, ``rejected_logps`` [B] (sums, or means when ``average``);
    ``chosen_per_token_logps``, ``rejected_per_token_logps`` [B, T] with ``chosen_mask``,
    ``rejected_mask`` [B, T] (bool, the scored tokens of each; values elsewhere are 0); and
    ``chosen_lengths``, ``rejected_lengths`` [B] (number of scored tokens, long). In the shared layout
    both completions of a pair lie in the same row, so the chosen and rejected tensors have the same T.
    """
    per_token = per_token_logps(model, pair_batch, chunk_size=chunk_size)
    mask = _scored(pair_batch["completion_mask"].to(per_token.device))
    lengths = pair_batch.get("pair_lengths")
    if lengths is None:
        rows = per_token.shape[0]
        if rows % 2:
            raise ValueError(f"a pair batch needs an even number of rows (chosen then rejected), got {rows}")
        b = rows // 2
        chosen_mask, rejected_mask = mask[:b], mask[b:]
        chosen, rejected = per_token[:b], per_token[b:]
    else:
        lengths = lengths.to(per_token.device)
        positions = torch.arange(mask.shape[1], device=mask.device)
        in_rejected = positions[None, :] >= (lengths[:, 0] + lengths[:, 1])[:, None]
        chosen_mask, rejected_mask = mask & ~in_rejected, mask & in_rejected
        chosen, rejected = per_token.masked_fill(~chosen_mask, 0.0), per_token.masked_fill(~rejected_mask, 0.0)
    return {
        "chosen_logps": sequence_logps(chosen, chosen_mask, average=average),
        "rejected_logps": sequence_logps(rejected, rejected_mask, average=average),
        "chosen_per_token_logps": chosen,
        "rejected_per_token_logps": rejected,
        "chosen_mask": chosen_mask,
        "rejected_mask": rejected_mask,
        "chosen_lengths": chosen_mask.sum(-1),
        "rejected_lengths": rejected_mask.sum(-1),
    }


def policy_forward(model, batch: Mapping[str, Tensor], *, with_entropy: bool = False, chunk_size: int = 1024) -> dict[str, Tensor]:
    """One forward for RL: per-token log-probs, the hidden states that predict each scored token (for
    a value head on the shared backbone) and, optionally, the per-token entropy of the policy.

    Returns ``logps`` fp32 [B, T] (as :func:`per_token_logps`), ``hidden`` [N, H] (row-major order of
    the scored positions, N = scored tokens), ``mask`` [B, T] (the scored positions) and, with
    ``with_entropy``, ``entropy`` fp32 [B, T] (no gradient; monitoring only).
    """
    input_ids = batch["input_ids"]
    mask = _scored(batch["completion_mask"].to(input_ids.device))
    targets = input_ids[:, 1:][mask[:, 1:]]
    parts = _fast_parts(model)
    if parts is None:
        out = model(**_model_inputs(batch), output_hidden_states=True)
        hidden = out.hidden_states[-1][:, :-1][mask[:, 1:]]
        flat = _logits_logps(out.logits[:, :-1][mask[:, 1:]], targets, chunk_size, with_entropy)
    else:
        backbone, head, transform = parts
        out = backbone(**_model_inputs(batch))
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, :-1][mask[:, 1:]]
        pieces = [_chunk_logps(head, transform, hidden[i : i + chunk_size], targets[i : i + chunk_size], with_entropy)
                  for i in range(0, hidden.shape[0], chunk_size)]
        flat = _cat_chunks(pieces, hidden, with_entropy)
    if not with_entropy:
        return {"logps": _scatter(mask, flat), "hidden": hidden, "mask": mask}
    return {"logps": _scatter(mask, flat[0]), "hidden": hidden, "mask": mask, "entropy": _scatter(mask, flat[1])}


def _entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
