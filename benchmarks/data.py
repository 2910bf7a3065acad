"""Synthetic preference pairs of varied length for benchmarks (no downloads, deterministic from a seed).

The text is drawn from a fixed list of common English words, each of which is one token (with its
leading space) for SmolLM2's tokenizer, so a length in words is close to a length in tokens. What a
benchmark measures is speed and memory, so the words need not make sense; what matters is that the
lengths vary the way real data does: padding within a batch is part of the cost being compared.

    from benchmarks.data import make_pairs
    rows = make_pairs(16, seed=0)          # [{"prompt": str, "chosen": str, "rejected": str}, ...]

Plain-text rows (no chat template): preftune and TRL then tokenize them the same way (prompt, then
completion + EOS), which keeps the two trainers' token streams as close as possible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be or "
    "has had first one their its new after who they have two her she been other when there all "
    "during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made also several "
    "national part people between under high three while since film year both second being team "
    "american well before being through until area game house number season county group found "
    "life called including during state early around these family named being following war work "
    "water music light river field power small large north south west east long old great good "
    "little right left hand head home name place point line story book word back side body door "
    "road street room face voice color heart mind money night morning summer winter paper table "
    "garden window market office letter question answer answers simple clear careful quick slow "
    "bright dark warm cold strong short tall young open close bring carry build change check choose "
    "draw drive follow give grow help hold keep learn leave listen move need offer plan play read "
    "show speak start stay take teach tell think travel turn visit wait walk watch write"
).split()
WORDS = tuple(dict.fromkeys(WORDS))  # unique, in order


def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    words[0] = words[0].capitalize()
    # A full stop every ~12 words, so the text tokenizes like prose rather than one endless clause.
    out = []
    for i, w in enumerate(words):
        out.append(w)
        if i % 12 == 11 and i != len(words) - 1:
            out[-1] += "."
    return " ".join(out) + "."


def make_pairs(
    n: int,
    seed: int = 0,
    *,
    prompt_words: tuple[int, int] = (10, 106),
    response_words: tuple[int, int] = (13, 183),
) -> list[dict]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}`` of plain text.

    Prompt and each response length are drawn uniformly (inclusive) from the given word ranges; the
    defaults give prompts of ~15-120 tokens and responses of ~15-200 tokens with SmolLM2's tokenizer
    (the prompt wraps its words in "Question: ...\\nAnswer:", the responses start with a space).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = rng.randint(*prompt_words)
        c = rng.randint(*response_words)
        r = rng.randint(*response_words)
        rows.append(
            {
                "prompt": f"Question: {_text(rng, p)}\nAnswer:",
                "chosen": " " + _text(rng, c),
                "rejected": " " + _text(rng, r),
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


if __name__ == "__main__":  # python benchmarks/data.py N SEED > pairs.jsonl
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    for row in make_pairs(n, seed):
        print(json.dumps(row))
