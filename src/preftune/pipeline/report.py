"""The pipeline's page: OUTPUT_DIR/report.html (+ results.json, rounds.png, frontier.png).

Per round (its last evaluate stage): gold reward, KL to the start model, win rate against the
previous round and against the start model, length, each with its standard error or 95% interval;
the data each round's train stages used; links to every round's own ``preftune eval`` report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from preftune.config import to_dict
from preftune.eval.plots import frontier_plot
from preftune.eval.formatting import format_number
from preftune.eval.report import environment
from preftune.models.cache import write_text
from preftune.pipeline import state
from preftune.pipeline.spec import Pipeline

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
img { max-width: 100%; } pre { background: #f7f7f7; padding: 0.75em; overflow-x: auto; font-size: 0.85em; }
"""
COLUMNS = [("reward_mean", "gold reward"), ("reward_se", "± SE"), ("kl", "KL to start"), ("kl_se", "± SE"),
           ("win_rate_vs_previous.rate", "win rate vs previous"), ("win_rate_vs_previous.ci_low", "95% CI low"),
           ("win_rate_vs_previous.ci_high", "95% CI high"), ("win_rate_vs_start.rate", "win rate vs start"),
           ("win_rate_vs_start.ci_low", "95% CI low"), ("win_rate_vs_start.ci_high", "95% CI high"),
           ("length_mean", "length (tokens)")]


def _get(row: dict, key: str):
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def collect(ctx, pipeline: Pipeline) -> dict:
    """Per round: every finished stage's summary, and the last evaluate stage's metrics."""
    rounds: dict[int, dict] = {}
    for stage in pipeline.stages:
        summary = state.summary(ctx.folder(stage.id))
        entry = rounds.setdefault(stage.round, {"round": stage.round, "stages": {}, "evaluate": None})
        entry["stages"][stage.name] = {"kind": stage.kind, **summary}
        if stage.kind == "evaluate" and summary:
            entry["evaluate"] = {**summary, "stage": stage.name, "report": f"{stage.id}/report.html"}
    return {"rounds": [rounds[r] for r in sorted(rounds)], "seconds": sum(
        s.get("seconds") or 0 for r in rounds.values() for s in r["stages"].values())}


