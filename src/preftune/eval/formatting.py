"""How reports print values, one home for the HTML and the Markdown report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["format_number", "lookup"]


def format_number(value: Any) -> str:
    """How the report prints a value: floats with 4 decimals, ints as they are, None as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def lookup(metrics: Mapping, key: str):
    """``metrics[key]``; a dotted key reaches into nested dicts (``win_rate.rate``); None where missing."""
    value: Any = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value
