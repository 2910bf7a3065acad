"""``results.json`` + one self-contained ``report.html`` (plots embedded as base64 PNG data URIs).

The HTML is rendered from the JSON text written to ``results.json``, parsed back: every number in
the report is that file's number, formatted by :func:`format_number` (4 decimals for floats).
Everything taken from data (model names, prompts, completions, configs) is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import platform
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import yaml

from preftune.eval.formatting import format_number, lookup
from preftune.eval.report_markdown import render_markdown
from preftune.models.cache import write_text
from preftune.rewards.evaluation import json_ready

__all__ = ["MODEL_COLUMNS", "environment", "write_report"]

# (key in a model's metrics, column header); dotted keys reach into the win_rate dict.
MODEL_COLUMNS = [
    ("algorithm", "algorithm"),
    ("n", "completions"),
    ("reward_mean", "gold reward"),
    ("reward_se", "± SE"),
    ("reward_std", "std"),
    ("kl", "KL(π‖π_ref)"),
    ("kl_se", "± SE"),
    ("kl_per_token", "KL / token"),
    ("win_rate.rate", "win rate vs ref"),
    ("win_rate.ci_low", "95% CI low"),
    ("win_rate.ci_high", "95% CI high"),
    ("win_rate.wins", "wins"),
    ("win_rate.ties", "ties"),
    ("win_rate.losses", "losses"),
    ("length_mean", "mean length (tokens)"),
    ("length_se", "± SE"),
    ("eos_rate", "EOS rate"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("repeated_3gram", "repeated 3-grams"),
    ("repeated_3gram_se", "± SE"),
    ("proxy_reward_mean", "proxy reward"),
    ("proxy_reward_se", "± SE"),
    ("seconds", "seconds"),
]
BEST_OF_N_COLUMNS = [("n", "n"), ("kl", "KL (closed form)"), ("gold_mean", "gold reward"), ("gold_se", "± SE"),
                     ("proxy_mean", "proxy reward"), ("proxy_se", "± SE")]
_TEXT = ' class="text"'
_KNOWN_SECTIONS = ("title", "created", "claims", "settings", "tables", "models", "best_of_n", "configs", "environment")
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
td.text { white-space: pre-wrap; max-width: 40em; overflow-wrap: anywhere; }
.scroll { max-width: 100%; overflow-x: auto; margin: 0.5em 0 1.5em; } .scroll > table { margin: 0; }
figure { display: inline-block; margin: 0 1em 1em 0; } img { max-width: 100%; }
pre { background: #f7f7f7; padding: 0.75em; overflow-x: auto; font-size: 0.85em; }
.caveat { color: #8a4b00; }
.verdict { font-size: 1.05em; padding: 0.4em 0.6em; border-left: 4px solid #888; background: #f7f7f7; }
.verdict.confirmed { border-color: #2a7d2a; } .verdict.not-confirmed { border-color: #b03030; }
.verdict.mixed { border-color: #c08000; }
"""


