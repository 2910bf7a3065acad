"""Batched sampling of completions (the sampler itself lives in preftune/rollout/sampling.py) and the
JSONL writer of ``preftune generate``; this module keeps the public names where callers find them."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable

from preftune.rollout.sampling import generate_completions

__all__ = ["generate_completions", "write_jsonl"]


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """Write one JSON object per line, atomically: a crash never leaves a half-written file at ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
