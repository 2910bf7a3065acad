"""``preftune label``: one person ranks sampled completions in the collection web app on this machine,
or a judge (any reward: VADER, a Python function, a trained reward model; or a local LLM) ranks
them; either way the labels land in a file that ``preftune train`` reads directly.

    preftune generate model=runs/sft/model prompts=prompts.jsonl num_samples=4 output=samples.jsonl
    preftune label input=samples.jsonl output=labels.jsonl              # prints a login link on 127.0.0.1:8765
    preftune label input=samples.jsonl output=labels.jsonl judge=vader   # no human: the judge ranks
    preftune train configs/dpo.yaml data.path=labels.jsonl               # rankings -> pairs -> DPO

The web UI is ``preftune collect``'s app over a one-annotator project (``preftune.collect.local``),
so a person's labels are in the same database as a team's and ``preftune collect status|export``
work on it too.
"""

from __future__ import annotations

import argparse

from preftune.collect.shortcut import LabelConfig, label
from preftune.commands.base import add_settings_command, settings


def register(sub) -> None:
    add_settings_command(sub, "label", "Rank sampled completions in a local web UI, or with a judge; writes labels JSONL.", LabelConfig,
                         "input=samples.jsonl output=labels.jsonl judge=vader", run)


def run(args: argparse.Namespace) -> int:
    cfg = settings(LabelConfig, args, "label")

    def ready(url: str) -> None:
        print(f"labelling {cfg.input} -> {cfg.output}: open {url} (Ctrl-C stops; every label is saved as it is given)", flush=True)

    result = label(cfg, on_ready=ready)
    extra = "".join(f", {k.replace('_', ' ')}: {v}" for k, v in result.items() if k not in ("output", "done", "total"))
    print(f"labels in {result['output']}: {result['done']} of {result['total']} items done{extra}")
    return 0
