"""What every stage of a running pipeline shares: the settings, the output folder, the prompt
splits and where each stage's policy lives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from preftune.config import ConfigError
from preftune.data.loaders import load_records
from preftune.pipeline.spec import PipelineConfig


@dataclass
class Context:
    cfg: PipelineConfig
    out: Path
    progress: bool = True
    _splits: Optional[tuple[list, list]] = field(default=None, repr=False)

    def folder(self, stage_id: str) -> Path:
        return self.out / stage_id

    def policy(self, stage_id: Optional[str]) -> str:
        """The model a stage id stands for: a train (or SFT) stage's trained model; None = the start model."""
        return self.cfg.model if stage_id is None else str(self.folder(stage_id) / "run" / "model")

    def splits(self) -> tuple[list, list]:
        """(train prompts, held-out prompts): values as the data loader reads them."""
        if self._splits is None:
            cfg = self.cfg
            rows = [r.prompt for r in load_records(cfg.train_prompts, "prompts")]
            if cfg.eval_prompts:
                held = [r.prompt for r in load_records(cfg.eval_prompts, "prompts")]
            else:
                if cfg.held_out >= len(rows):
                    raise ConfigError(f"held_out: {cfg.held_out} leaves no training prompts of the {len(rows)} in {cfg.train_prompts}")
                rows, held = rows[: len(rows) - cfg.held_out], rows[len(rows) - cfg.held_out :]
            if not held:
                raise ConfigError("held_out / eval_prompts: the evaluate stages need held-out prompts")
            self._splits = (rows, held[: cfg.eval_rows])
        return self._splits

    def round_prompts(self, r: int) -> list[Any]:
        """Round ``r``'s block of ``prompts_per_round`` training prompts (the next block each round, wrapping)."""
        train = self.splits()[0]
        n = min(self.cfg.prompts_per_round, len(train))
        start = (r - 1) * self.cfg.prompts_per_round
        return [train[(start + i) % len(train)] for i in range(n)]
