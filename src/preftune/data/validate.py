"""Row dict -> record, one function per kind, every failure a DataError naming row and field.

Accepted row shapes are TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats):

- sft:      {prompt, completion} | {messages} (last message = completion) | {text}
- pairs:    {prompt, chosen, rejected} | {chosen, rejected} (implicit prompt = common prefix)
- rankings: {prompt, completions, ranking}  with ranking best first, ties as nested lists
- unpaired: {prompt, completion, label}
- prompts:  {prompt} | {messages}

Pairs, rankings and unpaired rows may also carry ``annotator`` and ``group`` (non-empty strings;
numbers are taken as their text), kept on the record for diverse-preference methods. Other extra
fields (ids, metadata) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from preftune.data.records import (
    ROLES,
    TAG_FIELDS,
    DataError,
    PairRecord,
    PromptRecord,
    RankingRecord,
    Record,
    SFTRecord,
    UnpairedRecord,
    is_conversational,
    type_name,
)


@dataclass(frozen=True)
class Where:
    """Where a row came from; builds located errors."""

    source: str
    row: int | None

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, source=self.source, row=self.row, field=field)


def _missing(row: dict, where: Where, field: str, expected: str) -> DataError:
    has = ", ".join(repr(k) for k, v in row.items() if v is not None) or "none"
    return where.error(f"missing field; expected {expected}, the row has {has}", field)


def _has(row: dict, key: str) -> bool:
    # Columnar sources (Parquet, `datasets`) give every row every column, with None where a row
    # lacks it; for choosing a row's shape, a null column counts as absent.
    return row.get(key) is not None


def _get(row: dict, key: str, where: Where, expected: str) -> Any:
    """row[key], with a DataError listing what the row has instead of a KeyError."""
    if key not in row:
        raise _missing(row, where, key, expected)
    return row[key]


def check_messages(value: list, where: Where, field: str) -> list:
    """Validate a list of {"role", "content"} messages; returns it unchanged."""
    for i, msg in enumerate(value, start=1):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            got = type_name(msg) if not isinstance(msg, dict) else "keys " + ", ".join(map(repr, msg))
            raise where.error(f"message {i}: expected an object with 'role' and 'content', got {got}",
                              field)
        if msg["role"] not in ROLES:
            raise where.error(f"message {i}: unknown role {msg['role']!r} (expected one of "
                              f"{', '.join(ROLES)})", field)
        if not isinstance(msg["content"], str):
            raise where.error(f"message {i}: 'content' must be a string, got "
                              f"{type_name(msg['content'])}", field)
    return value


def check_value(value: Any, where: Where, field: str) -> Any:
    """A prompt/completion value: text, or a list of messages. Emptiness is the caller's business."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return check_messages(value, where, field)
    raise where.error(f"expected a string or a list of messages, got {type_name(value)}", field)


def check_completion(value: Any, prompt: Any, where: Where, field: str) -> Any:
    """A completion: valid, non-empty, same form as the prompt, and ending with the assistant."""
    value = check_value(value, where, field)
    if is_conversational(value) != is_conversational(prompt):
        forms = ("a list of messages", "text")
        p_form = forms[0] if is_conversational(prompt) else forms[1]
        c_form = forms[0] if is_conversational(value) else forms[1]
        raise where.error(f"the prompt is {p_form} but {field!r} is {c_form}; use one form for both",
                          field)
    if isinstance(value, str):
        if not value.strip():
            raise where.error("empty completion (only whitespace)", field)
        return value
    if not value:
        raise where.error("empty completion (an empty list of messages)", field)
    if value[-1]["role"] != "assistant":
        raise where.error(f"the completion's last message must be from the assistant, got role "
                          f"{value[-1]['role']!r}", field)
    if not any(m["content"].strip() for m in value):
        raise where.error("empty completion (the messages have no text)", field)
    return value


def check_prompt(value: Any, where: Where, field: str = "prompt") -> Any:
    return check_value(value, where, field)


