"""Reward model: a scalar r_φ(x, y) trained on preference pairs (Bradley–Terry) or rankings (Plackett–Luce).

Seed 000 ("Reward model") and seed 003: the SFT policy's transformer with the unembedding replaced
by a freshly initialised linear scalar head (``reward.backbone: null``), or an encoder such as
MiniLM, trained with −log σ(r(x, y_w) − r(x, y_l)). The model is a one-label
``AutoModelForSequenceClassification``, so ``OUTPUT_DIR/model`` loads directly in transformers; the
reward is read at the last real token (``preftune.models.reward_head``).

Ensembles (``reward.ensemble_size: N``, members trained one after another into
``OUTPUT_DIR/member-i/``): algorithms/reward_ensemble.py. The end-of-training report
(``OUTPUT_DIR/reward_eval.json``: held-out accuracy, margin, BT log-likelihood, calibration, reward
statistics, correlation with ``reward.gold_reward``): algorithms/reward_report.py. Pair loading and
validation: data/reward_pairs.py. Annotator groups: algorithms/reward_groups.py; a mixture of K reward
models fitted by EM over the annotators (``reward.groups: mixture``): algorithms/reward_mixture.py; the
mean-and-variance reward (``reward.groups: distributional``): algorithms/reward_distributional.py.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from transformers import AutoModelForSequenceClassification

from preftune.algorithms.base import Algorithm, Metrics, Needs
from preftune.algorithms.reward_distributional import distributional_loss, save_distributional
from preftune.algorithms.reward_ensemble import member_runs, member_seed, save_ensemble
from preftune.algorithms.reward_groups import apply_groups, check_eval_groups
from preftune.algorithms.reward_mixture import RewardMixture, save_components, score_pairs
from preftune.algorithms.reward_report import REPORT_FILE, report_pairs, reward_report
from preftune.config import ConfigError, doc
from preftune.data.collate import collate_completions, collate_pairs
from preftune.data.loaders import load_records, rankings_to_pairs, sniff_kind
from preftune.data.records import DataError, PairRecord, RankingRecord, SFTRecord
from preftune.data.reward_pairs import load_reward_pairs
from preftune.data.source import split_eval
from preftune.data.tokenize import tokenize_pairs, tokenize_sft
from preftune.losses.metrics import row_metrics
from preftune.losses.reward import bradley_terry_loss, centering_penalty, plackett_luce_loss
from preftune.models import loading  # loading.load_model: looked up at call time, so tests can stand in for it
from preftune.models.cache import write_json
from preftune.models.reward_head import extra_special_tokens, finish_reward_ids, pooling_kind, sequence_rewards, sequence_scores
from preftune.rewards.base import resolve_function
from preftune.rewards.evaluation import json_ready
from preftune.rewards.model import RewardMember, RewardModel, ScoreSpec, reward_limits

log = logging.getLogger("preftune.algorithms")

# Encoders (BERT, MiniLM) ship no chat template; conversations are rendered as "role: content" lines.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass
class RewardConfig:
    backbone: Optional[str] = doc(
        None,
        "Model the reward model starts from. null = model.name (e.g. the SFT policy: its transformer with the "
        "LM head replaced by a fresh scalar head); or an encoder such as 'minilm-l6-v2' (packaged, offline), or "
        "any name model.name accepts.",
    )
    loss: Literal["bt", "plackett_luce"] = doc(
        "bt",
        "'bt': Bradley-Terry −log σ(r_w − r_l) on pairs (rankings are first turned into pairs); 'plackett_luce': "
        "the likelihood of each whole ranking (ties = unordered groups; pairs are rankings of 2).",
    )
    rankings_to_pairs: Literal["all", "best_vs_rest"] = doc(
        "all", "With loss=bt and ranking data: turn each ranking into all ordered pairs, or best vs each worse one."
    )
    margin_column: Optional[str] = doc(
        None,
        "Name of a numeric column of the pair rows holding a margin m per pair (Llama 2's preference-strength "
        "margin); the loss becomes −log σ(r_w − r_l − m). null = no margin. loss=bt only.",
    )
    identical_pairs: Literal["drop", "error"] = doc(
        "drop",
        "Pairs whose chosen equals rejected carry no preference: 'drop' skips them (the count is logged), "
        "'error' stops at the first one.",
    )
    centering_coef: float = doc(
        0.0,
        "Reward-centring regulariser coef · (r_w + r_l)² (Eisenstein et al. 2023; for rankings the sum over the "
        "ranking): keeps rewards near 0, since BT only sees differences. 0 = off; 0.01 is typical.",
    )
    ensemble_size: int = doc(
        1,
        "Train N independent reward models (different init seed and data order, same held-out split) into "
        "OUTPUT_DIR/member-i/; scored together as an ensemble.",
    )
    member: int = doc(
        0,
        "Which ensemble member this run trains (set for each member by `preftune train`; selects the seed and "
        "data order). Leave at 0 otherwise.",
    )
    combine: Literal["mean", "mean_minus_std", "min"] = doc(
        "mean",
        "How an ensemble's members are combined when scoring: mean, mean − k·std (penalise disagreement), or min. "
        "Saved in OUTPUT_DIR/ensemble.json; `preftune score combine=...` overrides it.",
    )
    combine_k: float = doc(1.0, "k of combine=mean_minus_std.")
    gold_reward: Optional[str] = doc(
        None,
        "A gold reward function 'module:function' or 'file.py:function', called as fn(prompts=[...], "
        "completions=[...]) -> list of floats; reward_eval.json then reports the correlation of the learned "
        "reward with it. null = none.",
    )
    calibration_bins: int = doc(10, "Bins of the calibration table in reward_eval.json.")
    groups: Literal["pooled", "per_group", "conditioned", "mixture", "distributional"] = doc(
        "pooled",
        "Annotator groups (the rows' 'group' field): 'pooled' = one model of everyone's pairs (groups only reported, "
        "per group, in reward_eval.json); 'per_group' = one model per group, trained on its rows only, into "
        "OUTPUT_DIR/group-G/; 'conditioned' = one model for all groups with each prompt carrying its group "
        "('[preferences of group G] ' / a system message), so it can learn opposite tastes; 'mixture' = groups "
        "unknown: K reward heads on one backbone fitted by EM over the rows' 'annotator' field, into "
        "OUTPUT_DIR/component-k/, with em_components.json saying which annotators each component got; "
        "'distributional' = groups hidden: a mean and a spread per completion, u ~ N(μ, σ²), P(y_w ≻ y_l) = "
        "Φ((μ_w − μ_l)/√(σ_w² + σ_l²)) (Siththaranjan et al. 2023); μ is OUTPUT_DIR/mean/, σ flags contested pairs.",
    )
    group: Optional[str] = doc(None, "With groups=per_group: the group this run trains (set for each group by `preftune train`).")
    num_components: int = doc(2, "With groups=mixture: K, the number of reward models (at most the number of annotators).")
    em_warmup_steps: int = doc(
        20, "With groups=mixture: pooled steps (every head on every pair) before the EM starts from k-means on the "
            "annotators' preferred directions in the backbone's features.",
    )
    em_interval_steps: int = doc(10, "With groups=mixture: optimizer steps (M-step) between two E-steps over all training pairs.")

    def validate(self, path: str) -> None:
        if self.ensemble_size < 1:
            raise ConfigError(f"{path}.ensemble_size: must be >= 1, got {self.ensemble_size}")
        if not 0 <= self.member < self.ensemble_size:
            raise ConfigError(f"{path}.member: must lie in [0, ensemble_size - 1 = {self.ensemble_size - 1}], got {self.member}")
        if self.centering_coef < 0 or self.combine_k < 0:
            raise ConfigError(f"{path}.centering_coef / combine_k: must be >= 0")
        if self.groups == "per_group" and self.ensemble_size > 1:
            raise ConfigError(f"{path}.groups: per_group trains one model per group; use ensemble_size=1 with it")
        if self.groups == "mixture":
            self._validate_mixture(path)
        if self.groups == "distributional" and (self.ensemble_size > 1 or self.loss != "bt" or self.margin_column is not None):
            raise ConfigError(f"{path}.groups: distributional fits a mean and a spread per completion on pairs; use it "
                              "with loss=bt, no margin_column and ensemble_size=1")
        if self.calibration_bins < 1:
            raise ConfigError(f"{path}.calibration_bins: must be >= 1, got {self.calibration_bins}")
        if self.margin_column is not None and self.loss != "bt":
            raise ConfigError(f"{path}.margin_column: margins are per pair; use loss=bt (or drop the margin)")
        if self.gold_reward is not None:  # fail now, not after training

            try:
                resolve_function(self.gold_reward)
            except ValueError as err:
                raise ConfigError(f"{path}.gold_reward: {err}") from None

    def _validate_mixture(self, path: str) -> None:
        if self.num_components < 2:
            raise ConfigError(f"{path}.num_components: a mixture needs >= 2 components (1 is groups=pooled), got {self.num_components}")
        if self.em_warmup_steps < 0 or self.em_interval_steps < 1:
            raise ConfigError(f"{path}.em_warmup_steps / em_interval_steps: need >= 0 and >= 1")
        if self.ensemble_size > 1 or self.loss != "bt" or self.margin_column is not None:
            raise ConfigError(f"{path}.groups: mixture fits K Bradley-Terry heads on pairs; use it with loss=bt, no "
                              "margin_column and ensemble_size=1")


class RewardModelAlgorithm(Algorithm):
    name = "reward"
    Config = RewardConfig
    needs = Needs(data_kind="pairs", loss_unit="row")  # rankings too; a row = one pair or one ranking
    export_unsupported = ("reward-model checkpoints is not supported (the reward model's scoring settings come "
                          "from its training data)")

    def __init__(self, config: RewardConfig, policy, tokenizer, run):
        if config.ensemble_size > 1 and Path(run.output_dir).name != f"member-{config.member}":
            raise ConfigError(
                "reward.ensemble_size > 1: each member trains in OUTPUT_DIR/member-i; run `preftune train`, or "
                "from Python `preftune.train.ensemble.train_members(run)`"
            )
        if config.groups == "per_group" and config.group is None:
            raise ConfigError("reward.groups=per_group: each group trains in OUTPUT_DIR/group-G; run `preftune train`, or "
                              "from Python `preftune.train.ensemble.train_members(run)`")
        if config.groups in ("mixture", "distributional") and run.train.sharding in ("fsdp2", "zero3"):
            raise ConfigError(f"reward.groups={config.groups} under train.sharding={run.train.sharding} is not supported (its "
                              "heads are cut into reward models from the training process's own data and whole model); "
                              "use DDP or zero2")
        super().__init__(config, policy, tokenizer, run)
        self._data: dict[str, tuple[list, list[dict]]] = {}  # source -> (records, examples), aligned
        self.mixture: RewardMixture | None = None  # groups=mixture: the EM state, from the training records
        self._train_examples: list[dict] = []

    # -- model -----------------------------------------------------------------------------------
    @classmethod
    def load_policy(cls, config: RewardConfig, run) -> tuple[Any, Any]:
        model, tokenizer = loading.load_model(
            config.backbone or run.model.name, dtype=run.model.dtype, seed=member_seed(run.train.seed, config.member),
            model_class=AutoModelForSequenceClassification, num_labels=_heads(config),
        )  # fmt: skip
        if tokenizer.chat_template is None:
            tokenizer.chat_template = PLAIN_CHAT_TEMPLATE  # saved with the model, so scoring renders alike
        return model, tokenizer

    @classmethod
    def member_runs(cls, run) -> list:
        return member_runs(cls, run)

    @classmethod
    def is_trained(cls, output_dir: Path) -> bool:
        return (output_dir / "model" / "reward_config.json").is_file()

    # -- data ------------------------------------------------------------------------------------
    @classmethod
    def load_records(cls, config: RewardConfig, source: str, split: str) -> list:
        return apply_groups(config.groups, cls._read_records(config, source, split), str(source), config.group)

    @classmethod
    def _read_records(cls, config: RewardConfig, source: str, split: str) -> list:
        if sniff_kind(source, split) == "rankings":
            rankings = load_records(source, "rankings", split=split)
            if config.loss == "plackett_luce":
                return rankings
            pairs = rankings_to_pairs(rankings, mode=config.rankings_to_pairs)
            if not pairs:
                raise DataError("no strictly ordered pair in any ranking (all completions tied)", source=str(source))
            return pairs
        pairs = load_reward_pairs(source, split, margin_column=config.margin_column, identical=config.identical_pairs)
        if config.loss == "plackett_luce":
            return [RankingRecord(p.prompt, [p.chosen, p.rejected], [[0], [1]], row=p.row, annotator=p.annotator, group=p.group) for p in pairs]
        return pairs

    def tokenize(self, records: list, source: str) -> tuple[list[dict], Any]:
        d = self.run.data
        kind = pooling_kind(self.policy)
        max_length, max_prompt = reward_limits(d.max_length, d.max_prompt_length, extra_special_tokens(kind, self.tokenizer))
        kwargs = dict(
            max_length=max_length, max_prompt_length=max_prompt, truncation=d.truncation,
            text_as_chat=d.text_as_chat, add_eos=False, source=source,
        )  # fmt: skip
        if records and isinstance(records[0], RankingRecord):
            kept, examples, report = self._tokenize_rankings(records, kind, lambda recs: tokenize_sft(recs, self.tokenizer, **kwargs))
        else:
            kept, examples, report = self._tokenize_pairs(records, kind, lambda recs: tokenize_pairs(recs, self.tokenizer, **kwargs))
        if source != d.path and d.path in self._data:
            check_eval_groups(self.config.groups, self._data[d.path][0], records, source)
        if source == d.path and self.config.member > 0:
            kept, examples = self._member_order(kept, examples)
        if self.config.groups == "mixture":
            if source == d.path:
                self.mixture = RewardMixture.from_records(self.config, kept, source, self.run.train.seed)
            examples = [{**ex, "annotator": a} for ex, a in zip(examples, self.mixture.annotator_ids(kept))]
        self._data[source] = (kept, examples)
        return examples, report

    def _tokenize_pairs(self, records, kind, tokenize):
        examples, report = tokenize(records)
        kept = _survivors(records, examples, tokenize)
        out = []
        for rec, ex in zip(kept, examples):
            prompt, chosen = finish_reward_ids(ex["prompt_ids"], ex["chosen_ids"], self.tokenizer, kind)
            _, rejected = finish_reward_ids(ex["prompt_ids"], ex["rejected_ids"], self.tokenizer, kind)
            item = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
            if self.config.margin_column is not None:
                item["margin"] = float(rec.margin)
            out.append(item)
        return kept, out, report

    def _tokenize_rankings(self, records, kind, tokenize):
        flat = [SFTRecord(rec.prompt, c, row=rec.row) for rec in records for c in rec.completions]
        examples, report = tokenize(flat)
        alive = set(map(id, _survivors(flat, examples, tokenize)))
        by_item = iter(examples)
        kept, out, start = [], [], 0
        for rec in records:
            items = flat[start : start + len(rec.completions)]
            start += len(items)
            tokenized = [next(by_item) for item in items if id(item) in alive]
            if len(tokenized) < len(items):
                continue  # truncation='drop' removed one of its completions: drop the ranking
            level = {i: lvl for lvl, group in enumerate(rec.ranking) for i in group}
            ids = [finish_reward_ids(ex["prompt_ids"], ex["completion_ids"], self.tokenizer, kind) for ex in tokenized]
            kept.append(rec)
            out.append({
                "item_prompt_ids": [p for p, _ in ids], "item_completion_ids": [c for _, c in ids],
                "tie_levels": [level[i] for i in range(len(items))],
            })  # fmt: skip
        return kept, out, report

    def _member_order(self, records: list, examples: list[dict]) -> tuple[list, list[dict]]:
        """Member i > 0: a seeded permutation of the training rows that keeps the held-out rows in place,
        so every member holds out the same rows (the loop's split depends only on train.seed and the count)."""
        d = self.run.data
        positions = list(range(len(examples)))
        if not d.eval_path:
            positions, _ = split_eval(positions, d.eval_fraction, self.run.train.seed)
        shuffled = positions[:]
        random.Random(member_seed(self.run.train.seed, self.config.member)).shuffle(shuffled)
        new_records, new_examples = records[:], examples[:]
        for dst, src in zip(positions, shuffled):
            new_records[dst], new_examples[dst] = records[src], examples[src]
        return new_records, new_examples

    def make_source(self, examples: list[dict], accelerator):
        self._train_examples = examples  # the mixture's E-step scores every training pair
        return super().make_source(examples, accelerator)

    def example_length(self, example: dict) -> int:
        if "tie_levels" in example:
            return max(len(p) + len(c) for p, c in zip(example["item_prompt_ids"], example["item_completion_ids"]))
        return super().example_length(example)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        if "tie_levels" not in examples[0]:
            return collate_pairs(examples, pad)  # rows 0..B-1 chosen, B..2B-1 rejected; "margin" rides along
        flat = [
            {"prompt_ids": p, "completion_ids": c, "ranking_index": r, "item_index": j, "tie_level": lvl}
            for r, ex in enumerate(examples)
            for j, (p, c, lvl) in enumerate(zip(ex["item_prompt_ids"], ex["item_completion_ids"], ex["tie_levels"]))
        ]
        return collate_completions(flat, pad)

    # -- loss ------------------------------------------------------------------------------------
    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        if "ranking_index" in batch:
            return int(batch["ranking_index"].max()) + 1
        return batch["input_ids"].shape[0] // 2

    def before_step(self, micro_batches: list[dict], accelerator) -> None:
        if self.mixture is not None:
            self.mixture.before_step(self._score_training_pairs)

    def _score_training_pairs(self, with_features: bool) -> tuple:
        return score_pairs(self.policy, self._train_examples, self.collate, self.run.train.eval_batch_size, with_features)

    def extra_state(self) -> dict:
        return {"mixture": self.mixture.state_dict()} if self.mixture is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.mixture is not None and "mixture" in state:
            self.mixture.load_state_dict(state["mixture"])

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        if self.mixture is not None or self.config.groups == "distributional":
            scores = sequence_scores(self.policy, batch["input_ids"], batch["attention_mask"]).float()
            if self.mixture is None:
                return distributional_loss(scores, self.config.centering_coef)
            return self.mixture.loss(scores, batch["annotator"], self.config.centering_coef)
        rewards = sequence_rewards(self.policy, batch["input_ids"], batch["attention_mask"]).float()
        if "ranking_index" in batch:
            return self._ranking_loss(batch, rewards)
        b = rewards.shape[0] // 2
        chosen, rejected = rewards[:b], rewards[b:]
        losses, m = bradley_terry_loss(chosen, rejected, margin=batch.get("margin"))
        metrics = row_metrics({
            "accuracy": m["accuracies"], "margin": m["margins"], "log_likelihood": m["log_likelihood"],
            "rewards/chosen": m["chosen_rewards"], "rewards/rejected": m["rejected_rewards"], "rewards/mean": rewards,
        })
        if self.config.centering_coef > 0:
            penalty = centering_penalty(torch.stack([chosen, rejected], -1), self.config.centering_coef)
            losses = losses + penalty
            metrics.update(row_metrics({"centering": penalty}))
        return losses.sum(), metrics

    def _ranking_loss(self, batch: dict[str, torch.Tensor], rewards: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        ranking, item = batch["ranking_index"], batch["item_index"]
        shape = (int(ranking.max()) + 1, int(item.max()) + 1)
        table = torch.zeros(shape, dtype=rewards.dtype, device=rewards.device).index_put((ranking, item), rewards)
        levels = torch.full(shape, -1, dtype=torch.long, device=rewards.device).index_put((ranking, item), batch["tie_level"].long())
        losses, m = plackett_luce_loss(table, levels)
        pairs = m["ordered_pairs"].sum()
        metrics = {
            "accuracy": (m["correct_pairs"].sum(), pairs),
            "margin": (m["margin_sum"].sum(), pairs),
            **row_metrics({"log_likelihood": m["log_likelihood"], "rewards/mean": rewards}),
        }
        if self.config.centering_coef > 0:
            penalty = centering_penalty(table, self.config.centering_coef, mask=levels >= 0)
            losses = losses + penalty
            metrics.update(row_metrics({"centering": penalty}))
        return losses.sum(), metrics

    # -- output ----------------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        super().save(out_dir)
        d = self.run.data
        spec = ScoreSpec(max_length=d.max_length, max_prompt_length=d.max_prompt_length, text_as_chat=d.text_as_chat)
        pairs, split = report_pairs(self._data, d, self.run.train.seed)
        if self.mixture is not None:
            return self._save_mixture(out_dir, spec, pairs, split)
        if self.config.groups == "distributional":
            spec.save(out_dir)
            report = save_distributional(self.policy, self.tokenizer, spec, Path(self.run.output_dir), pairs,
                                         lambda m: self._report(m, pairs, split), self.run.train.eval_batch_size)
            log.info("distributional reward: %s accuracy %.4f of μ, mean pair σ %.3f; μ in %s", split.split(" ")[0],
                     report["accuracy"], report["std"]["pairs"].get("mean", float("nan")), Path(self.run.output_dir) / "mean")
            return
        report = self._report(RewardModel([RewardMember(self.policy, self.tokenizer, spec)]), pairs, split)
        spec.offset = report["rewards"].get("mean", 0.0)
        spec.save(out_dir)
        out = Path(self.run.output_dir)
        write_json(out / REPORT_FILE, json_ready(report), default=str)
        log.info("reward model: %s accuracy %.4f on %d pairs; report in %s", split.split(" ")[0], report["accuracy"], report["pairs"], out / REPORT_FILE)
        if self.config.ensemble_size > 1:
            device = next(self.policy.parameters()).device
            save_ensemble(out.parent, self.config, lambda model: self._report(model, pairs, split), device,
                          self.run.train.eval_batch_size)

    def _save_mixture(self, out_dir: Path, spec: ScoreSpec, pairs: list[PairRecord], split: str) -> None:
        """The shared K-head model stays in OUTPUT_DIR/model; each head becomes OUTPUT_DIR/component-k."""
        spec.save(out_dir)
        if self.mixture.start_components is None:
            log.warning("reward mixture: training ended before the EM started (train steps <= reward.em_warmup_steps "
                        "= %d); the components start from k-means now and were never trained apart", self.config.em_warmup_steps)
            self.mixture.start(*self._score_training_pairs(True))
        self.mixture.e_step(*self._score_training_pairs(False)[:3], step=self.mixture.steps)  # the final heads' γ
        out = Path(self.run.output_dir)
        report = save_components(self.policy, self.tokenizer, spec, self.mixture, out, lambda m: self._report(m, pairs, split),
                                 self.config.combine, self.config.combine_k)
        log.info("reward mixture of %d: annotators per component %s; %s accuracy per group %s; in %s", self.mixture.k,
                 {k: c["annotators"] for k, c in report["components"].items()}, split.split(" ")[0],
                 {g: round(v["accuracy"], 4) for g, v in report["groups"].items()}, out)

    def _report(self, model, pairs: list[PairRecord], split: str) -> dict:
        return reward_report(model, pairs, split, self.config, self.run.train.eval_batch_size)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def _heads(config: RewardConfig) -> int:
    """Score heads of the classifier: K for a mixture, μ and σ for the distributional reward, else one."""
    return {"mixture": config.num_components, "distributional": 2}.get(config.groups, 1)


def _survivors(records: list, examples: list[dict], tokenize) -> list:
    """The records whose examples tokenize returned (truncation='drop' may skip some)."""
    if len(examples) == len(records):
        return list(records)
    return [rec for rec in records if tokenize([rec])[0]]
