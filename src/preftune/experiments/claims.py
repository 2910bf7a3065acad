"""The sentiment study's six claims, each judged from the study's own numbers: a list of comparisons
(a difference in the direction the claim predicts, ± its standard error) becomes a verdict.

    confirmed      at least one difference is in the claim's direction by more than Z standard errors,
                   and none against it by more than Z
    not confirmed  none is significantly in the claim's direction (against it, or all within Z SE)
    mixed          significant differences both ways

Z = 2 (about a 95% two-sided test for each comparison, not corrected for several comparisons).
Standard errors of differences assume independent estimates (separate models' samples), and a
front interpolated between two models carries the interpolated SE of its two ends.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from preftune.eval.metrics import pareto_front

Z = 2.0
"""A difference counts when it exceeds Z standard errors."""

RL_ALGORITHMS = ("ppo", "rloo", "reinforce")


@dataclass(frozen=True)
class Comparison:
    """``difference`` > 0 means the claim's direction."""

    what: str
    difference: float
    se: float

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.difference / self.se
        return math.copysign(math.inf, self.difference) if self.difference else 0.0

    def as_dict(self) -> dict:
        return {"comparison": self.what, "difference": self.difference, "se": self.se, "z": self.z}


def verdict(comparisons: Sequence[Comparison]) -> str:
    """'confirmed' / 'not confirmed' / 'mixed' (see the module docstring)."""
    support = any(c.z > Z for c in comparisons)
    against = any(c.z < -Z for c in comparisons)
    if support and against:
        return "mixed"
    return "confirmed" if support else "not confirmed"


def _claim(number: int, title: str, comparisons: list[Comparison], sentence: str, *, plots=(), ran: bool = True,
           notes: Sequence[str] = (), quotes: Sequence[dict] = ()) -> dict:
    return {"claim": number, "title": title, "verdict": verdict(comparisons) if ran else "not run",
            "sentence": sentence, "comparisons": [c.as_dict() for c in comparisons], "plots": list(plots),
            "notes": list(notes), "quotes": list(quotes)}


def _count(comparisons: Sequence[Comparison]) -> str:
    support = sum(c.z > Z for c in comparisons)
    against = sum(c.z < -Z for c in comparisons)
    return f"{support} of {len(comparisons)} comparisons favour it by more than {Z:g} SE, {against} {'goes' if against == 1 else 'go'} against it"


# -- points and fronts --------------------------------------------------------------------------------


def _points(models: Mapping, algorithms: Sequence[str], y: str = "reward_mean") -> list[dict]:
    out = []
    for name, m in models.items():
        if m.get("algorithm") in algorithms and "@" not in name and _ok(m.get("kl"), m.get(y)):
            out.append({"name": name, "kl": m["kl"], "y": m[y], "se": m.get(y.replace("_mean", "_se")) or 0.0})
    return out


def _reference_point(models: Mapping) -> list[dict]:
    """π_ref as a point (KL 0) when the results have it."""
    m = models.get("reference")
    if m is None or not _ok(m.get("reward_mean")):
        return []
    return [{"name": "reference", "kl": 0.0, "y": m["reward_mean"], "se": m.get("reward_se") or 0.0}]