def split_messages(messages: Any, where: Where, field: str = "messages") -> tuple[list, list]:
    """A full conversation -> (prompt = all but the last message, completion = [last message])."""
    if not isinstance(messages, list):
        raise where.error(f"expected a list of messages, got {type_name(messages)}", field)
    check_messages(messages, where, field)
    if not messages:
        raise where.error("empty list of messages", field)
    last = messages[-1]
    if last["role"] != "assistant":
        raise where.error(f"the last message must be from the assistant (it is the completion), "
                          f"got role {last['role']!r}", field)
    if not last["content"].strip():
        raise where.error("empty completion (the last assistant message has no text)", field)
    return messages[:-1], [last]


def check_tags(row: dict, where: Where) -> dict:
    """The row's optional ``annotator`` / ``group`` labels: {field: str} for those present."""
    tags = {}
    for key in TAG_FIELDS:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # annotator ids exported as numbers
        if not isinstance(value, str):
            raise where.error(f"expected a string (who labelled the row / their group), got {type_name(value)}", key)
        if not value.strip():
            raise where.error("empty string; leave the field out (or null) for rows without one", key)
        tags[key] = value.strip()
    return tags


def row_to_sft(row: dict, where: Where) -> SFTRecord:
    expected = "'prompt' and 'completion', or 'messages', or 'text'"
    if _has(row, "prompt") or _has(row, "completion"):
        prompt = check_prompt(_get(row, "prompt", where, expected), where)
        completion = check_completion(_get(row, "completion", where, expected), prompt, where,
                                      "completion")
        return SFTRecord(prompt, completion, row=where.row)
    if _has(row, "messages"):
        prompt, completion = split_messages(row["messages"], where)
        return SFTRecord(prompt, completion, row=where.row)
    if _has(row, "text"):
        # Language modelling: every token of the text is trained on.
        text = check_completion(row["text"], "", where, "text")
        return SFTRecord("", text, row=where.row)
    raise _missing(row, where, "prompt", expected)


