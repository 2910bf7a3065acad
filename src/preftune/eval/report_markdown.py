"""``results.md``: the report's claims and tables as Markdown, for a README or a docs page.

Rendered from the parsed ``results.json`` like the HTML report, with the same number formatting
(:func:`preftune.eval.formatting.format_number`), so what is pasted into documentation is the file's numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from preftune.eval.formatting import format_number, lookup

__all__ = ["MARKDOWN_MODEL_COLUMNS", "render_markdown"]

# The models table's columns in Markdown: fewer than the HTML report's, to stay readable on a page.
MARKDOWN_MODEL_COLUMNS = [
    ("algorithm", "algorithm"),
    ("reward_mean", "gold reward"),
    ("reward_se", "± SE"),
    ("kl", "KL(π‖π_ref)"),
    ("kl_se", "± SE"),
    ("win_rate.rate", "win rate vs ref"),
    ("length_mean", "mean length"),
    ("repeated_3gram", "repeated 3-grams"),
    ("distinct_2", "distinct-2"),
    ("proxy_reward_mean", "proxy reward"),
    ("seconds", "seconds"),
]


def render_markdown(data: Mapping) -> str:
    """Markdown of a parsed ``results.json``: title, claims (verdict sentence, comparisons, notes), its
    ``tables``, the models table and the best-of-n curve."""
    parts = [f"# {data.get('title', 'report')}", "", f"Created {data.get('created', '')}; the numbers of `results.json`.", ""]
    for claim in data.get("claims") or []:
        parts += _claim(claim)
    for title, table in (data.get("tables") or {}).items():
        parts += [f"## {title}", ""]
        parts += _table([str(c) for c in table["columns"]], [[format_number(v) for v in row] for row in table["rows"]])
    models = data.get("models") or {}
    if models:
        columns = [(k, h) for k, h in MARKDOWN_MODEL_COLUMNS if any(lookup(m, k) is not None for m in models.values())]
        parts += ["## Models", ""]
        parts += _table(["model"] + [h for _, h in columns],
                        [[name] + [format_number(lookup(m, k)) for k, _ in columns] for name, m in models.items()])
    curve = data.get("best_of_n") or {}
    keys = [k for k in ("n", "kl", "gold_mean", "gold_se", "proxy_mean", "proxy_se", "gold_picked_mean", "gold_picked_se")
            if isinstance(curve.get(k), list) and len(curve[k]) == len(curve.get("n") or [])]
    if curve.get("n"):
        parts += ["## Best-of-n", ""]
        parts += _table(keys, [[format_number(curve[k][i]) for k in keys] for i in range(len(curve["n"]))])
    timings = data.get("timings_seconds") or {}
    if timings:
        cpu = data.get("cpu_seconds") or {}
        machine = data.get("machine")
        parts += ["## Wall time", "", *([f"Machine: {_machine(machine)}.", ""] if machine else [])]
        parts += _table(["stage", "wall seconds", "CPU seconds"],
                        [[stage, format_number(t), format_number(cpu.get(stage))] for stage, t in timings.items()])
    return "\n".join(parts).rstrip() + "\n"


def _machine(machine) -> str:
    if isinstance(machine, Mapping):
        return ", ".join(f"{k} {v}" for k, v in machine.items())
    return str(machine)


def _verdict_line(claim: Mapping) -> str:
    """The sentence with its verdict in bold ("**Not confirmed:** DPO's ..."), or the verdict before it."""
    verdict, sentence = str(claim.get("verdict", "")).capitalize(), str(claim.get("sentence", ""))
    if verdict and sentence.startswith(verdict + ":"):
        return f"**{verdict}:**{sentence[len(verdict) + 1:]}"
    return f"**{verdict}.** {sentence}"


def _claim(claim: Mapping) -> list[str]:
    out = [f"## Claim {claim.get('claim')}: {claim.get('title', '')}", "", _verdict_line(claim), ""]
    rows = claim.get("comparisons") or []
    if rows:
        out += _table(["comparison (claim's direction > 0)", "difference", "± SE", "z"],
                      [[str(r.get("comparison")), *(format_number(r.get(k)) for k in ("difference", "se", "z"))] for r in rows])
    out += [f"- {note}" for note in claim.get("notes") or []]
    return out + ([""] if claim.get("notes") else [])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows), ""]