def _ok(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _front(points: list[dict], *, maximise: bool = True) -> list[dict]:
    """The Pareto front (min KL, max y; or min y with ``maximise=False``), in KL order."""
    keyed = [(p["kl"], p["y"] if maximise else -p["y"]) for p in points]
    return sorted((points[i] for i in pareto_front(keyed)), key=lambda p: p["kl"])


def _at_kl(line: list[dict], kl: float) -> tuple[float, float] | None:
    """(y, se) linearly interpolated on a KL-ordered line at ``kl``; None outside its KL range."""
    if not line or kl < line[0]["kl"] or kl > line[-1]["kl"]:
        return None
    for a, b in itertools.pairwise(line):
        if a["kl"] <= kl <= b["kl"]:
            t = 0.0 if b["kl"] == a["kl"] else (kl - a["kl"]) / (b["kl"] - a["kl"])
            return a["y"] + t * (b["y"] - a["y"]), (1 - t) * a["se"] + t * b["se"]
    return line[0]["y"], line[0]["se"]  # a single point at exactly this KL


def _matched(line: list[dict], point: dict, what: str, sign: float = 1.0) -> Comparison | None:
    """line − point at the point's KL (× sign), or None where the line does not reach that KL."""
    at = _at_kl(line, point["kl"])
    if at is None:
        return None
    return Comparison(what, sign * (at[0] - point["y"]), math.hypot(at[1], point["se"]))


def _fmt(x: float) -> str:
    return f"{x:.3f}"


# -- the claims -----------------------------------------------------------------------------------------


def dpo_vs_ppo(models: Mapping) -> dict:
    """Claim 1: DPO's reward–KL frontier lies above PPO's (the DPO paper's Figure 2)."""
    dpo, ppo = _points(models, ("dpo",)), _points(models, ("ppo",))
    rl = "PPO" if ppo or not _points(models, ("rloo",)) else "RLOO"
    title = "DPO vs RLHF with PPO on the reward–KL frontier" + ("" if rl == "PPO" else " (RLOO in place of PPO)")
    if rl == "RLOO":
        ppo = _points(models, ("rloo",))
    if not dpo or not ppo:
        return _claim(1, title, [], "Not run: the study needs DPO and PPO jobs.", ran=False, plots=["frontier"])
    front = _front(dpo + _reference_point(models))
    comparisons = [c for p in ppo if (c := _matched(front, p, f"DPO front − {p['name']} at KL {p['kl']:.2f}")) is not None]
    outside = [p["name"] for p in ppo if _at_kl(front, p["kl"]) is None]
    notes = [f"outside DPO's KL range ({front[0]['kl']:.2f}–{front[-1]['kl']:.2f}), not compared: {', '.join(outside)}"] if outside else []
    if front[0]["name"] == "reference":
        notes.append("DPO's front starts at π_ref (KL 0), its β → ∞ end; between two models it is their straight line, "
                     "which a mixture of the two policies reaches at no more KL")
    if rl == "PPO":
        for p in _points(models, ("rloo",)):
            if (c := _matched(front, p, "")) is not None:
                notes.append(f"{p['name']}: DPO front − it = {_fmt(c.difference)} ± {_fmt(c.se)} (not part of the verdict)")
    if not comparisons:
        sentence = f"Not confirmed: no {rl} model lies within the KL range of DPO's front, so the fronts cannot be compared."
        return _claim(1, title, [], sentence, plots=["frontier"], notes=notes)
    best = max(comparisons, key=lambda c: abs(c.z))
    v = verdict(comparisons)
    lead = {"confirmed": f"Confirmed: DPO's front lies above {rl}'s", "not confirmed": f"Not confirmed: DPO's front does not lie above {rl}'s",
            "mixed": f"Mixed: DPO's front lies above {rl}'s at some KL and below at others"}[v]
    sentence = (f"{lead} at matched KL ({_count(comparisons)}; largest: {best.what} = {_fmt(best.difference)} ± {_fmt(best.se)}).")
    return _claim(1, title, comparisons, sentence, plots=["frontier"], notes=notes)


def preference_vs_sft(models: Mapping) -> dict:
    """Claim 2: DPO on the pairs beats SFT on their preferred completions."""
    title = "Preference tuning (DPO) vs SFT on the preferred completions"
    dpo, sft = _points(models, ("dpo",)), _points(models, ("sft",))
    if not dpo or not sft:
        return _claim(2, title, [], "Not run: the study needs DPO and SFT jobs.", ran=False, plots=["frontier"])
    front = _front(dpo + _reference_point(models))  # from π_ref (β → ∞), as in claim 1
    comparisons, notes = [], []
    for p in sft:
        c = _matched(front, p, f"DPO front − {p['name']} at KL {p['kl']:.2f}")
        if c is None:  # KL not matched: the DPO model nearest in KL
            q = min(dpo, key=lambda d: abs(d["kl"] - p["kl"]))
            c = Comparison(f"{q['name']} (KL {q['kl']:.2f}) − {p['name']} (KL {p['kl']:.2f})", q["y"] - p["y"], math.hypot(q["se"], p["se"]))
            notes.append(f"{p['name']}'s KL {p['kl']:.2f} is outside DPO's range: compared with the DPO model nearest in KL")
        comparisons.append(c)
    v = verdict(comparisons)
    c = comparisons[0]
    lead = {"confirmed": "Confirmed: DPO reaches a higher gold reward than SFT on the preferred completions",
            "not confirmed": "Not confirmed: DPO does not reach a higher gold reward than SFT on the preferred completions",
            "mixed": "Mixed: DPO beats SFT in some comparisons and loses in others"}[v]
    return _claim(2, title, comparisons, f"{lead} ({c.what} = {_fmt(c.difference)} ± {_fmt(c.se)}).", plots=["frontier"], notes=notes)


def unlikelihood_degenerates(models: Mapping, tracked: Mapping[str, list[dict]]) -> dict:
    """Claim 3: the unlikelihood baseline's outputs turn repetitive over training, DPO's do not. The
    verdict rests on repetition alone; its gold reward against DPO's and its length are notes.

    ``tracked``: run label -> ``[{"step", "model"}]`` (the names of its evaluated checkpoints in
    ``models``, in step order)."""
    title = "The unlikelihood baseline degenerates"
    ul = [label for label in tracked if models.get(tracked[label][-1]["model"], {}).get("algorithm") == "unlikelihood"]
    dpo = [label for label in tracked if models.get(tracked[label][-1]["model"], {}).get("algorithm") == "dpo"]
    finals = {a: [n for n, m in models.items() if m.get("algorithm") == a and "@" not in n] for a in ("unlikelihood", "dpo")}
    if not finals["unlikelihood"] or not finals["dpo"]:
        return _claim(3, title, [], "Not run: the study needs unlikelihood and DPO jobs.", ran=False, plots=["repetition"])

    def rep(name: str) -> tuple[float, float]:
        m = models[name]
        return m.get("repeated_3gram", 0.0), m.get("repeated_3gram_se") or 0.0

    comparisons = []
    for label in ul:
        first, last = rep(tracked[label][0]["model"]), rep(tracked[label][-1]["model"])
        comparisons.append(Comparison(f"{label}: repeated 3-grams, step {tracked[label][-1]['step']} − step {tracked[label][0]['step']}",
                                      last[0] - first[0], math.hypot(first[1], last[1])))
    u_name = tracked[ul[0]][-1]["model"] if ul else finals["unlikelihood"][0]
    d_name = tracked[dpo[0]][-1]["model"] if dpo else finals["dpo"][0]
    (u, u_se), (d, d_se) = rep(u_name), rep(d_name)
    comparisons.append(Comparison(f"repeated 3-grams: {u_name} − {d_name}", u - d, math.hypot(u_se, d_se)))
    gu, gd = models[u_name], models[d_name]
    v = verdict(comparisons)  # degeneration is repetition (the seed's "when when when"); the rest is context
    lead = {"confirmed": "Confirmed: the unlikelihood baseline's outputs turn repetitive",
            "not confirmed": "Not confirmed: the unlikelihood baseline's outputs do not turn repetitive here",
            "mixed": "Mixed: the unlikelihood baseline's repetition rises by one measure and falls by another"}[v]
    sentence = (f"{lead} (repeated 3-grams {_fmt(u)} ± {_fmt(u_se)} vs DPO's {_fmt(d)} ± {_fmt(d_se)}; distinct-2 "
                f"{_fmt(gu.get('distinct_2', math.nan))} vs {_fmt(gd.get('distinct_2', math.nan))}; gold reward "
                f"{_fmt(gu['reward_mean'])} vs {_fmt(gd['reward_mean'])}).")
    gold = Comparison(f"gold reward: {d_name} − {u_name}", gd["reward_mean"] - gu["reward_mean"],
                      math.hypot(gd.get("reward_se") or 0.0, gu.get("reward_se") or 0.0))
    notes = [f"{gold.what} = {_fmt(gold.difference)} ± {_fmt(gold.se)} (not part of the verdict: a lower reward is not degeneration)"]
    start = models.get(tracked[ul[0]][0]["model"]) if ul else models.get("reference")
    if start is not None and "length_mean" in gu and "length_mean" in start:
        notes.append(f"length {_fmt(start['length_mean'])} → {_fmt(gu['length_mean'])} tokens, EOS rate "
                     f"{_fmt(start.get('eos_rate', math.nan))} → {_fmt(gu.get('eos_rate', math.nan))} ({u_name} against its start)")
    quotes = [{"model": n, **s} for n in (u_name, d_name) for s in (models[n].get("samples") or [])[:2]]
    if not ul:
        notes.append("no unlikelihood checkpoints were tracked (tracked_jobs): final models only")
    return _claim(3, title, comparisons, sentence, plots=["repetition"], notes=notes, quotes=quotes)


def overoptimisation(models: Mapping, best_of_n: Mapping | None, proxy_rl: Sequence[str]) -> dict:
    """Claim 4: optimising an imperfect reward model, the gold reward rises then falls while the
    proxy reward keeps rising — for best-of-n and for RL checkpoints."""
    title = "An imperfect reward model: gold vs proxy reward over KL"
    curves = {}
    if best_of_n:
        curves["best-of-n"] = [(k, g, gs, p, ps) for k, g, gs, p, ps in zip(best_of_n["kl"], best_of_n["gold_mean"], best_of_n["gold_se"],
                                                                             best_of_n["proxy_mean"], best_of_n["proxy_se"])]
    rl = [models[n] for n in proxy_rl if n in models]
    if rl:
        curves["RL on the proxy"] = sorted((m["kl"], m["reward_mean"], m.get("reward_se") or 0.0, m.get("proxy_reward_mean"),
                                            m.get("proxy_reward_se") or 0.0) for m in rl)
    curves = {k: c for k, c in curves.items() if len(c) >= 2 and all(_ok(*row) for row in c)}
    if not curves:
        return _claim(4, title, [], "Not run: the study needs proxy_reward_model (best-of-n) or proxy_rl.", ran=False, plots=["overoptimization"])
    comparisons, parts, shapes = [], [], []
    for name, c in curves.items():
        first, last = c[0], c[-1]
        peak = max(c, key=lambda row: row[1])
        rise_proxy = Comparison(f"{name}: proxy reward, last − first", last[3] - first[3], math.hypot(last[4], first[4]))
        rise_gold = Comparison(f"{name}: gold reward, peak − first", peak[1] - first[1], math.hypot(peak[2], first[2]))
        fall_gold = Comparison(f"{name}: gold reward, peak − last", peak[1] - last[1], math.hypot(peak[2], last[2]))
        comparisons += [rise_proxy, rise_gold, fall_gold]
        shape = rise_proxy.z > Z and rise_gold.z > Z and fall_gold.z > Z
        shapes.append(shape)
        parts.append(f"{name}: proxy {_fmt(first[3])} → {_fmt(last[3])}, gold {_fmt(first[1])} → peak {_fmt(peak[1])} at KL "
                     f"{peak[0]:.2f} → {_fmt(last[1])}")
    v = "confirmed" if all(shapes) else "mixed" if any(shapes) else "not confirmed"
    lead = {"confirmed": "Confirmed: the gold reward rises then falls while the proxy keeps rising",
            "not confirmed": "Not confirmed: the gold reward does not rise and then fall significantly while the proxy rises",
            "mixed": "Mixed: the gold reward rises then falls on one curve and not on the other"}[v]
    out = _claim(4, title, comparisons, f"{lead} ({'; '.join(parts)}).", plots=["overoptimization"],
                 notes=["the peak is the highest of noisy means, which biases 'peak − last' upwards a little"])
    out["verdict"] = v  # rise and fall must both hold on a curve: not the any-way rule of verdict()
    return out


def kto_vs_dpo(models: Mapping) -> dict:
    """Claim 5: KTO on the pairs split into thumbs-up/down rows does as well as DPO on the pairs (same β)."""
    title = "KTO on unpaired labels ≈ DPO on pairs"
    def settings(name: str, algorithm: str) -> str:  # 'kto-beta0.1' -> '-beta0.1', the job's settings
        return name[len(algorithm):]

    finals = {n: m for n, m in models.items() if "@" not in n}
    pairs = [(k, d) for k, mk in finals.items() if mk.get("algorithm") == "kto"
             for d, md in finals.items() if md.get("algorithm") == "dpo" and settings(d, "dpo") == settings(k, "kto")]
    if not pairs:
        return _claim(5, title, [], "Not run: the study needs a KTO job and a DPO job at the same β.", ran=False, plots=["frontier"])
    comparisons, parts = [], []
    for k, d in pairs:
        mk, md = models[k], models[d]
        diff = mk["reward_mean"] - md["reward_mean"]
        se = math.hypot(mk.get("reward_se") or 0.0, md.get("reward_se") or 0.0)
        comparisons.append(Comparison(f"gold reward: {k} − {d}", diff, se))
        parts.append(f"{k} {_fmt(mk['reward_mean'])} at KL {mk['kl']:.2f} vs {d} {_fmt(md['reward_mean'])} at KL {md['kl']:.2f}")
    worse = [c for c in comparisons if c.z < -Z]
    v = "not confirmed" if worse and len(worse) == len(comparisons) else "mixed" if worse else "confirmed"
    lead = {"confirmed": "Confirmed: KTO is not worse than DPO at the same β by more than 2 SE",
            "not confirmed": "Not confirmed: KTO's gold reward is below DPO's at the same β",
            "mixed": "Mixed: KTO matches DPO at some β and falls behind at others"}[v]
    out = _claim(5, title, comparisons, f"{lead} ({'; '.join(parts)}; difference {_fmt(comparisons[0].difference)} ± "
                 f"{_fmt(comparisons[0].se)}).", plots=["frontier"],
                 notes=["'≈' is judged as 'not significantly worse': a difference within 2 SE is also what too few prompts give"])
    out["verdict"] = v  # an equivalence claim: confirmed unless KTO is significantly worse
    return out


def dpo_longer(models: Mapping, max_new_tokens: int) -> dict:
    """Claim 6: DPO produces longer outputs — than π_ref, and than RL at matched KL."""
    title = "DPO's longer outputs: mean length vs KL"
    dpo = _points(models, ("dpo",), "length_mean")
    ref = models.get("reference")
    if not dpo or ref is None:
        return _claim(6, title, [], "Not run: the study needs DPO jobs.", ran=False, plots=["length_vs_kl"])
    rl_line = sorted(_points(models, RL_ALGORITHMS, "length_mean"), key=lambda p: p["kl"])
    comparisons = []
    for p in dpo:
        comparisons.append(Comparison(f"length: {p['name']} − reference", p["y"] - ref["length_mean"],
                                      math.hypot(p["se"], ref.get("length_se") or 0.0)))
        if (c := _matched(rl_line, p, f"length: {p['name']} − RL at KL {p['kl']:.2f}", sign=-1.0)) is not None:
            comparisons.append(c)
    v = verdict(comparisons)
    lengths = ", ".join(f"{p['name']} {p['y']:.1f}" for p in sorted(dpo, key=lambda p: p["kl"]))
    lead = {"confirmed": "Confirmed: DPO's outputs are longer", "not confirmed": "Not confirmed: DPO's outputs are not longer",
            "mixed": "Mixed: DPO's outputs are longer in some comparisons and shorter in others"}[v]
    notes = []
    if ref["length_mean"] >= 0.9 * (max_new_tokens + 1):
        notes.append(f"the reference's mean length {ref['length_mean']:.1f} is near the cap of {max_new_tokens} new tokens "
                     f"(EOS rate {ref.get('eos_rate', math.nan):.2f}): lengths can only show outputs that stop earlier")
    return _claim(6, title, comparisons, f"{lead} ({lengths} tokens vs the reference's {ref['length_mean']:.1f}; {_count(comparisons)}).",
                  plots=["length_vs_kl"], notes=notes)


def judge_claims(results: Mapping, *, tracked: Mapping[str, list[dict]], proxy_rl: Sequence[str], max_new_tokens: int) -> list[dict]:
    """Every claim's verdict, sentence and comparisons, from a study's results."""
    models = results["models"]
    return [dpo_vs_ppo(models), preference_vs_sft(models), unlikelihood_degenerates(models, tracked),
            overoptimisation(models, results.get("best_of_n"), proxy_rl), kto_vs_dpo(models), dpo_longer(models, max_new_tokens)]