def environment() -> dict:
    """Versions of what produced the numbers: Python, platform, torch (+ CUDA), transformers, peft, preftune."""

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in ("preftune", "torch", "transformers", "peft", "accelerate", "matplotlib"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    return out


def write_report(
    results: Mapping,
    out_dir,
    *,
    title: str = "preftune evaluation",
    configs: Mapping | None = None,
    plots: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``out_dir/results.json``, ``out_dir/NAME.png`` per plot, ``out_dir/report.html`` and
    ``out_dir/results.md`` (claims and tables in Markdown, for documentation).

    Args:
        results: from :func:`preftune.eval.evaluate` (``settings``, ``models``), optionally with
            ``best_of_n`` (from :func:`~preftune.eval.best_of_n_curve`) and ``tables`` (title ->
            {"columns", "rows"}, shown as tables); other top-level keys are kept in the JSON and
            shown in the report as JSON.
        configs: the exact configs used (name -> dict), stored in results.json and shown verbatim.
        plots: name -> PNG bytes, embedded in the report in this order.

    Returns:
        The path of ``report.html``.
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "created": _dt.datetime.now().isoformat(timespec="seconds"), **dict(results)}
    if configs is not None:
        payload["configs"] = dict(configs)
    payload.setdefault("environment", environment())
    text = json.dumps(json_ready(payload), indent=2, ensure_ascii=False, default=str)
    write_text(out_dir / "results.json", text.encode("utf-8"))
    plots = dict(plots or {})
    for name, png in plots.items():
        write_text(out_dir / f"{name}.png", png)
    parsed = json.loads(text)  # the numbers shown are the numbers written
    write_text(out_dir / "results.md", render_markdown(parsed).encode("utf-8"))
    page = render_html(parsed, plots)
    path = out_dir / "report.html"
    write_text(path, page.encode("utf-8"))
    return path


def render_html(data: Mapping, plots: Mapping[str, bytes]) -> str:
    """The report page of a parsed ``results.json``."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(str(data.get('title', 'report')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(str(data.get('title', 'report')))}</h1>",
        f"<p>Created {e(str(data.get('created', '')))}. All numbers are in <code>results.json</code> next to this file.</p>",
    ]
    plots = dict(plots)
    if data.get("claims"):
        parts += ["<h2>Claims</h2>", _claims_note()]
        shown: set[str] = set()
        for claim in data["claims"]:
            parts += _claim_section(claim, plots, shown)
        plots = {k: v for k, v in plots.items() if k not in shown}
    settings = data.get("settings") or {}
    if settings:
        parts += ["<h2>Settings</h2>", _key_value_table(settings, "settings")]
        if settings.get("kl_exact_sampling") is False:
            parts.append('<p class="caveat">Samples were drawn with temperature ≠ 1 or top_p &lt; 1: the KL column '
                         "is the mean log-ratio on those samples, not KL(π‖π_ref) of the models.</p>")
    for title, table in (data.get("tables") or {}).items():
        parts += [f"<h2>{e(str(title))}</h2>", _plain_table(table)]
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [_figure(name, png) for name, png in plots.items()]
    models = data.get("models") or {}
    if models:
        parts += ["<h2>Models</h2>", _models_table(models), _models_note()]
    if data.get("best_of_n"):
        parts += ["<h2>Best-of-n (over-optimisation)</h2>", _best_of_n_table(data["best_of_n"])]
    if models:
        parts.append("<h2>Sample outputs</h2>")
        for name, metrics in models.items():
            parts += [f"<h3>{e(str(name))}</h3>", _samples_table(name, metrics.get("samples") or [])]
    for key, value in data.items():
        if key not in _KNOWN_SECTIONS:
            parts += [f"<h2>{e(str(key))}</h2>", f"<pre>{e(json.dumps(value, indent=2, ensure_ascii=False))}</pre>"]
    if data.get("configs"):
        parts.append("<h2>Configs</h2>")
        for name, config in data["configs"].items():
            parts += [f"<h3>{e(str(name))}</h3>", f"<pre>{e(_yaml(config))}</pre>"]
    if data.get("environment"):
        parts += ["<h2>Versions</h2>", _key_value_table(data["environment"], "environment")]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _claims_note() -> str:
    return ("<p>Each verdict is computed from the numbers below: a difference in the claim's direction by more "
            "than 2 standard errors supports it, one against it by more than 2 SE contradicts it (see "
            "<code>preftune.experiments.claims</code>).</p>")


def _claim_section(claim: Mapping, plots: Mapping[str, bytes], shown: set) -> list[str]:
    """A claim's section: its one-sentence verdict first, then its plots, comparisons, notes and quotes."""
    e = html.escape
    verdict = str(claim.get("verdict", ""))
    parts = [f'<h3 id="claim-{e(str(claim.get("claim", "")))}">{e(str(claim.get("claim", "")))}. {e(str(claim.get("title", "")))}</h3>',
             f'<p class="verdict {e(verdict.replace(" ", "-"))}">{e(str(claim.get("sentence", "")))}</p>']
    for name in claim.get("plots") or []:
        if name in shown:  # each plot once: later claims point back to it
            parts.append(f'<p>Plot: <a href="#plot-{e(name)}">{e(name)}</a> (above).</p>')
        elif name in plots:
            parts.append(_figure(name, plots[name]))
            shown.add(name)
    rows = claim.get("comparisons") or []
    if rows:
        head = '<tr><th class="text">comparison (claim\'s direction &gt; 0)</th><th>difference</th><th>± SE</th><th>z</th></tr>'
        body = "".join(f'<tr><td class="text">{e(str(r.get("comparison")))}</td><td>{e(format_number(r.get("difference")))}</td>'
                       f'<td>{e(format_number(r.get("se")))}</td><td>{e(format_number(r.get("z")))}</td></tr>' for r in rows)
        parts.append(_scroll('<table class="comparisons">' + head + body + "</table>"))
    parts += [f'<p class="caveat">{e(str(note))}</p>' for note in claim.get("notes") or []]
    quotes = claim.get("quotes") or []
    if quotes:
        head = '<tr><th class="text">model</th><th class="text">prompt</th><th class="text">completion</th><th>gold reward</th></tr>'
        body = "".join(f'<tr><td class="text">{e(str(q.get("model")))}</td><td class="text">{e(_as_text(q.get("prompt")))}</td>'
                       f'<td class="text">{e(_as_text(q.get("completion")))}</td><td>{e(format_number(q.get("reward")))}</td></tr>'
                       for q in quotes)
        parts.append(_scroll('<table class="quotes">' + head + body + "</table>"))
    return parts


def _figure(name: str, png: bytes) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    name = html.escape(name)
    return f'<figure id="plot-{name}"><img src="{uri}" alt="{name}"><figcaption>{name}</figcaption></figure>'


def _models_table(models: Mapping) -> str:
    e = html.escape
    columns = [(k, h) for k, h in MODEL_COLUMNS if any(lookup(m, k) is not None for m in models.values())]
    head = '<tr><th class="text">model</th>' + "".join(f"<th>{e(h)}</th>" for _, h in columns) + "</tr>"
    rows = []
    for name, metrics in models.items():
        cells = "".join(
            f'<td data-key="{e(k)}"{_TEXT if k == "algorithm" else ""}>{e(format_number(lookup(metrics, k)))}</td>'
            for k, _ in columns
        )
        rows.append(f'<tr data-model="{e(str(name))}"><td class="text">{e(str(name))}</td>{cells}</tr>')
    return _scroll('<table class="models">' + head + "".join(rows) + "</table>")


def _models_note() -> str:
    return (
        "<p>KL: mean over the model's own samples of Σ<sub>t</sub> log π/π<sub>ref</sub> (nats per completion), "
        "± its standard error. Win rate: gold reward of each completion against the reference's completion for "
        "the same prompt and sample index, ties count half; 95% Wilson interval. Length counts the EOS token. "
        "Distinct-n and repeated 3-grams over whitespace tokens.</p>"
    )


def _best_of_n_table(curve: Mapping) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for _, h in BEST_OF_N_COLUMNS) + "</tr>"
    rows = []
    for i in range(len(curve.get("n", []))):
        cells = "".join(f'<td data-key="{e(k)}">{e(format_number(curve[k][i]))}</td>' for k, _ in BEST_OF_N_COLUMNS)
        rows.append(f"<tr>{cells}</tr>")
    note = (f"<p>{e(format_number(curve.get('samples_per_prompt')))} samples per prompt from the reference over "
            f"{e(format_number(curve.get('prompts')))} prompts, picked by the proxy reward "
            f"({e(str(curve.get('proxy_reward')))}); KL = log n − (n − 1)/n.</p>")
    return _scroll('<table class="best-of-n">' + head + "".join(rows) + "</table>") + note


