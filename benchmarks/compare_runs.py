"""Do two (or more) RL runs learn the same? Their per-step metrics (reward, KL, the sampler mismatch)
averaged over windows of steps, ± the SE of that mean, the differences to the first run, and a plot
of the window means.

Consecutive steps of one run are correlated (the same policy, slowly moving), so the SE is not the
steps' SD / √n: it is inflated by the AR(1) factor √((1 + ρ) / (1 − ρ)), with ρ the lag-1
autocorrelation of the window's steps (taken as 0 when negative, capped at 0.9); ``se_iid`` is the
uncorrected one.

    python benchmarks/compare_runs.py runs/rloo-smollm2-vader runs/rloo-smollm2-vader-fp16 \\
        runs/rloo-smollm2-vader-seed1 --windows 1-10,11-20,21-40,41-60 --out benchmarks/results/fp16_vs_exact

The first run is the baseline; a second exact run with another seed (``train.seed=1``) gives the
seed-to-seed noise that a difference should be compared with. Writes OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from preftune.eval.plots import curves_plot
from preftune.train.metrics import read_metrics

METRICS = ("reward/score", "kl", "tis/kl", "tis/weight", "response_length", "sampler/sync_s", "samples_per_s")


def windows(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        lo, hi = part.split("-")
        out.append((int(lo), int(hi)))
    return out


def lag1_autocorrelation(values: list[float]) -> float:
    """The lag-1 autocorrelation of a series (0 for fewer than 3 values or a constant one)."""
    if len(values) < 3:
        return 0.0
    mean = statistics.fmean(values)
    dev = [v - mean for v in values]
    var = math.fsum(d * d for d in dev)
    return math.fsum(a * b for a, b in zip(dev, dev[1:])) / var if var > 0 else 0.0


def window_stats(rows: list[dict], metric: str, lo: int, hi: int) -> dict | None:
    values = [r[metric] for r in rows if lo <= r.get("step", 0) <= hi and isinstance(r.get(metric), (int, float))]
    if not values:
        return None
    se_iid = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    rho = min(max(lag1_autocorrelation(values), 0.0), 0.9)
    return {"mean": statistics.fmean(values), "se": se_iid * math.sqrt((1 + rho) / (1 - rho)), "se_iid": se_iid,
            "rho": rho, "steps": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (OUTPUT_DIR with metrics.jsonl); the first is the baseline")
    ap.add_argument("--windows", default="1-10,11-20,21-40,41-60")
    ap.add_argument("--out", default="benchmarks/results/compare_runs")
    args = ap.parse_args()
    spans = windows(args.windows)
    runs = {Path(r).name: [row for row in read_metrics(Path(r) / "metrics.jsonl") if "loss" in row] for r in args.runs}
    table = {name: {m: {f"{lo}-{hi}": window_stats(rows, m, lo, hi) for lo, hi in spans} for m in METRICS} for name, rows in runs.items()}
    base = next(iter(table))
    diffs = {}
    for name in list(table)[1:]:
        for m in ("reward/score", "kl"):
            for span, a in table[base][m].items():
                b = table[name][m][span]
                if a and b:
                    diffs.setdefault(name, {}).setdefault(m, {})[span] = {"difference": b["mean"] - a["mean"], "se": math.hypot(a["se"], b["se"])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"runs": args.runs, "windows": table, "differences_to_first": diffs}, indent=1))
    panels = {label: {name: [((lo + hi) / 2, s["mean"], s["se"]) for (lo, hi) in spans if (s := table[name][m][f"{lo}-{hi}"])]
                      for name in table} for m, label in (("reward/score", "reward (window mean)"), ("kl", "KL per sequence"))}
    out.with_suffix(".png").write_bytes(curves_plot(panels, title="Window means ± SE over steps"))
    width = max(len(n) for n in table)
    for m in ("reward/score", "kl", "tis/kl", "sampler/sync_s"):
        print(f"\n{m}")
        for name, per in table.items():
            cells = [(f"{s['mean']:+.2e} ± {s['se']:.1e}" if m.startswith("tis") else f"{s['mean']:+.3f} ± {s['se']:.3f}") if s else "—" for s in per[m].values()]
            print(f"  {name:{width}s}  " + "  ".join(f"{span:>7s} {c:>16s}" for span, c in zip(per[m], cells)))
    for name, per in diffs.items():
        for m, spans_ in per.items():
            print(f"\n{name} − {base}, {m}: " + "  ".join(f"{span} {d['difference']:+.3f} ± {d['se']:.3f}" for span, d in spans_.items()))
    print(f"\nwritten {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