def common_prefix(chosen: Any, rejected: Any) -> int:
    """Length of the common prefix; for text, TRL's rule (a space before the split moves right)."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if isinstance(chosen, str) and 0 < idx < n and chosen[idx - 1] == " ":
        idx -= 1  # keep " blue" / " green" whole, as trl.extract_prompt does
    return idx


def _implicit_prompt(row: dict, where: Where) -> tuple[Any, Any, Any]:
    """{chosen, rejected} without a prompt -> (prompt, chosen, rejected) split at the common prefix."""
    chosen = check_value(row["chosen"], where, "chosen")
    rejected = check_value(row["rejected"], where, "rejected")
    if is_conversational(chosen) != is_conversational(rejected):
        raise where.error("'chosen' and 'rejected' must both be text or both lists of messages",
                          "rejected")
    if chosen == rejected:
        return chosen[:0], chosen, rejected  # identical pair: load_records drops it
    idx = common_prefix(chosen, rejected)
    if is_conversational(chosen) and idx == 0:
        raise where.error("no 'prompt' field and 'chosen'/'rejected' share no leading messages, so "
                          "the prompt cannot be inferred; add a 'prompt' field", "prompt")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if idx == len(value):
            raise where.error(f"no 'prompt' field and {field!r} is a prefix of the other "
                              f"completion, so nothing is left of it after the inferred prompt", field)
    return chosen[:idx], chosen[idx:], rejected[idx:]


def row_to_pair(row: dict, where: Where) -> PairRecord:
    expected = "'prompt', 'chosen' and 'rejected' (or 'chosen' and 'rejected' with the prompt inside)"
    _get(row, "chosen", where, expected)
    _get(row, "rejected", where, expected)
    if _has(row, "prompt"):
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        prompt = check_prompt(prompt, where)
    else:
        prompt, chosen, rejected = _implicit_prompt(row, where)
    chosen = check_completion(chosen, prompt, where, "chosen")
    rejected = check_completion(rejected, prompt, where, "rejected")
    return PairRecord(prompt, chosen, rejected, row=where.row, **check_tags(row, where))


def check_ranking(ranking: Any, k: int, where: Where, field: str = "ranking") -> list:
    """Normalise ``[2, [0, 3], 1]`` to ``[[2], [0, 3], [1]]``, each of range(k) exactly once."""
    if not isinstance(ranking, list) or not ranking:
        raise where.error(f"expected a non-empty list of completion indices (best first), got "
                          f"{type_name(ranking)}", field)
    groups, seen = [], set()
    for pos, item in enumerate(ranking, start=1):
        group = item if isinstance(item, list) else [item]
        if not group:
            raise where.error(f"position {pos} is an empty tie group", field)
        for idx in group:
            # bool is an int subclass; True/False as an index is a bug in the data.
            if not isinstance(idx, int) or isinstance(idx, bool):
                raise where.error(f"position {pos}: expected a completion index (int) or a list of "
                                  f"them, got {type_name(idx)}", field)
            if not 0 <= idx < k:
                raise where.error(f"names completion {idx} but the row has {k} completions "
                                  f"(indices 0..{k - 1})", field)
            if idx in seen:
                raise where.error(f"completion {idx} appears more than once", field)
            seen.add(idx)
        groups.append(list(group))
    missing = sorted(set(range(k)) - seen)
    if missing:
        raise where.error(f"does not place completion(s) {', '.join(map(str, missing))}; every one "
                          f"of the {k} completions must appear exactly once", field)
    return groups


def _ranked_completion(k: int, value: Any, prompt: Any, where: Where) -> Any:
    try:
        return check_completion(value, prompt, where, "completions")
    except DataError as e:
        raise where.error(f"completion {k}: {e.message}", "completions") from None


def row_to_ranking(row: dict, where: Where) -> RankingRecord:
    expected = "'prompt', 'completions' and 'ranking'"
    prompt = check_prompt(_get(row, "prompt", where, expected), where)
    completions = _get(row, "completions", where, expected)
    if not isinstance(completions, list) or len(completions) < 2:
        got = f"{len(completions)} item(s)" if isinstance(completions, list) else type_name(completions)
        raise where.error(f"expected a list of at least 2 completions, got {got}", "completions")
    completions = [_ranked_completion(k, c, prompt, where) for k, c in enumerate(completions)]
    ranking = check_ranking(_get(row, "ranking", where, expected), len(completions), where)
    return RankingRecord(prompt, completions, ranking, row=where.row, **check_tags(row, where))


def check_label(value: Any, where: Where, field: str = "label") -> bool:
    """Booleans, or the integers 0/1 (common in exported datasets)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise where.error(f"expected a boolean (true/false or 0/1), got {type_name(value)} {value!r}",
                      field)


def row_to_unpaired(row: dict, where: Where) -> UnpairedRecord:
    expected = "'prompt', 'completion' and 'label'"
    prompt = check_prompt(_get(row, "prompt", where, expected), where)
    completion = check_completion(_get(row, "completion", where, expected), prompt, where,
                                  "completion")
    label = check_label(_get(row, "label", where, expected), where)
    return UnpairedRecord(prompt, completion, label, row=where.row, **check_tags(row, where))


def row_to_prompt(row: dict, where: Where) -> PromptRecord:
    if _has(row, "prompt"):
        field, prompt = "prompt", check_prompt(row["prompt"], where)
    elif _has(row, "messages"):
        field, prompt = "messages", row["messages"]
        if not isinstance(prompt, list):
            raise where.error(f"expected a list of messages, got {type_name(prompt)}", field)
        check_messages(prompt, where, field)
    else:
        raise _missing(row, where, "prompt", "'prompt' or 'messages'")
    empty = not prompt.strip() if isinstance(prompt, str) else not any(
        m["content"].strip() for m in prompt)
    if empty:
        raise where.error("empty prompt", field)
    return PromptRecord(prompt, row=where.row)


CONVERTERS: dict[str, Callable[[dict, Where], Record]] = {
    "sft": row_to_sft,
    "pairs": row_to_pair,
    "rankings": row_to_ranking,
    "unpaired": row_to_unpaired,
    "prompts": row_to_prompt,
}
