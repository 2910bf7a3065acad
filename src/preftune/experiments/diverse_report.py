"""What the diverse-preferences study reports: the neural mixture's components, the minority's loss
under pooling, the plots and the text summary (``preftune.experiments.diverse`` runs the study)."""

from __future__ import annotations

import json
from pathlib import Path

from preftune.eval.plots import bar_plot, frontier_plot

__all__ = ["GOLD", "group_gains", "minority_summary", "neural_em", "plots", "policy_name", "reward_tables", "summary"]

GOLD = "gold"  # the folder and name prefix of the policies trained on the gold rewards, shared by all arms


def policy_name(arm: str, method: str) -> str:
    """A trained policy's name: ARM/METHOD, or gold/METHOD for the RL ones (on the groups' gold
    rewards, which do not depend on the mix) shared by all arms."""
    return f"{GOLD if method.startswith('rloo_') else arm}/{method}"


def neural_em(report: dict) -> dict:
    """The neural mixture's components: their annotators, prior and held-out accuracy per group; which
    component serves each group; how many annotators landed with their own group (up to labels)."""
    return {"assignment_accuracy": report["em"].get("assignment_accuracy"),
            "components": {k: {"annotators": c["annotators"], "prior": c["prior"],
                               "accuracy": {g: v["accuracy"] for g, v in c["groups"].items()}}
                           for k, c in report["components"].items()},
            "serves": {g: v["component"] for g, v in report["groups"].items()},
            "annotators": {a: {"component": v["component"], "responsibilities": v["responsibilities"]}
                           for a, v in report["em"]["annotators"].items()}}


def minority_summary(arm: dict) -> dict:
    """The minority's loss under pooling, and what the group-aware methods recover."""
    minority = min(arm["pairs"], key=arm["pairs"].get)
    out = {"minority": minority}
    for method, accuracy in arm["reward_models"].items():
        out[f"minority_rm_accuracy_{method}"] = accuracy.get(minority)
    for method, per_group in arm["policies"].items():
        g = per_group[minority]
        out[f"minority_gold_gain_{method}"] = g["gold_reward"] - g["reference_gold_reward"]
    return out


def reward_tables(groups: list[str], arms: dict, held_out: dict) -> dict:
    """The reward models' held-out accuracy per arm, method and group, as a report table (results.json
    ``tables``), with each group's training pairs."""
    columns = ["arm", "reward model", *(f"accuracy {g} ({held_out[g]} pairs)" for g in groups),
               *(f"training pairs {g}" for g in groups)]
    rows = [[arm, method, *(acc[g] for g in groups), *(data["pairs"][g] for g in groups)]
            for arm, data in arms.items() for method, acc in data["reward_models"].items()]
    return {"Reward models: accuracy on each group's held-out pairs": {"columns": columns, "rows": rows}} if rows else {}


def group_gains(groups: list[str], results: dict) -> list[dict]:
    """Per arm and policy: each of the first two groups' gold-reward gain over π_ref (the π_ref each
    was evaluated against: a conditioned policy's is π_ref asked for the same group), with SEs."""
    a, b = groups[:2]
    points = []
    for arm, data in results["arms"].items():
        for method, per_group in data["policies"].items():
            name = policy_name(arm, method)
            se = {g: results["models"][f"{name} @{g}"]["reward_se"] for g in (a, b)}
            gain = {g: per_group[g]["gold_reward"] - per_group[g]["reference_gold_reward"] for g in (a, b)}
            points.append({"arm": name.split("/")[0], "method": method, "gain": gain, "se": se})
    return [p for i, p in enumerate(points) if p not in points[:i]]  # the shared RL policies once


def _tradeoff_plot(groups: list[str], results: dict) -> bytes:
    a, b = groups[:2]
    points = [{"algorithm": p["method"], "label": p["arm"], "kl": p["gain"][a], "reward": p["gain"][b],
               "kl_se": p["se"][a], "reward_se": p["se"][b]} for p in group_gains(groups, results)]
    points.append({"algorithm": "reference", "label": "π_ref", "kl": 0.0, "reward": 0.0})
    return frontier_plot(points, title=f"What each group gets: gold-reward gain over π_ref ({a} vs {b})",
                         x_label=f"group {a}'s gold reward − π_ref's", reward_label=f"group {b}'s gold reward − π_ref's",
                         front=False, lines=False)


