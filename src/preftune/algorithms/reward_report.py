"""The end-of-training report of a reward model (``OUTPUT_DIR/reward_eval.json``): accuracy, margin,
BT log-likelihood, calibration, reward statistics, per-group accuracy and (with ``reward.gold_reward``)
the correlation with a gold reward, on held-out pairs (else the first training rows)."""

from __future__ import annotations

import torch

from preftune.algorithms.reward_groups import per_group_accuracy
from preftune.data.convert import rankings_to_pairs
from preftune.data.records import PairRecord, RankingRecord
from preftune.data.source import split_eval
from preftune.rewards.base import FunctionReward
from preftune.rewards.evaluation import pair_report
from preftune.rewards.model import combine_scores

REPORT_FILE = "reward_eval.json"
TRAIN_REPORT_ROWS = 512  # rows of training data reported on when there is no held-out data


def report_pairs(data: dict, d, seed: int) -> tuple[list[PairRecord], str]:
    """Held-out pairs (rankings become all their ordered pairs), else the first training rows.
    ``data``: source -> (records, examples) as the algorithm read them; ``d``: the run's data section."""
    records, split = [], "held-out"
    if d.eval_path and d.eval_path in data:
        records = data[d.eval_path][0]
    elif d.eval_fraction > 0 and d.path in data:
        train_records = data[d.path][0]
        _, held = split_eval(list(range(len(train_records))), d.eval_fraction, seed)
        records = [train_records[i] for i in held]
    if not records:
        records = data.get(d.path, ([], []))[0][:TRAIN_REPORT_ROWS]
        split = f"train (first {TRAIN_REPORT_ROWS} rows: no held-out data, set data.eval_fraction or data.eval_path)"
    pairs = [r for r in records if isinstance(r, PairRecord)]
    pairs += rankings_to_pairs([r for r in records if isinstance(r, RankingRecord)], mode="all")
    return pairs, split


def reward_report(model, pairs: list[PairRecord], split: str, config, batch_size: int) -> dict:
    """reward_eval.json of ``model`` (a RewardModel: one member or an ensemble) on ``pairs``."""
    prompts = [p.prompt for p in pairs]
    bs = batch_size
    member_c = model.member_scores(prompts, [p.chosen for p in pairs], bs) if pairs else torch.zeros(len(model.members), 0)
    member_r = model.member_scores(prompts, [p.rejected for p in pairs], bs) if pairs else torch.zeros(len(model.members), 0)
    chosen = combine_scores(member_c, model.combine, model.k)[0]
    rejected = combine_scores(member_r, model.combine, model.k)[0]
    extra = {}
    if config.gold_reward and pairs:
        fn = FunctionReward(config.gold_reward)
        extra = {"gold_chosen": fn(prompts, [p.chosen for p in pairs]), "gold_rejected": fn(prompts, [p.rejected for p in pairs])}
    if len(model.members) > 1:
        extra.update(member_chosen=member_c, member_rejected=member_r)
    report = pair_report(chosen, rejected, bins=config.calibration_bins, **extra)
    if any(p.group for p in pairs):
        report["groups"] = per_group_accuracy(pairs, chosen, rejected)
    rule = {"combine": model.combine, "k": model.k} if len(model.members) > 1 else {}
    return {"split": split, "loss": config.loss, **rule, **report}
