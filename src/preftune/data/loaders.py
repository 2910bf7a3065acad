"""Read rows from files, `datasets` folders, shipped datasets or the hub; turn them into records.

``read_rows`` knows file formats and nothing about kinds; ``load_records`` validates each row into
one record type (see ``validate.py`` for the accepted shapes). Every problem is a ``DataError``
naming the source, the 1-based row and the field -- never a bare KeyError or decoder traceback.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from preftune.data.convert import pairs_to_unpaired, rankings_to_pairs  # noqa: F401 (re-export)
from preftune.data.records import KINDS, DataError, PairRecord, Record, SFTRecord, type_name
from preftune.data.validate import CONVERTERS, Where

logger = logging.getLogger("preftune.data")

BUILTIN_DIR = Path(__file__).parent / "builtin"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")

# CSV cells are always strings. These columns hold lists (JSON in the cell) ...
_CSV_LIST_FIELDS = ("messages", "completions", "ranking")
# ... these hold text, or a JSON list of messages for conversational data ...
_CSV_VALUE_FIELDS = ("prompt", "completion", "chosen", "rejected")
# ... and this one a boolean.
_CSV_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _utf8(raw: bytes, source: str, row: int | None, what: str = "line") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        f"re-save the file as UTF-8", source=source, row=row) from None


def _strip_bom(raw: bytes) -> bytes:
    return raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw


def _as_object(value: Any, source: str, row: int) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object (one record), got {type_name(value)}",
                        source=source, row=row)
    return value


def _read_jsonl(path: Path, source: str) -> Iterator[tuple[int, dict]]:
    # Bytes line by line: a bad byte or bad JSON is reported with its own line number.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = _strip_bom(raw)
            if not raw.strip():
                continue
            text = _utf8(raw, source, line_no)
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({_json_problem(e, f'column {e.colno}')})", source=source,
                                row=line_no) from None
            yield line_no, _no_nulls(_as_object(value, source, line_no), source, line_no)


def _json_problem(e: json.JSONDecodeError, where: str) -> str:
    """'Expecting value at column 3'; json's 'Unterminated string starting at' already ends in 'at'."""
    return f"{e.msg} {where}" if e.msg.endswith(" at") else f"{e.msg} at {where}"


_RECORD_FIELDS = ("prompt", "completion", "chosen", "rejected", "messages", "completions", "ranking", "label", "text")


def _no_nulls(row: dict, source: str, row_no: int) -> dict:
    """In JSON a null is written on purpose: never read it as a missing field (an empty prompt)."""
    for key in _RECORD_FIELDS:
        if key in row and row[key] is None:
            raise DataError("expected a value, got null; give one, or leave the field out where it is optional",
                            source=source, row=row_no, field=key)
    return row


def _read_json(path: Path, source: str, split: str) -> Iterator[tuple[int, dict]]:
    raw = _strip_bom(path.read_bytes())
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"line {line} is not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the "
                        f"file as UTF-8", source=source) from None
    if not text.strip():
        raise DataError("no rows (the file is empty)", source=source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one JSON object per line belongs in a .jsonl file" if e.msg == "Extra data" else ""
        raise DataError(f"invalid JSON ({_json_problem(e, f'line {e.lineno}, column {e.colno}')}){hint}",
                        source=source) from None
    if isinstance(data, dict):
        key = split if split in data else "data" if "data" in data else None
        if key is None or not isinstance(data[key], list):
            raise DataError(f"expected a list of records, or an object with a {split!r} or 'data' "
                            f"list; got an object with keys {', '.join(map(repr, data))}",
                            source=source)
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"expected a list of records, got {type_name(data)}", source=source)
    for i, value in enumerate(data, start=1):
        yield i, _no_nulls(_as_object(value, source, i), source, i)


