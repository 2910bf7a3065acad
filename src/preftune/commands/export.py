"""`preftune export CHECKPOINT [--output DIR]`: a training checkpoint -> a loadable model folder."""

from __future__ import annotations

import argparse

from preftune.train.export import export_checkpoint


def register(sub) -> None:
    x = sub.add_parser("export", help="Turn a training checkpoint into a model folder (full weights or LoRA adapter).")
    x.add_argument("checkpoint", help="A checkpoint folder, OUTPUT_DIR/checkpoints/step-N.")
    x.add_argument("--output", help="Where to write the model (default: OUTPUT_DIR/exports/step-N).")
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.output, reuse=False)
    print(f"model exported to {out}")
    return 0
