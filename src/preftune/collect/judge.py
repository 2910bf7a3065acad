"""An LLM as a labeller (seed 003: answers "assessed by human evaluators or an LLM").

``judge=llm:MODEL`` (default the packaged SmolLM2-135M-Instruct) is shown the guidelines, the prompt
and two completions as "Response A" / "Response B" and asked which is better; its verdict is the
sign of ``logit("A") - logit("B")`` at the answer position. Every pair is asked in both orders
(position swap, as in MT-Bench's judge, Zheng et al. 2023, sec. 3.4): the two verdicts agree -> that
completion wins; they disagree -> a tie (the judge preferred a position, not a completion). K-wise
items: all K(K-1)/2 pairs, then Borda over the pairwise outcomes (a tie = half a win each).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Sequence

import torch

from preftune.collect.consensus import ranking_from_scores
from preftune.config import ConfigError
from preftune.models.loading import load_model
from preftune.train.export import resolve_model

DEFAULT_MODEL = "smollm2-135m-instruct"
QUESTION = ("Which response is better under the guidelines? Answer with one letter, A or B.")
MAX_CHARS = 4000  # of each text shown to the judge; longer ones are cut


def combine(margin_ab: float, margin_ba: float) -> tuple[int | None, bool]:
    """Pure: the verdict on (a, b) from the two orders' margins (``> 0`` = the first shown is better).
    Returns (0 = a wins | 1 = b wins | None = tie, whether the two orders agreed)."""
    first = 0 if margin_ab > 0 else 1 if margin_ab < 0 else None
    swapped = 1 if margin_ba > 0 else 0 if margin_ba < 0 else None
    consistent = first is not None and first == swapped
    return (first if consistent else None), consistent


def ranking_from_pairs(k: int, outcomes: dict[tuple[int, int], int | None]) -> list[list[int]]:
    """Pure: Borda over pairwise outcomes {(i, j): 0 = i wins | 1 = j wins | None = tie}."""
    scores = [0.0] * k
    for (i, j), o in outcomes.items():
        if o is None:
            scores[i] += 0.5
            scores[j] += 0.5
        else:
            scores[(i, j)[o]] += 1
    return ranking_from_scores(scores)


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else "\n".join(f"[{m['role']}] {m['content']}" for m in value)
    return text[:MAX_CHARS]


class LLMJudge:
    def __init__(self, model: str = DEFAULT_MODEL, guidelines: str = "", batch_size: int = 8):
        self.name = model
        self.model, self.tokenizer = load_model(resolve_model(model))
        self.tokenizer.padding_side = "left"
        self.guidelines = guidelines.strip() or "Prefer the response that answers the prompt better."
        self.batch_size = batch_size
        self.choices = [self.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("A", "B")]

    def _query(self, prompt: Any, first: Any, second: Any) -> str:
        content = (f"Guidelines:\n{self.guidelines}\n\nPrompt:\n{_text(prompt)}\n\nResponse A:\n{_text(first)}\n\n"
                   f"Response B:\n{_text(second)}\n\n{QUESTION}")
        messages = [{"role": "user", "content": content}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "Answer: "
        return content + "\nAnswer: "

    def margins(self, rows: Sequence[tuple[Any, Any, Any]]) -> list[float]:
        """``logit(A) - logit(B)`` for each (prompt, first, second)."""

        out = []
        for start in range(0, len(rows), self.batch_size):
            texts = [self._query(*r) for r in rows[start : start + self.batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                logits = self.model(**enc).logits[:, -1, :]
            out += (logits[:, self.choices[0]] - logits[:, self.choices[1]]).tolist()
        return out

    def judge(self, items: Sequence[tuple[Any, list]]) -> list[dict]:
        """For each (prompt, completions): {"ranking", "pairs": {(i, j): outcome}, "consistent": n, "asked": n}."""
        asks, where = [], []
        for n, (prompt, completions) in enumerate(items):
            for i, j in combinations(range(len(completions)), 2):
                asks += [(prompt, completions[i], completions[j]), (prompt, completions[j], completions[i])]
                where.append((n, i, j))
        margins = self.margins(asks)
        results = [{"pairs": {}, "consistent": 0, "asked": 0, "margins": {}} for _ in items]
        for m, (n, i, j) in enumerate(where):
            outcome, consistent = combine(margins[2 * m], margins[2 * m + 1])
            r = results[n]
            r["pairs"][(i, j)] = outcome
            r["margins"][(i, j)] = (margins[2 * m], margins[2 * m + 1])
            r["consistent"] += consistent
            r["asked"] += 1
        for r, (_, completions) in zip(results, items):
            r["ranking"] = ranking_from_pairs(len(completions), r["pairs"])
        return results


def parse_spec(spec: str) -> str | None:
    """'llm' / 'llm:MODEL' -> the model name; anything else -> None (a reward-function judge)."""
    if spec == "llm":
        return DEFAULT_MODEL
    if spec.startswith("llm:"):
        return spec[4:] or DEFAULT_MODEL
    return None


def agreement_with_gold(results: Sequence[dict], gold_scores: Sequence[Sequence[float]], tolerance: float = 0.0) -> dict:
    """Position consistency, and how often the judge agrees with a gold reward on the pairs whose gold
    scores differ by more than ``tolerance``: over the pairs it decided, with its ties counted as half
    right, and -- where the margins are known -- by the sign of the mean margin over both orders
    (``m_ab - m_ba``: "balanced position calibration", Wang et al. 2023, which cancels a constant
    preference for one position). ``first_position_rate``: how often the first-shown completion won."""
    asked = consistent = decided = agree = gold_pairs = balanced = first = 0
    for r, gold in zip(results, gold_scores):
        asked += r["asked"]
        consistent += r["consistent"]
        for (i, j), outcome in r["pairs"].items():
            m_ab, m_ba = r.get("margins", {}).get((i, j), (0.0, 0.0))
            first += (m_ab > 0) + (m_ba > 0)
            if abs(gold[i] - gold[j]) <= tolerance:
                continue
            gold_pairs += 1
            balanced += (m_ab - m_ba > 0) == (gold[i] > gold[j])
            if outcome is None:
                continue
            decided += 1
            agree += (outcome == 0) == (gold[i] > gold[j])
    return {"pairs": asked, "position_consistency": consistent / asked if asked else None,
            "first_position_rate": first / (2 * asked) if asked else None, "gold_pairs": gold_pairs,
            "decided": decided, "agreement_when_decided": agree / decided if decided else None,
            "agreement_ties_as_half": (agree + 0.5 * (gold_pairs - decided)) / gold_pairs if gold_pairs else None,
            "agreement_balanced_margin": balanced / gold_pairs if gold_pairs else None}


def label_session(session, model: str, guidelines: str = "") -> dict:
    """``preftune label judge=llm:MODEL``: rank every pending item of a LabelSession with the judge."""

    if session.mode != "rank":
        raise ConfigError("label.judge: an LLM judge ranks; use mode=rank")
    judge = LLMJudge(model, guidelines)
    pending = session.pending()
    results = judge.judge([(it.prompt, it.completions) for it in pending])
    counts = {"labelled": 0, "skipped_all_tied": 0, "position_consistency": 0.0}
    for item, r in zip(pending, results):
        if len(r["ranking"]) < 2:
            session.skip(item.key)
            counts["skipped_all_tied"] += 1
        else:
            session.rank(item.key, r["ranking"], judge_consistent_pairs=r["consistent"], judge_pairs=r["asked"])
            counts["labelled"] += 1
    asked = sum(r["asked"] for r in results)
    counts["position_consistency"] = round(sum(r["consistent"] for r in results) / asked, 3) if asked else None
    return counts


def judge_project(store, spec: str) -> dict:
    """``preftune collect judge``: the LLM ``spec`` joins the project as annotator 'judge:SPEC' and
    answers every item it has not answered yet. Returns {"answered", "asked", "position_consistency"}."""

    model = parse_spec(spec)
    if model is None:
        raise ConfigError(f"collect.judge: expected 'llm' or 'llm:MODEL', got {spec!r}")
    meta = store.get_meta()
    if meta["mode"] != "rank":
        raise ConfigError("collect.judge: an LLM judge ranks; this project collects thumbs")
    who = store.annotator_id(f"judge:{spec}", create=True)
    done = {r["item_id"] for r in store.current(who)}
    todo = [it for i, it in store.items().items() if i not in done]
    store.assign(who, [it["id"] for it in todo])
    results = LLMJudge(model, meta.get("guidelines", "")).judge([(it["prompt"], it["completions"]) for it in todo])
    for it, r in zip(todo, results):
        store.submit(who, it["id"], "rank", r["ranking"])
    asked = sum(r["asked"] for r in results)
    return {"answered": len(todo), "asked": asked,
            "position_consistency": sum(r["consistent"] for r in results) / asked if asked else None}
