"""metrics.jsonl: one JSON object per logged step, on the main process only.

A non-finite value is written as the string "nan", "inf" or "-inf" (JSON has no NaN; ``null`` would
read as a missing value); :func:`read_metrics` turns those strings back into floats.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: str | Path, *, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything after it is untrustworthy
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(record), ensure_ascii=False) + "\n")
            f.flush()


_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/inf float (in dicts and lists, tensors included) as "nan" / "inf" / "-inf"."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_metrics(path: str | Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]
