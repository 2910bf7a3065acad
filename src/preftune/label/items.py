"""What is labelled: items of one prompt and its K candidate completions, read from a samples file.

Two input shapes are accepted (JSONL / JSON / Parquet / CSV / ``datasets``, as everywhere):

* grouped rows ``{"prompt": ..., "completions": [c0, c1, ...]}``;
* flat rows ``{"prompt": ..., "completion": ...}``, e.g. the output of
  ``preftune generate num_samples=K``: consecutive rows with the same prompt form one item.

Each item has a stable ``key`` (a hash of prompt and completions), which is what the labels file
records: labelling resumes where it stopped, and a changed samples file never inherits old labels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from preftune.data.loaders import read_rows
from preftune.data.records import DataError
from preftune.data.validate import Where, check_completion, check_prompt, type_name


@dataclass
class Item:
    key: str
    prompt: Any
    completions: list
    rows: list[int] = field(default_factory=list)  # 1-based rows of the samples file it came from


def item_key(prompt: Any, completions: list) -> str:
    blob = json.dumps([prompt, completions], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def load_items(source: str, *, split: str = "train", min_completions: int = 2) -> list[Item]:
    """Read ``source`` into items; raises DataError naming the file, row and field of a bad row, or
    of an item with fewer than ``min_completions`` completions."""

    items: list[Item] = []
    flat: Item | None = None  # the item flat rows are being appended to
    for row_no, row in read_rows(source, split):
        where = Where(str(source), row_no)
        if not isinstance(row, dict):
            raise where.error(f"expected an object with 'prompt' and 'completion' or 'completions', got {type_name(row)}")
        if row.get("prompt") is None:
            raise where.error("missing field; expected 'prompt' with 'completion' or 'completions'", "prompt")
        prompt = check_prompt(row["prompt"], where)
        if row.get("completions") is not None:
            values = row["completions"]
            if not isinstance(values, list):
                raise where.error(f"expected a list of completions, got {type_name(values)}", "completions")
            completions = []
            for k, value in enumerate(values):
                try:
                    completions.append(check_completion(value, prompt, where, "completions"))
                except DataError as err:
                    raise where.error(f"completion {k}: {err.message}", "completions") from None
            items.append(Item("", prompt, completions, [row_no]))
            flat = None
        elif row.get("completion") is not None:
            completion = check_completion(row["completion"], prompt, where, "completion")
            if flat is not None and flat.prompt == prompt:
                flat.completions.append(completion)
                flat.rows.append(row_no)
            else:
                flat = Item("", prompt, [completion], [row_no])
                items.append(flat)
        else:
            has = ", ".join(repr(k) for k, v in row.items() if v is not None) or "none"
            raise where.error(f"missing field; expected 'completion' or 'completions', the row has {has}", "completions")
    for item in items:
        if len(item.completions) < min_completions:
            raise DataError(
                f"this prompt has {len(item.completions)} completion(s); ranking needs at least {min_completions} "
                "(flat rows are grouped by consecutive equal prompts)",
                source=str(source), row=item.rows[0], field="completions",
            )
        try:
            item.key = item_key(item.prompt, item.completions)
        except UnicodeEncodeError as err:  # a lone surrogate: a valid JSON escape that is not text
            field = "prompt" if _unencodable(item.prompt) else "completions"
            raise DataError(f"contains a lone surrogate ({err.object[err.start:err.end]!a}), which is not text",
                            source=str(source), row=item.rows[0], field=field) from None
    return items


def _unencodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