def plots(groups: list[str], results: dict) -> dict[str, bytes]:
    """What each policy gains for each group (the main plot); per group its gold reward vs KL of every
    policy; both mixtures' responsibilities; the reward models' accuracy per group."""
    out = {"group_tradeoff": _tradeoff_plot(groups, results)} if results["arms"] and results["models"] else {}
    for g in groups if results["models"] else []:  # none in a run of the reward models alone
        points = [{"algorithm": label.split("/")[1].split(" @")[0], "label": label.split("/")[0], "kl": m["kl"],
                   "reward": m["reward_mean"], "kl_se": m.get("kl_se"), "reward_se": m.get("reward_se")}
                  for label, m in results["models"].items() if label.endswith(f"@{g}")]
        refs = [m["reference_reward_mean"] for label, m in results["models"].items() if label.endswith(f"@{g}")]
        if refs:
            points.append({"algorithm": "reference", "label": "π_ref", "kl": 0.0, "reward": refs[0]})
        out[f"group_{g}_reward_vs_kl"] = frontier_plot(points, title=f"Group {g}: its gold reward vs KL to π_ref",
                                                       reward_label=f"gold reward of group {g}")
    names, values = [], []
    for arm, data in results["arms"].items():
        for a, info in data["em"]["annotators"].items():
            names.append(f"{arm} {a}")
            values.append(info["responsibilities"][0])
    out["em_components"] = bar_plot(names, values, ylabel="P(component 0 | labels)", title="EM: annotators' responsibilities")
    neural = [(f"{arm} {a} ({info['component']})", info["responsibilities"][0]) for arm, data in results["arms"].items()
              for a, info in data.get("neural_em", {}).get("annotators", {}).items()]
    if neural:
        out["neural_em_components"] = bar_plot([n for n, _ in neural], [v for _, v in neural], ylabel="P(component 0 | labels)",
                                               title="Neural reward mixture: annotators' responsibilities (component)")
    rm_names, rm_values = [], []
    for arm, data in results["arms"].items():
        for method, acc in data["reward_models"].items():
            for g, v in acc.items():
                rm_names.append(f"{arm} {method} @{g}")
                rm_values.append(v)
    if rm_names:
        out["reward_model_accuracy"] = bar_plot(rm_names, rm_values, ylabel="held-out accuracy", hline=0.5,
                                                title="Reward-model accuracy per group")
    return out


def summary(report: Path) -> str:
    """The study's table in text: per arm and method, each group's reward-model accuracy, gold reward and KL."""
    data = json.loads((report.parent / "results.json").read_text())
    groups = data["settings"]["groups"]
    lines = [f"{'arm / method':28s} " + " ".join(f"{'RM acc ' + g:>10s} {'gold ' + g:>9s} {'KL ' + g:>7s}" for g in groups)]
    for arm, a in data["arms"].items():
        for method, acc in a["reward_models"].items():
            lines.append(f"{arm + ' reward-' + method:28s} " + " ".join(f"{acc.get(g, float('nan')):10.3f} {'':>9s} {'':>7s}" for g in groups))
        for k, c in a.get("neural_em", {}).get("components", {}).items():
            accuracy = ", ".join(f"{g} {v:.3f}" for g, v in c["accuracy"].items())
            lines.append(f"{arm + ' mixture component ' + k:28s} annotators {', '.join(c['annotators'])}; accuracy {accuracy}")
        for method, per_group in a["policies"].items():
            lines.append(f"{arm + ' ' + method:28s} " + " ".join(
                f"{'':>10s} {per_group[g]['gold_reward']:9.3f} {per_group[g]['kl']:7.2f}" for g in groups))
    return "\n".join(lines)