def _samples_table(name, samples) -> str:
    e = html.escape
    rows = ['<tr><th class="text">prompt</th><th class="text">completion</th><th>gold reward</th></tr>']
    for s in samples:
        rows.append(
            f'<tr><td class="text">{e(_as_text(s.get("prompt")))}</td><td class="text">{e(_as_text(s.get("completion")))}</td>'
            f"<td>{e(format_number(s.get('reward')))}</td></tr>"
        )
    return _scroll(f'<table class="samples" data-model="{e(str(name))}">' + "".join(rows) + "</table>")


def _key_value_table(values: Mapping, cls: str) -> str:
    e = html.escape
    rows = [
        f'<tr><th class="text">{e(str(k))}</th><td class="text" data-key="{e(str(k))}">'
        f"{e(format_number(v) if not isinstance(v, (dict, list)) else json.dumps(v, ensure_ascii=False))}</td></tr>"
        for k, v in values.items()
    ]
    return _scroll(f'<table class="{cls}">' + "".join(rows) + "</table>")


def _plain_table(table: Mapping) -> str:
    """A ``tables`` entry of results.json ({"columns": [...], "rows": [[...], ...]}) as HTML."""
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in table["columns"])
    rows = "".join("<tr>" + "".join(f'<td data-key="{e(str(c))}">{e(format_number(v))}</td>' for c, v in zip(table["columns"], row))
                   + "</tr>" for row in table["rows"])
    return _scroll(f"<table><tr>{head}</tr>{rows}</table>")


def _scroll(table: str) -> str:
    """A table in its own box: a table wider than the page scrolls inside it, the page never does."""
    return f'<div class="scroll">{table}</div>'


def _as_text(value) -> str:
    """A prompt or completion for display: text, or a conversation as 'role: content' lines."""
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    if isinstance(value, list):  # token ids
        return json.dumps(value)
    return "" if value is None else str(value)


def _yaml(value) -> str:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True)