def rounds_plot(rows: list[dict]) -> bytes:
    """Four panels across rounds (round 0 = the start model): gold reward, KL, win rates, length."""

    fig = Figure(figsize=(10, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    xs = [r["round"] for r in rows]
    start = rows[0]["evaluate"] if rows else {}
    panels = [(axes[0][0], "gold reward", "reward_mean", "reward_se", start.get("start_reward_mean")),
              (axes[0][1], "KL to the start model (nats)", "kl", "kl_se", 0.0),
              (axes[1][1], "length (tokens)", "length_mean", None, start.get("start_length_mean"))]
    for ax, label, key, se, at_zero in panels:
        ys = [r["evaluate"].get(key) for r in rows]
        errs = [r["evaluate"].get(se) if se else 0.0 for r in rows]
        ax.errorbar([0] + xs, [at_zero] + ys, yerr=[0.0] + [e if _finite(e) else 0.0 for e in errs], fmt="-o", capsize=3)
        ax.set_ylabel(label)
    ax = axes[1][0]
    for key, label in (("win_rate_vs_previous", "vs previous round"), ("win_rate_vs_start", "vs start")):
        rates = [_get(r["evaluate"], f"{key}.rate") for r in rows]
        low = [_get(r["evaluate"], f"{key}.ci_low") for r in rows]
        high = [_get(r["evaluate"], f"{key}.ci_high") for r in rows]
        yerr = [[max(v - lo, 0) for v, lo in zip(rates, low)], [max(hi - v, 0) for v, hi in zip(rates, high)]]
        ax.errorbar(xs, rates, yerr=yerr, fmt="-o", capsize=3, label=label)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel("win rate (95% CI)")
    ax.legend(fontsize=8)
    for row in axes:
        for a in row:
            a.set_xlabel("round")
            a.grid(True, alpha=0.3)
            a.set_xticks([0] + xs)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _frontier(rows: list[dict]) -> bytes:
    points = [{"algorithm": "reference", "label": "start", "kl": 0.0, "reward": rows[0]["evaluate"].get("start_reward_mean")}]
    points += [{"algorithm": "rounds", "label": f"round {r['round']}", "kl": r["evaluate"]["kl"], "reward": r["evaluate"]["reward_mean"],
                "kl_se": r["evaluate"].get("kl_se"), "reward_se": r["evaluate"].get("reward_se")} for r in rows]
    return frontier_plot(points, title="Gold reward vs KL to the start model, by round")


def write_pipeline_report(ctx, pipeline: Pipeline) -> Path:
    data = collect(ctx, pipeline)
    data["settings"] = {k: v for k, v in to_dict(ctx.cfg).items()}
    data["environment"] = environment()
    out = ctx.out
    write_text(out / "results.json", json.dumps(data, indent=2, ensure_ascii=False, default=str).encode("utf-8"))
    evaluated = [r for r in data["rounds"] if r["evaluate"]]
    plots = {}
    if evaluated:
        plots = {"rounds": rounds_plot(evaluated), "frontier": _frontier(evaluated)}
        for name, png in plots.items():
            write_text(out / f"{name}.png", png)
    page = render(data, plots, pipeline.source)
    write_text(out / "report.html", page.encode("utf-8"))
    return out / "report.html"


def render(data: dict, plots: dict[str, bytes], source: str) -> str:
    """The page (plots embedded as data URIs: one self-contained file, like the eval report)."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>preftune pipeline</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>Pipeline {e(source)}</h1>",
             f"<p>{sum(r['round'] > 0 for r in data['rounds'])} rounds (round 0 = the SFT stage, if any); time in stages "
             f"{format_number(data['seconds'])} s. "
             "Every number is in <code>results.json</code> next to this page.</p>", "<h2>Rounds</h2>", _rounds_table(data)]
    parts += [f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{e(n)}">'
              f"<figcaption>{e(n)}</figcaption></figure>" for n, png in plots.items()]
    parts += ["<p>Each round's policy is evaluated on the held-out prompts against the start model (KL, win rate vs "
              "start); the win rate vs the previous round pairs each completion with the previous round's completion for "
              "the same prompt and sample index (round 1: the start model). Ties count half; 95% Wilson intervals.</p>",
              "<h2>Data each round used</h2>", _data_table(data)]
    parts += ["<h2>Settings</h2>", f"<pre>{e(json.dumps(data['settings'], indent=2, ensure_ascii=False, default=str))}</pre>",
              "<h2>Versions</h2>", f"<pre>{e(json.dumps(data['environment'], indent=2))}</pre>", "</body></html>"]
    return "\n".join(parts) + "\n"


def _rounds_table(data: dict) -> str:
    e = html.escape
    head = '<tr><th class="text">round</th>' + "".join(f"<th>{e(h)}</th>" for _, h in COLUMNS) + '<th class="text">report</th></tr>'
    rows = []
    for r in data["rounds"]:
        ev = r["evaluate"]
        if not ev:
            continue
        cells = "".join(f'<td data-key="{e(k)}">{e(format_number(_get(ev, k)))}</td>' for k, _ in COLUMNS)
        link = f'<a href="{e(ev["report"])}">{e(ev["report"])}</a>'
        rows.append(f'<tr data-round="{r["round"]}"><td class="text">{r["round"]}</td>{cells}<td class="text">{link}</td></tr>')
    evaluated = [r["evaluate"] for r in data["rounds"] if r["evaluate"]]
    if evaluated:
        ev = evaluated[0]
        rows.insert(0, f'<tr data-round="start"><td class="text">start</td><td>{e(format_number(ev.get("start_reward_mean")))}</td>'
                       f'<td>{e(format_number(ev.get("start_reward_se")))}</td><td>0</td>' + "<td></td>" * 7
                       + f'<td>{e(format_number(ev.get("start_length_mean")))}</td><td></td></tr>')
    return '<table class="rounds">' + head + "".join(rows) + "</table>"


def _data_table(data: dict) -> str:
    e = html.escape
    rows = ['<tr><th class="text">round</th><th class="text">stage</th><th class="text">kind</th><th class="text">what it used / made</th><th>seconds</th></tr>']
    for r in data["rounds"]:
        for name, s in r["stages"].items():
            shown = {k: v for k, v in s.items() if k not in ("kind", "seconds", "win_rate_vs_start", "win_rate_vs_previous")}
            rows.append(f'<tr><td class="text">{r["round"]}</td><td class="text">{e(name)}</td><td class="text">{e(s["kind"])}</td>'
                        f'<td class="text">{e(json.dumps(shown, ensure_ascii=False, default=str))}</td>'
                        f'<td>{e(format_number(s.get("seconds")))}</td></tr>')
    return '<table class="data">' + "".join(rows) + "</table>"
