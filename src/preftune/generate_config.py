"""Settings of `preftune generate` (sampling completions for a prompts file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from preftune.config import ConfigError, doc


@dataclass
class GenerateConfig:
    model: str = doc(
        "smollm2-135m-instruct",
        "Model to sample from: any name `model.name` accepts, or a trained run's `OUTPUT_DIR/model` "
        "(full weights or a LoRA adapter).",
    )
    prompts: str = doc("", "Prompts file (.jsonl/.json/.parquet/.csv with a `prompt` or `messages` column), or a dataset name. Required.")
    output: str = doc("generations.jsonl", "Where to write one JSON object per prompt (prompt, completion, ...).")
    split: str = doc("train", "Split to read from a datasets directory or hub name.")
    max_rows: Optional[int] = doc(None, "Use only the first N prompts. null = all.")
    max_new_tokens: int = doc(64, "Maximum tokens to generate per prompt.")
    temperature: float = doc(1.0, "Sampling temperature; 0 = greedy.")
    top_p: float = doc(1.0, "Nucleus sampling: keep the smallest token set with this much probability.")
    top_k: int = doc(0, "Keep only the k most likely tokens (0 = off).")
    num_samples: int = doc(1, "Completions per prompt (rows are written prompt-major).")
    batch_size: int = doc(8, "Prompts per generate call (left-padded, KV cache on).")
    seed: int = doc(0, "Sampling seed.")
    text_as_chat: bool = doc(False, "Wrap plain-text prompts as a user message and apply the chat template.")
    dtype: Literal["fp32", "bf16"] = doc("fp32", "Compute precision of the forward passes.")

    def validate(self, path: str) -> None:
        if not self.prompts:
            raise ConfigError(f"{path}.prompts: required (a prompts file or dataset name)")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_samples < 1:
            raise ConfigError(f"{path}: max_new_tokens, batch_size and num_samples must be >= 1")
        if self.temperature < 0 or not (0 < self.top_p <= 1) or self.top_k < 0:
            raise ConfigError(f"{path}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
