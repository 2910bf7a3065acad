"""The sentiment study's plots, one per claim where a claim has one: the reward–KL frontier, gold reward
per model, repetition over training steps, gold vs proxy reward (over-optimisation), length vs KL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from preftune.eval.plots import (
    bar_plot,
    curves_plot,
    frontier_plot,
    overoptimization_plot,
)

__all__ = ["frontier_points", "study_plots"]


def frontier_points(results: Mapping, y: str = "reward_mean") -> list[dict]:
    """One point per model: KL and ``y`` (with their SEs) for :func:`~preftune.eval.plots.frontier_plot`."""
    se = y.replace("_mean", "_se")
    return [{"algorithm": m.get("algorithm") or name, "label": name, "kl": m.get("kl"), "reward": m.get(y),
             "kl_se": m.get("kl_se"), "reward_se": m.get(se)} for name, m in results["models"].items()]


def study_plots(results: Mapping, tracked: Mapping[str, list[dict]], proxy_rl: Sequence[str]) -> dict[str, bytes]:
    models = results["models"]
    finals = {"models": {n: m for n, m in models.items() if "@" not in n or m.get("algorithm", "").endswith("on proxy")}}
    points = frontier_points(finals)
    curve = results.get("best_of_n") or {}
    for i, n in enumerate(curve.get("n", []) if curve.get("gold_picked_mean") else []):  # best-of-n on the gold reward
        points.append({"algorithm": "best-of-n (gold)", "label": f"n={n}", "kl": curve["kl"][i],
                       "reward": curve["gold_picked_mean"][i], "reward_se": curve["gold_picked_se"][i]})
    plots = {"frontier": frontier_plot(points, title="Gold reward (VADER) vs KL to π_ref")}
    names = list(finals["models"])
    plots["reward"] = bar_plot(names, [models[n].get("reward_mean") for n in names],
                               errors=[models[n].get("reward_se") for n in names], ylabel="mean gold reward")
    if tracked:
        panels = {}
        for key, ylabel in (("repeated_3gram", "repeated 3-grams"), ("distinct_2", "distinct-2"), ("reward_mean", "gold reward")):
            se = {"repeated_3gram": "repeated_3gram_se", "reward_mean": "reward_se"}.get(key)
            panels[ylabel] = {label: [(c["step"], models[c["model"]].get(key), models[c["model"]].get(se) if se else None)
                                      for c in steps] for label, steps in tracked.items()}
        plots["repetition"] = curves_plot(panels, title="Repetition and gold reward over training")
    if results.get("best_of_n"):
        curve = results["best_of_n"]
        rl_points = [{"label": m, "group": models[m].get("algorithm"), "kl": models[m]["kl"], "gold": models[m]["reward_mean"],
                      "proxy": models[m].get("proxy_reward_mean")} for m in proxy_rl]
        plots["overoptimization"] = overoptimization_plot(curve["kl"], curve["gold_mean"], curve["proxy_mean"], ns=curve["n"],
                                                          points=rl_points)
    plots["length_vs_kl"] = frontier_plot(frontier_points(finals, "length_mean"), title="Mean length vs KL to π_ref",
                                          reward_label="mean length (tokens)", front=False)
    return plots
