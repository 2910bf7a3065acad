"""The diverse-preferences study's data: the groups' gold rewards, π_ref's sample pairs, who labels
which pair, the held-out pairs every group labels, and the linear BT mixture fitted by EM without the
group labels (see ``preftune.experiments.diverse`` for the study itself)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from preftune.config import ConfigError
from preftune.data.groups import assignment_accuracy
from preftune.losses.diverse import fit_bt_mixture
from preftune.models.cache import write_jsonl
from preftune.models.loading import load_model
from preftune.rewards.sentiment import VaderSentiment
from preftune.rollout.sampling import generate_completions

__all__ = ["assign", "calm", "disagreement_rate", "fit_linear_em", "label", "longer", "sample_pairs", "write_held_out"]


def calm(prompts, completions) -> list[float]:
    """Group B's gold reward: calm, short continuations: −0.05 per word − 0.5 per '!'."""
    return [-0.05 * len(c.split()) - 0.5 * c.count("!") for c in completions]


def longer(prompts, completions) -> list[float]:
    """A stand-in for sentiment on tiny random models (whose text VADER scores 0): characters / 10."""
    return [len(c) / 10 for c in completions]


def sample_pairs(model_name: str, prompts: list, *, max_new_tokens: int, seed: int, model_seed: int, progress: bool,
                 pairs_per_prompt: int = 1) -> list[dict]:
    """2 × ``pairs_per_prompt`` samples per prompt from π_ref, paired disjointly (1st with 2nd, 3rd with
    4th, ...): [{"prompt", "a", "b"}] (identical or empty samples dropped)."""

    model, tok = load_model(model_name, seed=model_seed)
    rows = generate_completions(model, tok, [p for p in prompts for _ in range(2 * pairs_per_prompt)], max_new_tokens=max_new_tokens,
                                temperature=1.0, batch_size=16, seed=seed, progress=progress)
    del model
    pairs = [{"prompt": a["prompt"], "a": a["completion"], "b": b["completion"]} for a, b in zip(rows[::2], rows[1::2])]
    return [p for p in pairs if p["a"].strip() and p["b"].strip() and p["a"] != p["b"]]


def label(pairs: list[dict], gold, group: str, annotator: str | None = None) -> list[dict]:
    """Rows {prompt, chosen, rejected, group(, annotator)} by ``gold``; ties dropped."""
    if not pairs:
        return []
    prompts = [p["prompt"] for p in pairs]
    sa, sb = gold(prompts, [p["a"] for p in pairs]), gold(prompts, [p["b"] for p in pairs])
    out = []
    for p, x, y in zip(pairs, sa, sb):
        if x == y:
            continue
        win, lose = (p["a"], p["b"]) if x > y else (p["b"], p["a"])
        row = {"prompt": p["prompt"], "chosen": win, "rejected": lose, "group": group}
        out.append(row if annotator is None else {**row, "annotator": annotator})
    return out


def write_held_out(samples: list[dict], golds: dict, path: Path) -> dict:
    """Every held-out pair labelled by every group (ties dropped per group) -> ``path``; pairs per group
    and the groups' disagreement rate."""

    rows, stats = [], {}
    for g, gold in golds.items():
        labelled = label(samples, gold, g)
        if not labelled:
            raise ConfigError(f"no held-out pair could be labelled for group {g!r} (all ties); use more test_prompts")
        stats[g] = len(labelled)
        rows += labelled
    stats["disagreement_rate"] = disagreement_rate(samples, list(golds.values())[:2])
    write_jsonl(rows, path)
    return stats


def disagreement_rate(samples: list[dict], golds: list) -> float | None:
    """Share of the pairs both rewards order strictly on which they order oppositely."""
    if not samples:
        return None
    prompts = [p["prompt"] for p in samples]
    diffs = []
    for gold in golds:
        a, b = gold(prompts, [p["a"] for p in samples]), gold(prompts, [p["b"] for p in samples])
        diffs.append([x - y for x, y in zip(a, b)])
    strict = [(d1, d2) for d1, d2 in zip(*diffs) if d1 != 0 and d2 != 0]
    return sum((d1 > 0) != (d2 > 0) for d1, d2 in strict) / len(strict) if strict else None


def assign(groups: list[str], annotators: int, mix: float, samples: list[dict], golds: dict) -> list[dict]:
    """Round-robin pairs to annotators; the first round(mix·n) annotators are in the first group, the
    rest spread over the other groups; each labels with their group's gold reward."""
    n_first = round(mix * annotators)
    others = groups[1:]
    members = [groups[0]] * n_first + [others[i % len(others)] for i in range(annotators - n_first)]
    rows = []
    for i, pair in enumerate(samples):
        a = i % annotators
        rows += label([pair], golds[members[a]], members[a], annotator=f"{members[a]}-{a}")
    return rows


def fit_linear_em(pairs: list[dict], num_components: int, seed: int, out: Path) -> dict:
    """EM over a mixture of K linear BT models on simple completion features, without the group labels;
    written to ``out`` (em_components.json) and returned."""

    texts = sorted({t for r in pairs for t in (r["chosen"], r["rejected"])})
    index = {t: i for i, t in enumerate(texts)}
    vader = VaderSentiment()([""] * len(texts), texts)
    feats = torch.tensor([[v, len(t.split()) / 10, t.count("!"), len(t) / 50] for v, t in zip(vader, texts)], dtype=torch.float32)
    annotators = sorted({r["annotator"] for r in pairs})
    a_index = {a: i for i, a in enumerate(annotators)}
    fit = fit_bt_mixture(torch.tensor([index[r["chosen"]] for r in pairs]), torch.tensor([index[r["rejected"]] for r in pairs]),
                         torch.tensor([a_index[r["annotator"]] for r in pairs]), num_items=len(texts),
                         num_annotators=len(annotators), num_components=min(num_components, len(annotators)), features=feats,
                         iterations=15, m_steps=30, restarts=3, seed=seed)
    truth = {a: a.rsplit("-", 1)[0] for a in annotators}
    resp = fit["responsibilities"].tolist()
    component = [max(range(len(r)), key=r.__getitem__) for r in resp]
    correct, names = assignment_accuracy([truth[a] for a in annotators], component)
    em = {"features": ["vader", "words/10", "exclamations", "chars/50"], "weights": fit["weights"].tolist(),
          "prior": fit["prior"].tolist(), "assignment_accuracy": correct,
          "annotators": {a: {"group": truth[a], "component": c, "component_group": names[c], "responsibilities": r}
                         for a, c, r in zip(annotators, component, resp)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(em, indent=2) + "\n")
    return em
