"""The labels file: one JSON line per label, appended and fsynced as each label is given.

Nothing is held only in memory: a crash, a closed browser or Ctrl-C loses at most the label being
typed. On start the file is read back and labelled items are skipped. A last line cut short by a
crash (no newline, not JSON) is set aside in ``<output>.partial`` rather than deleted; any other
unreadable line is an error naming the file and line, so a hand-edited file is never overwritten.

Rows (extra keys are ignored by preftune's data loaders):

* ranking: ``{"prompt", "completions", "ranking": [[best...], ..., [worst...]], "item", "annotator", "labelled_at"}``
  -- a rankings record: DPO-family and reward training read it directly (pairs via
  ``rankings_to_pairs``; the reward model can also fit Plackett-Luce to it);
* thumbs: one row per completion ``{"prompt", "completion", "label": true/false, "item", ...}`` -- an
  unpaired record for KTO;
* skipped items go to ``<output>.skipped.jsonl`` (``{"item", "annotator", "labelled_at"}``).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from preftune.data.records import DataError


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if no == len(lines) and not raw.endswith(b"\n"):  # a write cut short by a crash
                Path(str(path) + ".partial").write_bytes(line)
                with open(path, "r+b") as f:
                    f.truncate(len(raw) - len(line))
                break
            raise DataError(f"not a JSON line ({err}); fix or remove it, labels are never overwritten",
                            source=str(path), row=no) from None
        if not isinstance(rows[-1], dict) or not isinstance(rows[-1].get("item"), str):
            raise DataError("a label row must be an object with an 'item' key", source=str(path), row=no, field="item")
    return rows


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


class LabelStore:
    """Append-only labels (``output``) and skips (``output.skipped.jsonl``); thread-safe."""

    def __init__(self, output: str | os.PathLike):
        self.path = Path(output)
        self.skip_path = Path(str(output) + ".skipped.jsonl")
        self._lock = threading.Lock()
        self.labels = _read_lines(self.path)
        self.skips = _read_lines(self.skip_path)

    def done(self) -> set[str]:
        """Keys of items labelled or skipped."""
        return {r["item"] for r in self.labels} | {r["item"] for r in self.skips}

    def append(self, rows: list[dict], *, skipped: bool = False) -> None:
        """Write ``rows`` (the rows of one item's label) and make them durable before returning."""
        path = self.skip_path if skipped else self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        with self._lock:
            with open(path, "ab") as f:
                if f.tell() and _last_byte(path) != b"\n":  # a hand-edited file without a final newline
                    data = b"\n" + data
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            (self.skips if skipped else self.labels).extend(rows)

    def undo(self, key: str) -> bool:
        """Remove the rows of item ``key`` (labels or skips), rewriting the file atomically."""
        with self._lock:
            for path, rows in ((self.path, self.labels), (self.skip_path, self.skips)):
                keep = [r for r in rows if r["item"] != key]
                if len(keep) == len(rows):
                    continue
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                rows[:] = keep
                return True
        return False
