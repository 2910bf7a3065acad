"""`preftune score`: score (prompt, completion) rows -- or preference pairs -- with reward model(s); writes JSONL.

    preftune score model=runs/reward data=completions.jsonl output=scores.jsonl
    preftune score model=[runs/rm-a,runs/rm-b] combine=mean_minus_std k=1 data=pairs.jsonl

Rows: ``{prompt, completion}`` (or ``messages``, whose last assistant message is the completion, or
``text``) get ``score``; pair rows ``{prompt, chosen, rejected}`` get ``chosen_score`` and
``rejected_score``. With an ensemble every score also gets ``*_std`` and ``*member_scores``. Each
output row is the input row plus these keys. A summary (reward statistics; for pairs accuracy,
margin, BT log-likelihood and calibration; with ``gold_reward`` the correlation with it) is written
next to the output as ``OUTPUT.report.json``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from preftune.commands.base import add_settings_command, settings
from preftune.config import ConfigError, doc, shared
from preftune.data.loaders import read_rows, row_kind
from preftune.data.validate import CONVERTERS, Where
from preftune.models.cache import write_json, write_jsonl
from preftune.rewards.base import FunctionReward
from preftune.rewards.evaluation import json_ready, pair_report, score_report
from preftune.rewards.model import RewardModel, combine_scores


@dataclass
class ScoreConfig:
    model: Union[str, list[str]] = doc(
        "",
        "Reward model(s): a reward run's OUTPUT_DIR (its model, or all members of an ensemble run), a model "
        "folder, or a list of these scored as one ensemble. Required.",
    )
    data: str = doc(
        "",
        "Rows to score: a .jsonl/.json/.parquet/.csv file, 'builtin:NAME' or a dataset name, with prompt + "
        "completion (or messages / text) per row, or prompt + chosen + rejected (pairs). Required.",
    )
    output: str = doc("scores.jsonl", "Where to write the input rows with their scores (JSONL).")
    report: Optional[str] = doc(None, "Where to write the summary JSON. null = OUTPUT with the suffix .report.json.")
    split: str = shared("split")
    max_rows: Optional[int] = doc(None, "Score only the first N rows. null = all.")
    batch_size: int = doc(16, "Rows per forward pass (length-sorted, right-padded).")
    combine: Optional[Literal["mean", "mean_minus_std", "min"]] = doc(
        None, "How ensemble members are combined into `score`. null = the ensemble run's reward.combine, else mean."
    )
    k: Optional[float] = doc(None, "k of combine=mean_minus_std. null = the saved value, else 1.0.")
    gold_reward: Optional[str] = doc(
        None, "A gold reward 'module:function' (fn(prompts=..., completions=...) -> floats): adds gold_score and correlations."
    )
    calibration_bins: int = doc(10, "Bins of the calibration table (pairs only).")
    dtype: Literal["fp32", "bf16"] = doc("fp32", "Compute precision of the forward passes.")

    def validate(self, path: str) -> None:
        if not self.model:
            raise ConfigError(f"{path}.model: required (a reward run's OUTPUT_DIR or a model folder)")
        if not self.data:
            raise ConfigError(f"{path}.data: required (a file of rows to score)")
        if self.batch_size < 1 or self.calibration_bins < 1:
            raise ConfigError(f"{path}: batch_size and calibration_bins must be >= 1")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"{path}.max_rows: must be >= 1 or null")


def read_score_rows(source: str, split: str, max_rows: int | None) -> tuple[str, list[dict], list]:
    """-> (kind 'pairs' | 'completions', raw rows, records); every row validated (DataError naming row/field)."""
    rows, records, kind = [], [], None
    for row_no, row in read_rows(source, split):
        if kind is None:
            kind = "pairs" if row_kind(row) == "pairs" else "completions"
        records.append(CONVERTERS["pairs" if kind == "pairs" else "sft"](row, Where(str(source), row_no)))
        rows.append(row)
        if max_rows is not None and len(rows) >= max_rows:
            break
    return kind, rows, records


def run_score(cfg: ScoreConfig) -> tuple[Path, Path]:
    kind, rows, records = read_score_rows(cfg.data, cfg.split, cfg.max_rows)
    try:
        gold = FunctionReward(cfg.gold_reward) if cfg.gold_reward else None
    except ValueError as err:
        raise ConfigError(f"score.gold_reward: {err}") from None
    model = RewardModel.load(cfg.model, combine=cfg.combine, k=cfg.k, batch_size=cfg.batch_size, dtype=cfg.dtype)
    ensemble = len(model.members) > 1
    prompts = [r.prompt for r in records]
    columns = [("chosen", "chosen_"), ("rejected", "rejected_")] if kind == "pairs" else [("completion", "")]
    scored, gold_scores = {}, {}
    for attr, prefix in columns:
        completions = [getattr(r, attr) for r in records]
        members = model.member_scores(prompts, completions)
        combined, _, std = combine_scores(members, model.combine, model.k)
        scored[prefix] = (combined, members)
        for i, row in enumerate(rows):
            row[f"{prefix}score"] = float(combined[i])
            if ensemble:
                row[f"{prefix}score_std"] = float(std[i])
                row[f"{prefix}member_scores"] = members[:, i].tolist()
        if gold is not None:
            gold_scores[prefix] = gold(prompts, completions)
            for row, g in zip(rows, gold_scores[prefix]):
                row[f"{prefix}gold_score"] = g
    if kind == "pairs":
        (c, mc), (r, mr) = scored["chosen_"], scored["rejected_"]
        extra = dict(gold_chosen=gold_scores["chosen_"], gold_rejected=gold_scores["rejected_"]) if gold else {}
        if ensemble:
            extra.update(member_chosen=mc, member_rejected=mr)
        report = pair_report(c, r, bins=cfg.calibration_bins, **extra)
    else:
        report = score_report(scored[""][0], gold=gold_scores.get("") if gold else None)
    report = {"data": cfg.data, "kind": kind, "members": len(model.members), "combine": model.combine, "k": model.k, **report}
    out = write_jsonl([json_ready(row) for row in rows], Path(cfg.output), default=str)
    report_path = Path(cfg.report) if cfg.report else out.with_name(out.name + ".report.json")
    write_json(report_path, json_ready(report))
    return out, report_path


def register(sub) -> None:
    add_settings_command(sub, "score", "Score (prompt, completion) rows or pairs with reward model(s); writes JSONL.", ScoreConfig,
                         "model=runs/reward data=rows.jsonl", run)


def run(args: argparse.Namespace) -> int:
    path, report = run_score(settings(ScoreConfig, args, "score"))
    print(f"wrote {path}")
    print(f"summary in {report}")
    return 0
