"""Evaluation plots as PNG bytes (matplotlib's Agg backend: no display needed, nothing global changed).

* :func:`frontier_plot` -- gold reward vs KL to the reference, each algorithm's Pareto front drawn as
  a line (the DPO paper's Figure 2: a sweep over β or over checkpoints per algorithm).
* :func:`overoptimization_plot` -- gold and proxy reward vs KL while optimising the proxy (best-of-n,
  and optionally models such as RL checkpoints as points).
* :func:`bar_plot` -- one number per model, with error bars.
* :func:`curves_plot` -- metrics over training steps, one line per run (e.g. repetition of checkpoints).
* :func:`place_labels` -- where point labels go so that no two overlap (used by the plots above).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from preftune.eval.metrics import pareto_front

__all__ = ["bar_plot", "curves_plot", "frontier_plot", "overoptimization_plot", "place_labels"]

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in display pixels


def _figure(width: float = 6.4, height: float = 4.4, panels: int = 1):
    # The object-oriented API with an Agg canvas: no pyplot state, no backend switch for the caller.
    # matplotlib is imported here, when a plot is drawn: it adds a second to every command's start.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # (the same)

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    for i in range(panels):
        fig.add_subplot(1, panels, i + 1)
    return fig, fig.axes[0]


def _png(fig, *, layout: bool = True) -> bytes:
    if layout:  # False when the figure is already laid out (label positions were computed in its pixels)
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps  # when a plot is drawn, as in _figure

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _finite(*values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def frontier_plot(
    points: Sequence[dict], *, title: str = "Reward vs KL frontier", reward_label: str = "gold reward", front: bool = True,
    x_label: str = "KL(π ‖ π_ref) per sequence (nats)", lines: bool = True,
) -> bytes:
    """Gold reward vs KL(π‖π_ref), one colour per algorithm, its Pareto front as a line.

    Args:
        points: ``{"algorithm", "label", "kl", "reward"}`` each, plus optional ``kl_se`` / ``reward_se``
            (drawn as error bars). ``algorithm == "reference"`` is drawn as a black star.
        front: draw each algorithm's Pareto front (max reward, min KL); False = a line through all of
            its points in KL order (for a y that is not a reward, e.g. mean length vs KL).
        x_label, lines: another quantity on the x axis (``kl`` holds it); ``lines=False`` draws the points only.
    """
    fig, _ = _frontier_figure(points, title=title, reward_label=reward_label, front=front, x_label=x_label, lines=lines)
    return _png(fig, layout=False)


def _frontier_figure(points: Sequence[dict], *, title: str, reward_label: str, front: bool = True,
                     x_label: str = "KL(π ‖ π_ref) per sequence (nats)", lines: bool = True):
    """The frontier figure and its point-label texts, laid out (labels placed by :func:`place_labels`)."""
    fig, ax = _figure()
    groups: dict[str, list[dict]] = {}
    for p in points:
        if _finite(p.get("kl"), p.get("reward")):
            groups.setdefault(str(p.get("algorithm") or "model"), []).append(p)
    colors = iter(_colors(len(groups)))
    labelled: list[tuple[dict, object]] = []
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
        if front:
            line = [group[i] for i in pareto_front([(p["kl"], p["reward"]) for p in group])]
        else:
            line = sorted(group, key=lambda p: p["kl"])
        ax.plot([p["kl"] for p in line], [p["reward"] for p in line], "-o" if lines else "o", color=color, label=algorithm,
                markersize=6)
        labelled += [(p, color) for p in group]
    ax.set_xlabel(x_label)
    ax.set_ylabel(reward_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if groups:
        ax.legend(fontsize=8, loc="best")
    texts = _annotate_without_overlap(fig, ax, [(p["kl"], p["reward"]) for p, _ in labelled],
                                      [str(p.get("label", "")) for p, _ in labelled], [c for _, c in labelled])
    return fig, texts


def _annotate_without_overlap(fig, ax, xy: Sequence[tuple[float, float]], labels: Sequence[str], colors: Sequence) -> list:
    """Label each data point, placed by :func:`place_labels` around the points, the legend and each
    other; a label pushed away from its point gets a thin leader line. Lays the figure out first
    (the placement is in final pixels, so nothing may move the axes afterwards)."""
    if not xy:
        fig.tight_layout()
        return []
    fontsize = 7
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    sizes = []
    for label in labels:  # measure each label as it will be drawn
        probe = ax.text(0, 0, label, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width, extent.height))
        probe.remove()
    anchors = [tuple(ax.transData.transform(p)) for p in xy]
    window = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    obstacles = [tuple(legend.get_window_extent(renderer).extents)] if legend is not None else []
    boxes = place_labels(anchors, sizes, bounds=tuple(window.extents), obstacles=obstacles)
    points_per_pixel = 72.0 / fig.dpi
    texts = []
    for (ax_x, ax_y), box, label, color, point in zip(anchors, boxes, labels, colors, xy):
        offset = ((box[0] - ax_x) * points_per_pixel, (box[1] - ax_y) * points_per_pixel)
        far = math.dist((ax_x, ax_y), _nearest_on_box(box, (ax_x, ax_y))) > _NEAR
        texts.append(ax.annotate(label, point, textcoords="offset points", xytext=offset, fontsize=fontsize, color=color,
                                 ha="left", va="bottom", annotation_clip=False,
                                 arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.7} if far else None))
    return texts


_NEAR = 12.0  # px: a label farther than this from its point gets a leader line
_RINGS = (4.0, 10.0, 18.0, 28.0, 40.0, 55.0, 75.0, 100.0, 130.0)  # px between a point and its label's nearest edge
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_MARKER = 4.0  # px: half the side of the square each point occupies


def place_labels(
    anchors: Sequence[tuple[float, float]],
    sizes: Sequence[tuple[float, float]],
    *,
    bounds: Box | None = None,
    obstacles: Sequence[Box] = (),
) -> list[Box]:
    """A box per label, none overlapping another, any point or an obstacle where that can be had.

    Greedy: labels are placed one at a time (the most crowded point first), each at the nearest of
    eight directions × growing distances (``_RINGS``) that is free; when none is, at the candidate
    overlapping least. Coordinates are display pixels with y up.

    Args:
        anchors: the labelled points.
        sizes: ``(width, height)`` of each label.
        bounds: keep the boxes inside this rectangle (e.g. the axes).
        obstacles: rectangles to keep clear of (e.g. the legend).

    Returns:
        ``(x0, y0, x1, y1)`` of each label, in the order of ``anchors``.
    """
    if len(anchors) != len(sizes):
        raise ValueError(f"{len(anchors)} anchors but {len(sizes)} label sizes")
    markers = [(x - _MARKER, y - _MARKER, x + _MARKER, y + _MARKER) for x, y in anchors]

    def crowding(i: int) -> float:
        return -sum(1.0 / (1.0 + math.dist(anchors[i], a)) for j, a in enumerate(anchors) if j != i)

    placed: dict[int, Box] = {}
    for i in sorted(range(len(anchors)), key=crowding):
        taken = [*placed.values(), *obstacles, *(m for j, m in enumerate(markers) if j != i)]
        best, best_cost = None, math.inf
        for candidate in _candidates(anchors[i], sizes[i], bounds):
            cost = sum(_overlap(candidate, other) for other in taken)
            if cost == 0.0:
                best = candidate
                break
            if cost < best_cost:
                best, best_cost = candidate, cost
        placed[i] = best
    return [placed[i] for i in range(len(anchors))]


def _candidates(anchor: tuple[float, float], size: tuple[float, float], bounds: Box | None):
    x, y = anchor
    w, h = size
    for gap in _RINGS:
        for dx, dy in _DIRECTIONS:
            x0 = x + gap if dx > 0 else x - gap - w if dx < 0 else x - w / 2
            y0 = y + gap if dy > 0 else y - gap - h if dy < 0 else y - h / 2
            box = (x0, y0, x0 + w, y0 + h)
            if bounds is None or (box[0] >= bounds[0] and box[1] >= bounds[1] and box[2] <= bounds[2] and box[3] <= bounds[3]):
                yield box
    yield (x + _RINGS[0], y + _RINGS[0], x + _RINGS[0] + w, y + _RINGS[0] + h)  # nowhere fits: the default spot


def _overlap(a: Box, b: Box) -> float:
    """Area of the intersection of two boxes (0 when they only touch)."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _nearest_on_box(box: Box, point: tuple[float, float]) -> tuple[float, float]:
    return (min(max(point[0], box[0]), box[2]), min(max(point[1], box[1]), box[3]))


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


def curves_plot(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float, float | None]]]],
    *,
    xlabel: str = "training step",
    title: str = "",
) -> bytes:
    """Metrics over training steps side by side: ``{panel y-label: {run: [(step, value, se), ...]}}``,
    one line per run (one colour per run across the panels), ± SE as error bars where given."""
    fig, _ = _figure(3.4 * max(len(panels), 1) + 0.6, 3.6, panels=max(len(panels), 1))
    runs = sorted({run for series in panels.values() for run in series})
    color = dict(zip(runs, _colors(len(runs))))
    for ax, (ylabel, series) in zip(fig.axes, panels.items()):
        for run, values in series.items():
            pts = sorted(v for v in values if _finite(v[0], v[1]))
            if not pts:
                continue
            errors = [se if _finite(se) else 0.0 for _, _, se in pts]
            ax.errorbar([s for s, _, _ in pts], [v for _, v, _ in pts], yerr=errors, fmt="-o", color=color[run],
                        capsize=2, markersize=4, label=run)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if fig.axes:
        fig.axes[0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return _png(fig)

