"""How well does the LLM judge (`judge=llm:MODEL`) agree with a gold reward? The sentiment task:
continuations of the built-in movie-review prompts, gold = VADER (the more positive is better).

    python3 -m preftune generate prompts=builtin:movie_review_prompts max_rows=100 num_samples=2 \\
        max_new_tokens=32 output=/tmp/judge/samples.jsonl
    python3 benchmarks/judge_agreement.py /tmp/judge/samples.jsonl [MODEL]   # -> benchmarks/results/judge_agreement.json

Prints the judge's position consistency (both orders give the same verdict) and its agreement with
VADER on the pairs whose VADER scores differ: over the pairs it decided, and counting its ties
(inconsistent pairs) as half right.
"""

import json
import sys
import time
from pathlib import Path

from preftune.collect.judge import DEFAULT_MODEL, LLMJudge, agreement_with_gold
from preftune.label.items import load_items
from preftune.rewards.sentiment import VaderSentiment

GUIDELINES = "The better response continues the movie review with the more positive sentiment about the film."


def main() -> None:
    samples, model = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else DEFAULT_MODEL)
    items = load_items(samples)
    start = time.time()
    judge = LLMJudge(model, GUIDELINES)
    results = judge.judge([(it.prompt, it.completions) for it in items])
    vader = VaderSentiment()
    gold = [list(vader([it.prompt] * len(it.completions), it.completions)) for it in items]
    report = {"model": model, "samples": samples, "items": len(items), "guidelines": GUIDELINES,
              **agreement_with_gold(results, gold, tolerance=0.05), "seconds": round(time.time() - start, 1)}
    out = Path(__file__).parent / "results" / "judge_agreement.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
