"""`preftune generate`: prompts file -> JSONL of completions."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from preftune.generate_config import GenerateConfig


def run_generate(cfg: GenerateConfig) -> Path:
    from preftune.data.loaders import load_records
    from preftune.generate import generate_completions, write_jsonl
    from preftune.models.loading import load_model
    from preftune.train.export import resolve_model

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
