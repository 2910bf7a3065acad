"""The settings of `preftune collect` (light: the CLI's help imports this without the web stack or a database driver)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from preftune.config import ConfigError, doc, shared

ACTIONS = ("create", "invite", "serve", "status", "export", "judge")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class CollectConfig:
    samples: str = doc("", "create: samples to label, rows {prompt, completions: [...]} or flat {prompt, completion} rows "
                           "(`preftune generate num_samples=K`); a row's optional 'gold' ranking makes it a gold item.")
    guidelines: str = shared("guidelines", note="create: HTML in it is shown as text.")
    overlap: int = doc(1, "create: how many different annotators label each item.")
    mode: Literal["rank", "thumbs"] = shared("mode", note="create.")
    split: str = shared("split", note="create.")
    max_items: Optional[int] = doc(None, "create: use only the first N items of the samples. null = all.")
    db: str = doc("", "Database URL: '' = collect.db (SQLite, WAL) in the project folder; a postgresql://user:pass@host/db URL "
                      "for a team server (create records it in collect.json, so later commands find it).")
    host: str = doc("127.0.0.1", "serve / invite: address the web app listens on (0.0.0.0 = every interface; needs invited annotators).")
    port: int = doc(8765, "serve / invite: port of the web app.")
    base_url: str = doc("", "invite: the address people open, if not http://HOST:PORT (e.g. behind a proxy).")
    max_body_kb: int = doc(64, "serve: largest request body accepted (KiB); bigger ones get 413.")
    output: str = doc("labels.jsonl", "export: where to write: .jsonl, .parquet, or a folder for `datasets.save_to_disk`.")
    rows: Literal["consensus", "annotators"] = doc("consensus", "export: one consensus row per item, or every annotator's own rows (with an 'annotator' field).")
    format: Literal["auto", "rankings", "pairs", "unpaired"] = doc(
        "auto", "export: record format `preftune train` reads: rankings, pairs (chosen/rejected) or unpaired (KTO); auto = rankings in rank mode, unpaired in thumbs mode.")
    consensus: Literal["borda", "majority", "bradley_terry"] = doc("borda", "export: how annotators' rankings combine: Borda count, majority vote per pair, or a Bradley-Terry fit.")
    min_agreement: float = doc(0.0, "export: drop consensus items whose pairwise agreement among their annotators is below this (0..1).")
    judge: str = doc("llm", "judge: the labeller, 'llm' or 'llm:MODEL' (default the packaged smollm2-135m-instruct); it joins the "
                            "project as annotator 'judge:<spec>' and answers every item, so `status` shows its agreement with people.")
    min_annotators: int = doc(1, "export: drop consensus items answered by fewer annotators than this.")

    def validate(self, path: str) -> None:
        if self.overlap < 1:
            raise ConfigError(f"{path}.overlap: must be >= 1, got {self.overlap}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{path}.port: must be between 0 and 65535, got {self.port}")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError(f"{path}.max_items: must be >= 1 or null, got {self.max_items}")
        if not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"{path}.min_agreement: must be between 0 and 1, got {self.min_agreement}")
        if self.max_body_kb < 1:
            raise ConfigError(f"{path}.max_body_kb: must be >= 1, got {self.max_body_kb}")
