"""The report as a reader meets it: point labels on the frontier plot never overlap (placed boxes and
the drawn texts), and the page is never wider than the window (headless Chromium)."""

import itertools

from matplotlib.text import Text

from preftune.eval.plots import _frontier_figure, _overlap, curves_plot, place_labels
from preftune.eval.report import render_html
from tests.test_collect_browser import browser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _disjoint(boxes):
    return all(_overlap(a, b) == 0.0 for a, b in itertools.combinations(boxes, 2))


def test_place_labels_keeps_a_tight_cluster_apart_and_inside_the_bounds():
    anchors = [(100.0 + 0.5 * i, 100.0 + 0.3 * i) for i in range(8)] + [(300.0, 250.0)]  # 8 points within 4 px
    sizes = [(42.0, 9.0)] * len(anchors)
    bounds = (0.0, 0.0, 400.0, 300.0)
    legend = (330.0, 200.0, 400.0, 300.0)
    boxes = place_labels(anchors, sizes, bounds=bounds, obstacles=[legend])
    assert _disjoint(boxes)
    for box, (w, h) in zip(boxes, sizes):
        assert abs((box[2] - box[0]) - w) < 1e-9 and abs((box[3] - box[1]) - h) < 1e-9
        assert bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1] and box[3] <= bounds[3]
        assert _overlap(box, legend) == 0.0
        for x, y in anchors:  # no label covers a point
            assert _overlap(box, (x - 4, y - 4, x + 4, y + 4)) == 0.0
    lone = boxes[-1]
    assert abs(lone[0] - 304.0) < 1e-9 or abs(lone[2] - 296.0) < 1e-9  # an uncrowded point keeps its label next to it


def test_frontier_labels_do_not_overlap_at_low_kl():
    # the demo's crowded corner: several models near KL 0 with long labels
    points = [{"algorithm": "reference", "label": "reference", "kl": 0.0, "reward": 0.15}]
    points += [{"algorithm": "dpo", "label": f"dpo-beta{b}", "kl": 0.1 + 0.05 * i, "reward": 0.16 + 0.004 * i,
                "kl_se": 0.05, "reward_se": 0.03} for i, b in enumerate([1.0, 0.5, 0.3, 0.2])]
    points += [{"algorithm": "rloo", "label": f"rloo-kl_coef{k}", "kl": 0.12 + 0.04 * i, "reward": 0.17 - 0.003 * i}
               for i, k in enumerate([0.5, 0.2, 0.1])]
    points += [{"algorithm": "ppo", "label": "ppo-kl_coef0.05", "kl": 6.0, "reward": 0.6}]
    fig, texts = _frontier_figure(points, title="t", reward_label="gold reward")
    fig.canvas.draw()  # annotations take their final positions when drawn
    renderer = fig.canvas.get_renderer()
    boxes = [tuple(Text.get_window_extent(t, renderer).extents) for t in texts]  # the text, without its leader line
    assert len(boxes) == 8 and _disjoint(boxes)
    axes = fig.axes[0].get_window_extent(renderer)
    assert all(axes.x0 - 0.5 <= b[0] and b[2] <= axes.x1 + 0.5 and axes.y0 - 0.5 <= b[1] and b[3] <= axes.y1 + 0.5 for b in boxes)


def test_curves_plot_draws_runs_over_steps():
    png = curves_plot({"repeated 3-grams": {"dpo": [(10, 0.1, 0.01), (20, 0.12, 0.01)], "unlikelihood": [(10, 0.2, 0.02)]},
                       "distinct-2": {"dpo": [(10, 0.8, None), (20, 0.7, None)]}})
    assert png.startswith(PNG_MAGIC)


def _wide_results():
    models = {}
    for i, name in enumerate(["reference", "dpo-beta0.02", "rloo-kl_coef0.005-on-proxy@60", "unlikelihood", "kto-beta0.1"]):
        models[name + "-with-a-long-suffix" * (i % 2)] = {
            "algorithm": "dpo", "n": 120, "reward_mean": 0.1234, "reward_se": 0.0345, "reward_std": 0.4, "kl": 6.78,
            "kl_se": 0.39, "kl_per_token": 0.28, "win_rate": {"rate": 0.61, "ci_low": 0.52, "ci_high": 0.69, "wins": 70,
                                                              "ties": 5, "losses": 45},
            "length_mean": 24.0, "length_se": 0.1, "eos_rate": 0.11, "distinct_1": 0.5, "distinct_2": 0.8,
            "repeated_3gram": 0.01, "repeated_3gram_se": 0.002, "proxy_reward_mean": 1.2, "proxy_reward_se": 0.1,
            "seconds": 123.4, "samples": [{"prompt": "p " * 80, "completion": "x" * 3000, "reward": 0.3}],
        }
    return {"title": "t", "settings": {"prompts": 60, "reward": "vader" * 40}, "models": models,
            "timings_seconds": {"total": 10.0}, "configs": {"a": {"k": "v" * 500}}}


def test_report_page_is_never_wider_than_the_window():
    page_html = render_html(_wide_results(), {})
    pw, chromium = browser()
    try:
        for width in (1280, 800):
            page = chromium.new_page(viewport={"width": width, "height": 800})
            page.set_content(page_html)
            widths = page.evaluate("""() => ({page: document.documentElement.scrollWidth, window: window.innerWidth,
                table: document.querySelector('table.models').getBoundingClientRect().right,
                box: document.querySelector('table.models').parentElement.getBoundingClientRect().right})""")
            assert widths["page"] <= widths["window"], (width, widths)
            assert widths["box"] <= widths["window"], (width, widths)  # the table scrolls inside its own box
            page.close()
    finally:
        chromium.close()
        pw.stop()
