"""`preftune pipeline PIPELINE.yaml [key=value ...] [--resume]`: rounds of generate -> label -> train -> evaluate."""

from __future__ import annotations

import argparse
import json

from preftune.config import describe
from preftune.pipeline import load_pipeline, run_pipeline
from preftune.pipeline.spec import STAGE_CLASSES, PipelineConfig, SFTStage


def _help() -> str:
    parts = []
    for title, cls in [("Pipeline settings (key=value):", PipelineConfig), ("sft: (optional)", SFTStage)] + [
            (f"Stage kind '{kind}' (a stage under stages:):", cls) for kind, cls in STAGE_CLASSES.items()]:
        rows = [f"  {key} ({tp}, default {default!r})\n      {text}" for key, tp, default, text in describe(cls)]
        parts.append("\n".join([title] + rows))
    return "\n\n".join(parts)


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="Rounds: optional SFT, then generate -> label -> train -> evaluate per round; "
                       "resumable stage by stage; writes report.html.", epilog=_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="Pipeline YAML file (see configs/pipelines/).")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. rounds=2 stages.dpo.config.dpo.beta=0.2")
    p.add_argument("--resume", action="store_true", help="Continue in output_dir: skip finished stages whose inputs are "
                   "unchanged, continue interrupted ones from their own output, redo changed ones.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.config, list(args.overrides))
    report = run_pipeline(pipeline, resume=args.resume)
    data = json.loads((report.parent / "results.json").read_text(encoding="utf-8"))
    print(f"{'round':>5s} {'gold reward':>12s} {'KL':>8s} {'win vs prev':>11s} {'win vs start':>12s} {'length':>7s}")
    for r in data["rounds"]:
        ev = r["evaluate"]
        if ev:
            prev, start = ((ev.get(k) or {}).get("rate", float("nan")) for k in ("win_rate_vs_previous", "win_rate_vs_start"))
            print(f"{r['round']:5d} {ev['reward_mean']:12.3f} {ev['kl']:8.2f} {prev:11.2f} {start:12.2f} {ev['length_mean']:7.1f}")
    print(f"report: {report}")
    return 0
