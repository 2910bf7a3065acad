"""Samples logging: a few prompt / completion / reward rows of a rollout, appended to a JSONL file
(``OUTPUT_DIR/samples.jsonl``) so a run can be read as it learns."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def log_samples(path: Path, rows: list[dict], scores: torch.Tensor, rollout: int) -> None:
    """Append ``{"rollout", "prompt", "completion", "score"}`` for each row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row, score in zip(rows, scores.tolist()):
            f.write(json.dumps({"rollout": rollout, "prompt": row["prompt"], "completion": row["completion"], "score": score},
                               ensure_ascii=False) + "\n")
