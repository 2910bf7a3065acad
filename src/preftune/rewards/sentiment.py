"""VADER sentiment as a gold reward, for the seeds' controlled-sentiment experiment (the DPO paper's
IMDb task: make continuations of movie reviews more positive).

    from preftune.rewards.sentiment import VaderSentiment
    reward = VaderSentiment()
    reward(["The movie was"], [" wonderful, I loved it."])      # -> [0.83...]

Returns VADER's ``compound`` score of the completion alone, in [−1, 1] (Hutto & Gilbert 2014). The
prompt is ignored: the policy is rewarded for what it wrote, not for the review it continues.

VADER is a lexicon with rules, so it is easy to fool: sarcasm ("Great, just great. I fell asleep."
scores +0.85) and repetition ("great great great great" scores +0.95, more than most honest praise).
That makes it a good reward for watching over-optimisation / reward hacking, and a poor judge of
real sentiment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _completion_text(completion: Any) -> str:
    """Text of a completion record value: a string, or a list of {"role", "content"} messages (the
    assistant messages' contents joined, or all contents if there is no assistant message)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in completion):
        assistant = [m for m in completion if m.get("role") == "assistant"] or list(completion)
        return "\n".join(str(m["content"]) for m in assistant)
    raise ValueError(f"VaderSentiment: expected a completion string or a list of messages, got {type(completion).__name__}")


class VaderSentiment:
    """Reward source ``(prompts, completions) -> list[float]``: VADER compound score of each completion.

    Needs the ``vaderSentiment`` package (a preftune dependency; the lexicon ships inside it, so it
    works offline). 1000 short texts take about 60 ms on a CPU.
    """

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # optional dependency
        except ImportError:
            raise ImportError(
                "the VADER sentiment reward needs the vaderSentiment package: pip install vaderSentiment"
            ) from None
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return [float(self._analyzer.polarity_scores(_completion_text(c))["compound"]) for c in completions]

    def __repr__(self) -> str:
        return "VaderSentiment()"
