"""`preftune algorithms`: the algorithm table and what each algorithm needs."""

from __future__ import annotations

import argparse
import sys

from preftune.algorithms import ALGORITHMS


def register(sub) -> None:
    a = sub.add_parser("algorithms", help="List the algorithms and what each needs.")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name, cls in ALGORITHMS.items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        n = cls.needs
        flags = (f"data={n.data_kind:9s} loss per {n.loss_unit:5s} reference={'yes' if n.reference_model else 'no '} "
                 f"length-averaged={'yes' if n.length_averaged else 'no '}")
        print(f"{name:13s} {flags}  {doc}")
    return 0
