"""`preftune generate`: sample completions for a prompts file; writes JSONL.

    preftune generate model=runs/sft/model prompts=prompts.jsonl num_samples=4 output=samples.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from preftune.commands.base import add_settings_command, settings
from preftune.config import ConfigError, doc, shared
from preftune.data.loaders import load_records
from preftune.models.cache import write_jsonl
from preftune.models.loading import load_model
from preftune.rollout.sampling import generate_completions
from preftune.train.export import resolve_model


@dataclass
class GenerateConfig:
    model: str = doc(
        "smollm2-135m-instruct",
        "Model to sample from: any name `model.name` accepts, or a trained run's `OUTPUT_DIR/model` "
        "(full weights or a LoRA adapter).",
    )
    prompts: str = doc("", "Prompts file (.jsonl/.json/.parquet/.csv with a `prompt` or `messages` column), or a dataset name. Required.")
    output: str = doc("generations.jsonl", "Where to write one JSON object per prompt (prompt, completion, ...).")
    split: str = shared("split")
    max_rows: Optional[int] = doc(None, "Use only the first N prompts. null = all.")
    max_new_tokens: int = shared("max_new_tokens")
    temperature: float = shared("temperature")
    top_p: float = shared("top_p")
    top_k: int = shared("top_k")
    num_samples: int = doc(1, "Completions per prompt (rows are written prompt-major).")
    batch_size: int = doc(8, "Prompts per generate call (left-padded, KV cache on).")
    seed: int = doc(0, "Sampling seed.")
    text_as_chat: bool = shared("text_as_chat")
    dtype: Literal["fp32", "bf16"] = doc("fp32", "Compute precision of the forward passes.")

    def validate(self, path: str) -> None:
        if not self.prompts:
            raise ConfigError(f"{path}.prompts: required (a prompts file or dataset name)")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_samples < 1:
            raise ConfigError(f"{path}: max_new_tokens, batch_size and num_samples must be >= 1")
        if self.temperature < 0 or not (0 < self.top_p <= 1) or self.top_k < 0:
            raise ConfigError(f"{path}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0")


def run_generate(cfg: GenerateConfig) -> Path:
    records = load_records(cfg.prompts, "prompts", split=cfg.split)
    if cfg.max_rows is not None:
        records = records[: cfg.max_rows]
    model, tokenizer = load_model(resolve_model(cfg.model), seed=cfg.seed)  # a checkpoint: its export
    prompts = [r.prompt for r in records for _ in range(cfg.num_samples)]
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else contextlib.nullcontext()
    with autocast:
        rows = generate_completions(
            model,
            tokenizer,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            text_as_chat=cfg.text_as_chat,
            progress=True,
        )
    for i, row in enumerate(rows):
        row["sample"] = i % cfg.num_samples
    write_jsonl(rows, cfg.output)
    return Path(cfg.output)


def register(sub) -> None:
    add_settings_command(sub, "generate", "Sample completions for a prompts file; writes JSONL.", GenerateConfig,
                         "prompts=p.jsonl temperature=0.7", run)


def run(args: argparse.Namespace) -> int:
    path = run_generate(settings(GenerateConfig, args, "generate"))
    print(f"wrote {path}")
    return 0
