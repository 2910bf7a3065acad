"""Annotator groups: the group vocabulary of a dataset, its checks, and putting the group in the prompt.

Rows of pairs, rankings and unpaired data may carry ``group`` (the population an annotator speaks
for) and ``annotator`` (who labelled the row); see ``preftune.data.validate.check_tags``. A method
that uses groups asks for the vocabulary of the training data (``group_names``), checks a held-out
split against it (``check_held_out_groups``), and either gives each tokenized row a group index
(``tokenize_pairs(..., groups=index)`` -> a LongTensor ``group`` per batch row) or writes the group
into the prompt (``condition_on_group``) so that one model serves every group when told which.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Sequence

from preftune.data.records import DataError, Record, is_conversational

log = logging.getLogger("preftune.data")

GROUP_TEMPLATE = "[preferences of group {group}] "


def _row(rec: Record, i: int) -> int:
    return rec.row if rec.row is not None else i + 1


def group_names(records: Sequence[Record], source: str, *, min_groups: int = 2, key: str = "group") -> list[str]:
    """The sorted distinct values of ``key`` ('group' or 'annotator'); every row must have one.

    Raises DataError naming the first row without it, or the file when it holds fewer than ``min_groups``
    distinct values (a group-aware method fitted to one group is pooled training under another name).
    """
    for i, rec in enumerate(records):
        if getattr(rec, key, None) is None:
            raise DataError(f"missing field; a group-aware method needs a {key!r} on every row", source=source,
                            row=_row(rec, i), field=key)
    counts = Counter(getattr(rec, key) for rec in records)
    if len(counts) < min_groups:
        only = ", ".join(map(repr, counts)) or "none"
        raise DataError(f"the {key!r} column has {len(counts)} distinct value(s) ({only}); a group-aware method "
                        f"needs at least {min_groups}", source=source, field=key)
    return sorted(counts)


def group_index(names: Sequence[str]) -> dict[str, int]:
    """Group name -> index 0..G-1 (the order of ``names``)."""
    return {name: i for i, name in enumerate(names)}


def check_held_out_groups(names: Sequence[str], records: Sequence[Record], source: str, *, key: str = "group") -> None:
    """A held-out row whose group the training data lacks is an error (no model of it was fitted);
    a training group absent from the held-out split is a warning (its accuracy cannot be reported)."""
    known = set(names)
    seen = set()
    for i, rec in enumerate(records):
        value = getattr(rec, key, None)
        if value is None:
            raise DataError(f"missing field; the training data has groups ({', '.join(names)}), so every held-out "
                            f"row needs one", source=source, row=_row(rec, i), field=key)
        if value not in known:
            raise DataError(f"group {value!r} does not occur in the training data (groups: {', '.join(names)})",
                            source=source, row=_row(rec, i), field=key)
        seen.add(value)
    missing = [n for n in names if n not in seen]
    if missing and records:
        log.warning("%s, field %r: group(s) %s have no held-out rows; their accuracy is not reported", source, key,
                    ", ".join(map(repr, missing)))


def warn_single_label_annotators(records: Sequence[Record], source: str) -> list[str]:
    """Annotators who labelled one row only: their group assignment (EM's E-step) rests on one
    comparison. Logged as a warning naming the first such row; returns their ids."""
    counts = Counter(rec.annotator for rec in records if getattr(rec, "annotator", None) is not None)
    lonely = sorted(a for a, n in counts.items() if n == 1)
    if lonely:
        first = next(i for i, rec in enumerate(records) if rec.annotator == lonely[0])
        log.warning("%s, row %d, field 'annotator': %d annotator(s) gave a single label (%s%s); their component "
                    "rests on one comparison", source, _row(records[first], first), len(lonely),
                    ", ".join(map(repr, lonely[:5])), ", ..." if len(lonely) > 5 else "")
    return lonely


def assignment_accuracy(groups: Sequence[str], components: Sequence[int]) -> tuple[float, dict[int, str]]:
    """How well a mixture's components recover known groups, up to the components' labels: each
    component is named after the group most of its annotators belong to, and the accuracy is the share
    of annotators whose component bears their group's name. Returns (accuracy, component -> name)."""
    names = {}
    for k in sorted(set(components)):
        members = [g for g, c in zip(groups, components) if c == k]
        names[k] = max(sorted(set(members)), key=members.count)
    return sum(names[c] == g for g, c in zip(groups, components)) / max(len(groups), 1), names


def condition_prompt(prompt, group: str, template: str = GROUP_TEMPLATE):
    """The prompt with the group written into it: text gets ``template`` in front; a conversation gets
    it as a system message (prepended to an existing first system message)."""
    text = template.format(group=group)
    if not is_conversational(prompt):
        return text + prompt
    if prompt and prompt[0].get("role") == "system":
        return [{**prompt[0], "content": text + prompt[0]["content"]}, *prompt[1:]]
    return [{"role": "system", "content": text.strip()}, *prompt]


def condition_on_group(records: Sequence[Record], source: str, template: str = GROUP_TEMPLATE) -> list[Record]:
    """Each record with its group written into its prompt (``condition_prompt``); every row needs a group."""
    out = []
    for i, rec in enumerate(records):
        if getattr(rec, "group", None) is None:
            raise DataError("missing field; conditioning on the group needs a 'group' on every row", source=source,
                            row=_row(rec, i), field="group")
        out.append(dataclasses.replace(rec, prompt=condition_prompt(rec.prompt, rec.group, template)))
    return out