def _csv_cell(key: str, cell: str) -> Any:
    """Undo CSV's flattening: JSON lists in list columns, booleans in 'label'."""
    stripped = cell.strip()
    if key in _CSV_LIST_FIELDS or (key in _CSV_VALUE_FIELDS and stripped.startswith("[{")):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return cell  # the validator reports "expected a list, got str"
        if key in _CSV_LIST_FIELDS or (isinstance(value, list) and all(isinstance(m, dict)
                                                                      for m in value)):
            return value
        return cell
    if key == "label":
        return _CSV_BOOLS.get(stripped.lower(), cell)
    return cell


class _BadBytes(Exception):
    def __init__(self, line_no: int, raw: bytes, err: UnicodeDecodeError):
        self.line_no, self.raw, self.err = line_no, raw, err


def _decoded_lines(f) -> Iterator[str]:
    for line_no, raw in enumerate(f, start=1):
        if line_no == 1:
            raw = _strip_bom(raw)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadBytes(line_no, raw, e) from None


def _read_csv(path: Path, source: str, delimiter: str) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        reader = csv.DictReader(_decoded_lines(f), delimiter=delimiter)
        row_no = 0
        try:
            for row_no, cells in enumerate(reader, start=1):
                if None in cells or None in cells.values():
                    raise DataError(f"the row has a different number of cells than the header's "
                                    f"{len(reader.fieldnames)} columns", source=source, row=row_no)
                yield row_no, {k: _csv_cell(k, v) for k, v in cells.items()}
        except _BadBytes as e:
            raise DataError(f"line {e.line_no} of the file is not valid UTF-8 (byte "
                            f"0x{e.raw[e.err.start]:02x}); re-save the file as UTF-8",
                            source=source, row=row_no + 1) from None
        except csv.Error as e:
            raise DataError(f"malformed CSV: {e}", source=source, row=row_no + 1) from None


def _read_parquet(path: Path, source: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq  # here: only Parquet files need it, and it is slow to import

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row_no = 0
        for batch in batches:
            for value in batch.to_pylist():
                row_no += 1
                yield row_no, value
    except DataError:
        raise
    except Exception as e:  # pyarrow raises many types (ArrowInvalid, OSError, UnicodeDecodeError)
        raise DataError(f"could not read the Parquet file: {type(e).__name__}: {e}",
                        source=source) from None


def _rows_of_dataset(ds: Any, source: str, split: str) -> Iterator[tuple[int, dict]]:
    """A `datasets` Dataset or DatasetDict (pick `split`) -> numbered rows."""
    if isinstance(ds, dict):  # DatasetDict subclasses dict
        if split not in ds:
            raise DataError(f"no split {split!r}; the dataset has {', '.join(map(repr, ds))}",
                            source=source)
        ds = ds[split]
    for i, value in enumerate(ds, start=1):
        yield i, dict(value)


def _read_saved_dataset(path: Path, source: str, split: str) -> Iterator[tuple[int, dict]]:
    import datasets  # here: only datasets folders / hub names need it, and it is slow to import

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"a directory, but not one written by datasets' save_to_disk "
                        f"({type(e).__name__}: {e})", source=source) from None
    yield from _rows_of_dataset(ds, source, split)


def _read_hub(name: str, split: str) -> Iterator[tuple[int, dict]]:
    import datasets  # here: only datasets folders / hub names need it, and it is slow to import

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"no such file or directory, and loading it as a Hugging Face hub dataset "
                        f"failed (offline? {type(e).__name__}: {first})", source=name) from None
    yield from _rows_of_dataset(ds, name, split)


