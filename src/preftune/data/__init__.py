"""Data: records, loaders (JSONL/JSON/Parquet/CSV/`datasets`/builtin), tokenization, collation.

    records = load_records("data/train.jsonl", "pairs")
    examples, report = tokenize_pairs(records, tokenizer, max_length=1024)
    batch = collate_pairs(examples[:8], tokenizer.pad_token_id)

torch is only imported by ``preftune.data.collate`` (exported lazily here).
"""

from preftune.data import collate
from preftune.data.convert import pairs_to_unpaired, ranking_index_pairs, rankings_to_pairs
from preftune.data.loaders import builtin_names, load_records, read_rows
from preftune.data.records import (
    KINDS,
    DataError,
    PairRecord,
    PromptRecord,
    RankingRecord,
    Record,
    SFTRecord,
    UnpairedRecord,
    is_conversational,
)
from preftune.data.tokenize import (
    TRUNCATION_POLICIES,
    TruncationReport,
    encode_prompt_completion,
    render,
    tokenize_pairs,
    tokenize_sft,
)

_COLLATE = ("Collator", "collate_completions", "collate_pairs", "collate_shared_pairs",
            "count_completion_tokens", "pack_completions")


def __getattr__(name):
    if name in _COLLATE:
        return getattr(collate, name)
    raise AttributeError(f"module 'preftune.data' has no attribute {name!r}")


__all__ = [
    "KINDS", "TRUNCATION_POLICIES", "DataError", "PairRecord", "PromptRecord", "RankingRecord",
    "Record", "SFTRecord", "TruncationReport", "UnpairedRecord", "builtin_names",
    "encode_prompt_completion", "is_conversational", "load_records", "pairs_to_unpaired",
    "ranking_index_pairs", "rankings_to_pairs", "read_rows", "render", "tokenize_pairs",
    "tokenize_sft", *_COLLATE,
]
