"""A reward a tiny random model can learn in a few steps: the fraction of completion tokens whose id
is below 300 in the tiny tokenizer (about 30% of the vocabulary, so ~0.3-0.45 at random init)."""

from preftune.models.tiny import load_tiny_tokenizer

_tok = load_tiny_tokenizer()


def low_ids(prompts, completions):
    out = []
    for text in completions:
        ids = _tok(text, add_special_tokens=False).input_ids
        out.append(sum(i < 300 for i in ids) / max(len(ids), 1))
    return out


def nan_when_flagged(prompts, completions):
    """low_ids, except that while the file named by $PREFTUNE_TEST_NAN_FLAG exists, the 2nd call of the
    process (= the 2nd rollout) scores the first completion of rank $NAN_RANK (default every rank) NaN."""
    import os

    global _calls
    _calls += 1
    out = low_ids(prompts, completions)
    flag = os.environ.get("PREFTUNE_TEST_NAN_FLAG", "")
    rank = os.environ.get("NAN_RANK")
    if _calls == 2 and flag and os.path.exists(flag) and rank in (None, os.environ.get("RANK", "0")):
        out[0] = float("nan")
    return out


_calls = 0


def constant(prompts, completions):
    """The same reward for every completion: group-relative advantages are all 0."""
    return [0.5 for _ in completions]


def rare_low(prompts, completions):
    """1 when at least 3/4 of a completion's tokens have ids below 300, else 0: a sparse reward whose
    k samples of a prompt often all score 0 (for dynamic sampling)."""
    return [float(score >= 0.75) for score in low_ids(prompts, completions)]