def builtin_names() -> list[str]:
    """Names usable as ``builtin:NAME``."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


def _looks_like_path(source: str) -> bool:
    return (source.lower().endswith(FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~"))
            or os.sep != "/" and os.sep in source)


def _dispatch(source: str, split: str) -> Iterator[tuple[int, dict]]:
    if source.startswith("builtin:"):
        name = source[len("builtin:"):]
        path = BUILTIN_DIR / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"no built-in dataset {name!r}; available: "
                            f"{', '.join(builtin_names()) or 'none'}", source=source)
        return _read_jsonl(path, source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, source, split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path, source)
        if suffix == ".json":
            return _read_json(path, source, split)
        if suffix == ".parquet":
            return _read_parquet(path, source)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, source, "," if suffix == ".csv" else "\t")
        raise DataError(f"unsupported file type {suffix!r}; use one of "
                        f"{', '.join(FILE_SUFFIXES)}", source=source)
    if _looks_like_path(source):
        raise DataError("no such file or directory", source=source)
    return _read_hub(source, split)


def row_kind(row: dict) -> str:
    """The record kind a raw row's keys say it is: 'rankings' (a ``ranking``), 'unpaired' (a ``label``),
    'pairs' (``chosen`` / ``rejected``), else 'sft' (a completion, messages or text)."""
    if row.get("ranking") is not None:
        return "rankings"
    if "label" in row:
        return "unpaired"
    if row.get("chosen") is not None or row.get("rejected") is not None:
        return "pairs"
    return "sft"


def sniff_kind(source: str, split: str = "train") -> str:
    """The kind of a data source, read from its first row (:func:`row_kind`; 'sft' when empty)."""
    return row_kind(next(iter(read_rows(source, split=split)), (0, {}))[1])


def read_rows(source: str, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, row_dict)`` from ``source``; row numbers are 1-based.

    ``source``: a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.tsv`` file, a directory
    written by ``datasets.save_to_disk`` (``split`` picks from a DatasetDict), ``builtin:NAME`` for
    a dataset shipped in ``preftune/data/builtin``, or else a hub dataset name for
    ``datasets.load_dataset(source, split=split)``. JSONL rows are numbered by line; all other
    formats by record index + 1. Raises DataError for any unreadable input and for zero rows.
    """
    count = 0
    for count, (row_no, row) in enumerate(_dispatch(str(source), split), start=1):
        yield row_no, row
    if count == 0:
        raise DataError("no rows (the file or split is empty)", source=str(source))


def load_records(source: str, kind: str, *, split: str = "train",
                 drop_identical_pairs: bool = True) -> list[Record]:
    """Read ``source`` and validate every row into a record of ``kind`` (one of ``KINDS``).

    Pairs whose chosen == rejected carry no preference signal (and make a DPO loss constant); they
    are dropped by default and their count is logged as a warning on ``preftune.data``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    convert = CONVERTERS[kind]
    records: list[Record] = []
    identical = 0
    first_form: tuple[int | None, bool] | None = None
    for row_no, row in read_rows(source, split):
        record = convert(row, Where(str(source), row_no))
        if drop_identical_pairs and isinstance(record, PairRecord) and record.chosen == record.rejected:
            identical += 1
            continue
        if kind != "prompts":  # prompts are rendered one by one; trained-on rows share one form
            first_form = _check_form(record, first_form, str(source))
        records.append(record)
    if identical:
        logger.warning("%s: dropped %d pair(s) whose chosen and rejected are identical",
                       source, identical)
    if not records:
        raise DataError(f"no rows left after dropping {identical} identical pair(s)",
                        source=str(source))
    return records


def _record_form(record: Record) -> bool | None:
    """True for a conversation (lists of messages), False for plain text, None when it cannot tell or
    it does not matter (a language-modelling ``text`` row is trained as it stands, beside either)."""
    if isinstance(record, SFTRecord) and record.prompt == "":
        return None
    for name in ("prompt", "completion", "chosen", "completions"):
        value = getattr(record, name, None)
        if name == "completions" and value:
            value = value[0]
        if value:  # "" (no prompt) and [] say nothing
            return isinstance(value, list)
    return None


def _check_form(record: Record, first: tuple[int | None, bool] | None, source: str) -> tuple[int | None, bool] | None:
    """One file, one form: plain-text rows and conversations are not mixed (the chat template would
    apply to some rows only). Returns the (row, form) that sets the file's form."""
    form = _record_form(record)
    if form is None:
        return first
    if first is None:
        return (record.row, form)
    if form != first[1]:
        name = lambda f: "a conversation (lists of messages)" if f else "plain text"  # noqa: E731
        raise DataError(f"this row is {name(form)} but row {first[0]} is {name(first[1])}; use one form for the whole file",
                        source=source, row=record.row)
    return first