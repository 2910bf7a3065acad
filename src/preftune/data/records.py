"""Canonical record types and the one error type of the data package.

Every loader converts its source into one of the record types below, so the rest of preftune only
ever sees five shapes. Prompt and completion values follow TRL's dataset formats exactly, so a TRL
dataset loads unchanged:

- text:           ``"The sky is"``
- conversational: ``[{"role": "user", "content": "Why is the sky blue?"}, ...]``

A record's prompt and completion(s) always use the same form (both text or both conversational).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

KINDS = ("sft", "pairs", "rankings", "unpaired", "prompts")

# Roles accepted in conversational data. "developer" is OpenAI's newer name for "system"; "tool"
# carries tool results. Anything else is almost always a typo ("assitant") or a different schema
# ("from"/"value" ShareGPT rows), which a chat template would otherwise render silently.
ROLES = ("system", "developer", "user", "assistant", "tool")

Message = dict  # {"role": str, "content": str, ...}; extra keys (tool_calls, name) are kept
Value = Union[str, list]  # text, or a list of messages


class DataError(ValueError):
    """A data problem that the user must fix in their file, located as precisely as we can.

    ``str(e)`` is one line: ``data/train.jsonl, row 17, field 'chosen': expected a string or a list
    of messages, got int``. ``row`` is 1-based: the line number in a JSONL file, the record index + 1
    in every other format. ``row`` / ``field`` are None when the problem is the whole file.
    """

    def __init__(self, message: str, *, source: str = "<data>", row: int | None = None,
                 field: str | None = None):
        self.message = message
        self.source = source
        self.row = row
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = [self.source]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return ", ".join(where) + ": " + self.message

    def __reduce__(self):
        # Exceptions pickle via their args; keep the location when crossing process boundaries
        # (DataLoader workers).
        return (_rebuild_data_error, (self.message, self.source, self.row, self.field))


def _rebuild_data_error(message, source, row, field_):
    return DataError(message, source=source, row=row, field=field_)


# ``row`` on every record: the 1-based row of the source the record came from, so that errors found
# later (e.g. a prompt too long after tokenization) still name the user's row. Not part of equality.
def _row_field():
    return field(default=None, compare=False, repr=False)


# Optional labels of who judged a row (``annotator``) and which population they speak for (``group``):
# diverse-preference methods (group-aware reward models, group-robust DPO) read them; others ignore them.
TAG_FIELDS = ("annotator", "group")


def _tag_field():
    return field(default=None, repr=False)


@dataclass(frozen=True)
class SFTRecord:
    """A demonstration: learn ``completion`` given ``prompt`` (prompt may be "" / [])."""

    prompt: Value
    completion: Value
    row: int | None = _row_field()


@dataclass(frozen=True)
class PairRecord:
    """A preference: ``chosen`` is better than ``rejected`` as a continuation of ``prompt``."""

    prompt: Value
    chosen: Value
    rejected: Value
    row: int | None = _row_field()
    annotator: str | None = _tag_field()
    group: str | None = _tag_field()


@dataclass(frozen=True)
class RankingRecord:
    """K >= 2 completions ranked best first; ``ranking`` is a list of tie groups of indices.

    Example: ``ranking=[[2], [0, 3], [1]]`` means 2 > {0, 3} > 1, with 0 and 3 tied.
    """

    prompt: Value
    completions: list
    ranking: list  # list[list[int]]
    row: int | None = _row_field()
    annotator: str | None = _tag_field()
    group: str | None = _tag_field()


@dataclass(frozen=True)
class UnpairedRecord:
    """A single judged completion (KTO-style): ``label`` True = desirable."""

    prompt: Value
    completion: Value
    label: bool
    row: int | None = _row_field()
    annotator: str | None = _tag_field()
    group: str | None = _tag_field()


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to generate from (online RL, best-of-n, evaluation)."""

    prompt: Value
    row: int | None = _row_field()


Record = Union[SFTRecord, PairRecord, RankingRecord, UnpairedRecord, PromptRecord]


def is_conversational(value: Any) -> bool:
    """True for a list of messages (TRL's conversational form), False for text."""
    return isinstance(value, list)


def type_name(value: Any) -> str:
    """A user-facing type name: JSON's words where they differ from Python's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
