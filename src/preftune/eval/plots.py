"""Evaluation plots as PNG bytes (matplotlib's Agg backend: no display needed, nothing global changed).

* :func:`frontier_plot` -- gold reward vs KL to the reference, each algorithm's Pareto front drawn as
  a line (the DPO paper's Figure 2: a sweep over β or over checkpoints per algorithm).
* :func:`overoptimization_plot` -- gold and proxy reward vs KL while optimising the proxy (best-of-n,
  and optionally models such as RL checkpoints as points).
* :func:`bar_plot` -- one number per model, with error bars.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from preftune.eval.metrics import pareto_front

__all__ = ["bar_plot", "frontier_plot", "overoptimization_plot"]


def _figure(width: float = 6.4, height: float = 4.4):
    # The object-oriented API with an Agg canvas: no pyplot state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _finite(*values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def frontier_plot(points: Sequence[dict], *, title: str = "Reward vs KL frontier", reward_label: str = "gold reward") -> bytes:
    """Gold reward vs KL(π‖π_ref), one colour per algorithm, its Pareto front as a line.

    Args:
        points: ``{"algorithm", "label", "kl", "reward"}`` each, plus optional ``kl_se`` / ``reward_se``
            (drawn as error bars). ``algorithm == "reference"`` is drawn as a black star.
    """
    fig, ax = _figure()
    groups: dict[str, list[dict]] = {}
    for p in points:
        if _finite(p.get("kl"), p.get("reward")):
            groups.setdefault(str(p.get("algorithm") or "model"), []).append(p)
    colors = iter(_colors(len(groups)))
    for algorithm, group in groups.items():
        if algorithm == "reference":
            for p in group:
                ax.scatter([p["kl"]], [p["reward"]], marker="*", s=180, color="black", zorder=5, label="reference")
            continue
        color = next(colors)
        xerr = [p.get("kl_se") if _finite(p.get("kl_se")) else 0.0 for p in group]
        yerr = [p.get("reward_se") if _finite(p.get("reward_se")) else 0.0 for p in group]
        ax.errorbar([p["kl"] for p in group], [p["reward"] for p in group], xerr=xerr, yerr=yerr, fmt="o",
                    color=color, alpha=0.55, capsize=2, markersize=5)
        front = [group[i] for i in pareto_front([(p["kl"], p["reward"]) for p in group])]
        ax.plot([p["kl"] for p in front], [p["reward"] for p in front], "-o", color=color, label=algorithm, markersize=6)
        for p in group:
            ax.annotate(str(p.get("label", "")), (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
    ax.set_xlabel("KL(π ‖ π_ref) per sequence (nats)")
    ax.set_ylabel(reward_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if groups:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def overoptimization_plot(
    kl: Sequence[float],
    gold: Sequence[float],
    proxy: Sequence[float],
    *,
    ns: Sequence[int] | None = None,
    points: Sequence[dict] | None = None,
    title: str = "Over-optimisation: best-of-n on the proxy reward",
) -> bytes:
    """Gold and proxy reward vs KL (lines; best-of-n at its closed-form KL, ``ns`` annotated), with
    optional ``points``: ``{"label", "kl", "gold", "proxy"}`` as labelled markers, or, with a
    ``"group"`` key, one gold and one proxy curve per group (e.g. an RL run's checkpoints). A
    proxy curve that keeps rising while the gold one flattens or falls is Goodhart's law at work
    (Gao et al. 2022). Gold and proxy share one axis: compare their shapes, not their levels, when the
    two rewards have different scales."""
    fig, ax = _figure()
    ax.plot(kl, gold, "-o", color="tab:green", label="gold reward (best-of-n)")
    ax.plot(kl, proxy, "--s", color="tab:orange", label="proxy reward (best-of-n)")
    for i, n in enumerate(ns or []):
        ax.annotate(f"n={n}", (kl[i], gold[i]), textcoords="offset points", xytext=(3, -10), fontsize=7)
    groups: dict[str, list[dict]] = {}
    for p in points or []:
        if p.get("group"):
            groups.setdefault(str(p["group"]), []).append(p)
            continue
        if _finite(p.get("kl"), p.get("gold")):
            ax.scatter([p["kl"]], [p["gold"]], marker="o", color="tab:green", edgecolor="black", zorder=5)
            ax.annotate(str(p.get("label", "")), (p["kl"], p["gold"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if _finite(p.get("kl"), p.get("proxy")):
            ax.scatter([p["kl"]], [p["proxy"]], marker="x", color="tab:orange", zorder=5)
    for group, members in groups.items():  # e.g. the checkpoints of one RL run: a curve ordered by KL
        for key, style, color in (("gold", "-^", "tab:green"), ("proxy", "--v", "tab:orange")):
            pts = sorted((m["kl"], m[key]) for m in members if _finite(m.get("kl"), m.get(key)))
            if pts:
                ax.plot([k for k, _ in pts], [v for _, v in pts], style, color=color, alpha=0.6,
                        label=f"{key} reward ({group})")
    ax.set_xlabel("KL(π ‖ π_ref) (nats)")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def bar_plot(
    names: Sequence[str],
    values: Sequence[float],
    *,
    errors: Sequence[float] | Sequence[tuple[float, float]] | None = None,
    ylabel: str = "",
    title: str = "",
    hline: float | None = None,
) -> bytes:
    """One bar per model. ``errors``: symmetric half-widths, or ``(low, high)`` interval ends (e.g. a
    win rate's confidence interval); ``hline`` draws a dashed reference line (e.g. 0.5 for win rates)."""
    fig, ax = _figure(max(4.0, 1.0 + 0.9 * len(names)), 3.8)
    xs = list(range(len(names)))
    heights = [v if _finite(v) else 0.0 for v in values]
    yerr = None
    if errors is not None:
        if errors and isinstance(errors[0], (tuple, list)):
            yerr = [[max(h - lo, 0.0) for h, (lo, _) in zip(heights, errors)],
                    [max(hi - h, 0.0) for h, (_, hi) in zip(heights, errors)]]
        else:
            yerr = [e if _finite(e) else 0.0 for e in errors]
    ax.bar(xs, heights, yerr=yerr, capsize=4, color=_colors(len(names)))
    ax.set_xticks(xs)
    ax.set_xticklabels([str(n) for n in names], rotation=20, ha="right", fontsize=8)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)
