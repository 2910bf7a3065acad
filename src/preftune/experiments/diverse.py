"""The diverse-preferences study: what pooling annotators who want different things does, and what
group-aware methods recover (seed 000's assignment, "Analyze the case with diverse human preferences").

    groups     two synthetic annotator groups with their own gold reward: by default A = VADER sentiment
               (positive continuations), B = ``calm`` (fewer words, no '!'); they disagree on some pairs
    pairs      2 samples per training prompt from π_ref; each pair goes to one annotator (round robin),
               who labels it with their group's gold reward (ties dropped); the annotators are split
               between the groups by each ``mixes`` entry (0.8 = 80% of the annotators, and pairs, in A)
    held out   pairs on the test prompts labelled by every group: each group's reward-model accuracy
    reward     BT pooled, per group, group-conditioned and a mixture of K = #groups neural BT models fitted
               by EM without the group labels (``reward.groups``): accuracy per group on the held-out pairs;
               for the mixture, which annotators each component got and each component's accuracy per group
    EM         a mixture of K = #groups linear BT models over simple features of the completions, fitted by
               EM without the group labels (``fit_bt_mixture``): which annotators land in which component
    policies   DPO on the pooled pairs, group-robust DPO (grdpo), group-conditioned DPO, RLOO on the
               mean / min of the groups' gold rewards; each evaluated per group (gold reward, KL to π_ref;
               a conditioned policy is asked for the group in its prompt)
    report     results.json, per-group reward-vs-KL plots, the EM components, report.html

``preftune study configs/studies/diverse.yaml`` runs it (the file's ``study: diverse`` picks this study).
Built only from the public API, like ``preftune.experiments.sentiment``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from preftune.algorithms import ALGORITHMS
from preftune.config import ConfigError, apply_overrides, doc, from_dict, read_yaml, run_config_to_dict, to_dict
from preftune.data.groups import condition_prompt, warn_single_label_annotators
from preftune.data.loaders import load_records
from preftune.eval.evaluate import REFERENCE, evaluate
from preftune.eval.report import write_report
from preftune.experiments.costs import LOAD, estimate_seconds
from preftune.experiments.diverse_labels import assign, calm, fit_linear_em, longer, sample_pairs, write_held_out
from preftune.experiments.diverse_report import GOLD, minority_summary, neural_em, plots, policy_name, reward_tables, summary
from preftune.experiments.jobs import StudyJobs, finished, fingerprint, key_args, train_resumable, train_run
from preftune.experiments.progress import StudyProgress
from preftune.experiments.sentiment import machine, split_prompts
from preftune.models.cache import write_jsonl
from preftune.rewards.spec import resolve_reward
from preftune.run_config import load_run_config

log = logging.getLogger("preftune.experiments")

__all__ = ["DiverseStudyConfig", "calm", "load_diverse_config", "longer", "plan_stages", "run_diverse_study", "summary"]

# The full study's full-weight reward models took 1.8-2.4x (median 1.9x) the LoRA runs' cost per row.
FULL_WEIGHTS = 1.9
# Reward models on the MiniLM sentence encoder (reward_backbone: minilm-l6-v2), same pairs: 0.10-0.12x the
# SmolLM2 ones' CPU seconds, 0.2x their wall seconds on one thread against two (the full study, 2026-12-02).
ENCODER_SHARE = 0.2
POLICY_METHODS = ("dpo", "grdpo", "dpo_conditioned", "rloo_mean", "rloo_min")
REWARD_METHODS = ("pooled", "per_group", "conditioned", "mixture")


@dataclass
class DiverseStudyConfig:
    study: str = doc("diverse", "Which study this file configures (`preftune study` reads it): 'diverse'.")
    output_dir: str = doc("runs/diverse", "Where pairs, runs, results.json, the plots and report.html go.")
    model: str = doc("smollm2-135m-instruct", "π_ref, the start of every policy and the reward models' backbone.")
    prompts: str = doc("builtin:movie_review_prompts", "Prompts; the last `held_out` rows are the test split.")
    held_out: int = doc(60, "Size of the fixed test split (the last rows of the prompts file).")
    train_prompts: int = doc(96, "Training prompts (pairs and online RL): the first rows before the test split.")
    test_prompts: int = doc(32, "Test prompts: held-out pairs for the reward models and the policy evaluation.")
    groups: list[str] = doc(factory=lambda: ["A", "B"], help="Names of the annotator groups (the first is the majority of each mix).")
    group_rewards: list[str] = doc(
        factory=lambda: ["vader", "preftune.experiments.diverse:calm"],
        help="Each group's gold reward (any reward spec), in the order of `groups`.",
    )
    mixes: list[float] = doc(factory=lambda: [0.8, 0.5], help="Share of the annotators (and pairs) in the first group, one study arm each.")
    annotators: int = doc(10, "Annotators in all; each mix splits them between the groups.")
    reward_methods: list[str] = doc(factory=lambda: ["pooled", "per_group", "conditioned", "mixture"],
                                    help="Reward models (reward.groups): 'pooled', 'per_group', 'conditioned', 'mixture' "
                                         "(K = #groups neural BT models fitted by EM without the group labels).")
    policy_methods: list[str] = doc(
        factory=lambda: ["dpo", "grdpo", "dpo_conditioned", "rloo_mean", "rloo_min"],
        help=f"Policies: {', '.join(POLICY_METHODS)}.",
    )
    beta: float = doc(0.1, "β of the DPO-family policies.")
    kl_coef: float = doc(0.05, "KL coefficient of the RLOO policies.")
    max_new_tokens: int = doc(24, "Tokens sampled per completion.")
    max_length: int = doc(80, "Prompt + completion tokens in training.")
    lora: bool = doc(True, "Train LoRA adapters (r=16) instead of all weights (policies only).")
    learning_rate: float = doc(5e-4, "Learning rate of the policies.")
    reward_learning_rate: float = doc(1e-4, "Learning rate of the reward models.")
    reward_backbone: Optional[str] = doc(
        None, "The reward models' backbone (reward.backbone), e.g. 'minilm-l6-v2', the packaged sentence encoder; "
        "unset: `model`, π_ref's own backbone.",
    )
    offline_epochs: int = doc(2, "Passes over the pairs (reward models and DPO-family policies).")
    online_steps: int = doc(20, "Rollouts of the RLOO policies.")
    micro_batch_size: int = doc(8, "Rows per forward pass.")
    train_overrides: list[str] = doc(factory=list, help="Extra dotted overrides for every training run (e.g. model.dtype=bf16).")
    eval_samples: int = doc(2, "Completions per test prompt, model and group in the evaluation.")
    pairs_per_prompt: int = doc(
        1, "Pairs per prompt, training and held-out: π_ref draws 2 × this many samples per prompt, paired disjointly. "
        "More pairs make the reward models learn (README: what the full study found); training costs grow in proportion.",
    )
    save_steps: int = doc(
        10, "Every training run writes a checkpoint every N steps, so a killed study continues it from its newest one "
        "(deleted once the run is done; not part of the jobs' keys). 0 = only at the end.",
    )
    seed: int = doc(0, "Seed of sampling, annotator assignment and training.")

    def validate(self, path: str) -> None:
        if self.study != "diverse":
            raise ConfigError(f"{path}.study: this is the 'diverse' study's config, got {self.study!r}")
        if len(self.groups) < 2 or len(self.groups) != len(self.group_rewards) or len(set(self.groups)) != len(self.groups):
            raise ConfigError(f"{path}.groups / group_rewards: need >= 2 distinct groups, one reward each")
        for name, values, valid in (("reward_methods", self.reward_methods, REWARD_METHODS), ("policy_methods", self.policy_methods, POLICY_METHODS)):
            for v in values:
                if v not in valid:
                    raise ConfigError(f"{path}.{name}: unknown method {v!r}. Valid: {', '.join(valid)}")
        for mix in self.mixes:
            if not 0 < mix < 1:
                raise ConfigError(f"{path}.mixes: each share must lie strictly between 0 and 1, got {mix}")
            if min(round(mix * self.annotators), self.annotators - round(mix * self.annotators)) < 1:
                raise ConfigError(f"{path}.mixes: mix {mix} of {self.annotators} annotators leaves a group without annotators")
        if self.pairs_per_prompt < 1:
            raise ConfigError(f"{path}.pairs_per_prompt: must be >= 1, got {self.pairs_per_prompt}")
        if self.test_prompts > self.held_out or self.train_prompts < 2:
            raise ConfigError(f"{path}: need train_prompts >= 2 and test_prompts <= held_out")


def load_diverse_config(path: str | None, overrides: list[str]) -> DiverseStudyConfig:
    data = read_yaml(path) if path else {}
    return from_dict(DiverseStudyConfig, apply_overrides(data, overrides), "study")


def plan_stages(cfg: DiverseStudyConfig) -> list[tuple[str, float]]:
    """Every stage of the study in order, with its estimated seconds on a quiet 2-core CPU from the per-row
    costs of ``preftune.experiments.costs`` (measured on the sentiment study's SmolLM2 LoRA runs). This
    study's reward models train all weights (``FULL_WEIGHTS`` times the LoRA cost per row, measured here;
    ``ENCODER_SHARE`` of that on the MiniLM encoder, the only other backbone measured);
    the mixture adds ~8 forward passes over the pairs (its E-steps). The RLOO policies on the gold rewards
    accumulate 2 micro-batches per step and are trained once for all arms. The evaluation samples π_ref
    and each plain policy once, scored by every group, and π_ref and the conditioned policies once per
    group with the group in the prompt."""
    stages = [("sample train pairs", estimate_seconds(cfg, "pairs")),
              ("sample test pairs", estimate_seconds(dataclasses.replace(cfg, train_prompts=cfg.test_prompts), "pairs"))]
    share = ENCODER_SHARE if cfg.reward_backbone == "minilm-l6-v2" else 1.0  # another backbone: as SmolLM2, unmeasured
    reward = LOAD + FULL_WEIGHTS * share * (estimate_seconds(cfg, "reward") - LOAD)
    rewards = {"pooled": reward, "conditioned": reward, "per_group": reward + LOAD * (len(cfg.groups) - 1),
               "mixture": LOAD + (reward - LOAD) * (1 + 8 / (3 * cfg.offline_epochs))}
    rloo = LOAD + 2 * (estimate_seconds(cfg, "rloo") - LOAD)
    offline, online = _split_methods(cfg.policy_methods)
    for mix in cfg.mixes:
        arm = _arm_name(mix)
        stages += [(f"{arm} reward-{m}", rewards[m]) for m in cfg.reward_methods]
        stages += [(f"{arm} {m}", estimate_seconds(cfg, "dpo")) for m in offline]
    stages += [(f"{GOLD} {m}", rloo) for m in online]
    evaluation = estimate_seconds(cfg, "evaluate")
    for conditioned, methods in _eval_batches(cfg):
        for g in cfg.groups if conditioned else [None]:
            stages.append((f"evaluate {_reference_name(g)}", evaluation))
            stages += [(f"evaluate {_suffixed(name, g)}", evaluation) for name in _policy_names(cfg, methods)]
    return stages


def run_diverse_study(cfg: DiverseStudyConfig, *, progress: bool = True) -> Path:
    """Run (or continue) the study in ``cfg.output_dir``; returns the path of report.html. Every job that
    finished in an earlier run with the same settings is skipped (``preftune.experiments.jobs``); a
    killed training run continues from its newest checkpoint."""

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = plan_stages(cfg)
    log.info("diverse study: %d stages, about %.0f minutes on a quiet 2-core CPU (estimated from preftune.experiments.costs)",
             len(stages), sum(sec for _, sec in stages) / 60)
    study = _DiverseStudy(cfg, out, StudyProgress(stages, enabled=progress, label="diverse study"), progress)
    try:
        return study.run()
    finally:
        study.progress.close()


def _arm_name(mix: float) -> str:
    return f"mix{round(mix * 100)}"


def _split_methods(methods: list[str]) -> tuple[list[str], list[str]]:
    """(the policies trained on an arm's pairs, the RL ones trained on the groups' gold rewards, which do
    not depend on the mix and so are trained once for all arms)."""
    return [m for m in methods if not m.startswith("rloo_")], [m for m in methods if m.startswith("rloo_")]


def _policy_names(cfg: DiverseStudyConfig, methods: list[str]) -> list[str]:
    """The distinct policies of ``methods`` over the arms, in training order."""
    names = [policy_name(_arm_name(mix), m) for mix in cfg.mixes for m in methods]
    return sorted(set(names), key=names.index)


def _suffixed(name: str, group: str | None) -> str:
    return name if group is None else f"{name} @{group}"


def _reference_name(group: str | None) -> str:
    """π_ref's evaluation: once on the plain prompts (scored by every group), once per group with the
    group in the prompt (for the conditioned policies)."""
    return "reference" if group is None else f"reference (conditioned) @{group}"


def _eval_batches(cfg: DiverseStudyConfig) -> list[tuple[bool, list[str]]]:
    """The evaluation passes: (prompts conditioned on the group?, policy methods). The plain pass samples
    each policy once and scores it with every group's gold reward; the conditioned one runs per group."""
    plain = [m for m in cfg.policy_methods if m != "dpo_conditioned"]
    conditioned = [m for m in cfg.policy_methods if m == "dpo_conditioned"]
    return [(flag, methods) for flag, methods in ((False, plain), (True, conditioned)) if methods]


class _DiverseStudy(StudyJobs):
    """One run of the study: its jobs in order, each skipped when done earlier (the ledger)."""

    def __init__(self, cfg: DiverseStudyConfig, out: Path, progress_line, progress: bool):
        super().__init__(out, progress_line)
        self.cfg, self.show_bars = cfg, progress
        self.golds = {g: resolve_reward(spec) for g, spec in zip(cfg.groups, cfg.group_rewards)}
        self.configs: dict = {"study": to_dict(cfg)}

    def run(self) -> Path:
        cfg, out = self.cfg, self.out
        train_prompts, test_prompts = (
            [p.prompt for p in part] for part in split_prompts(cfg, load_records(cfg.prompts, "prompts")))
        write_jsonl([{"prompt": p} for p in train_prompts], out / "train_prompts.jsonl")
        train_key, train_samples = self.samples("train", train_prompts, cfg.seed + 1)
        test_key, test_samples = self.samples("test", test_prompts, cfg.seed + 2)
        held_path = out / "held_out_pairs.jsonl"
        held_stats = write_held_out(test_samples, self.golds, held_path)
        held_key = fingerprint(test_key, cfg.groups, cfg.group_rewards)
        arms, trained = {}, {}
        for mix in cfg.mixes:
            arms[_arm_name(mix)], arm_trained = self.arm(mix, train_samples, fingerprint(train_key, mix), held_path, held_key)
            trained.update(arm_trained)
        trained.update(self.online(train_prompts))
        models = self.evaluate_policies(trained, test_prompts, arms)
        for name, arm in arms.items():
            arm["summary"] = minority_summary(arm)
        results = {"settings": {"groups": cfg.groups, "group_rewards": cfg.group_rewards, "mixes": cfg.mixes,
                                "annotators": cfg.annotators, "model": cfg.model, "reward_backbone": cfg.reward_backbone or cfg.model,
                                "pairs_per_prompt": cfg.pairs_per_prompt, "test_prompts": len(test_prompts)},
                   "tables": reward_tables(cfg.groups, arms, held_stats),
                   "models": models, "held_out_pairs": held_stats, "arms": arms,
                   "timings_seconds": {**{k: round(v, 1) for k, v in self.timings.items()},
                                       "total (all jobs, as they ran)": round(sum(self.timings.values()), 1)},
                   "cpu_seconds": {k: v for k, v in self.cpu.items() if v is not None}, "machine": machine()}
        return write_report(results, out, title="Diverse preferences: pooled vs group-aware", configs=self.configs,
                            plots=plots(cfg.groups, results))

    def samples(self, split: str, prompts: list, seed: int) -> tuple[str, list[dict]]:
        """π_ref's sample pairs on the prompts of ``split`` (a job, whose record holds them); (its key, the pairs)."""
        cfg = self.cfg
        more = [] if cfg.pairs_per_prompt == 1 else [cfg.pairs_per_prompt]  # one pair each: the keys of earlier runs
        key = fingerprint("samples", cfg.model, prompts, cfg.max_new_tokens, seed, cfg.seed, *more)
        record = self.job(f"sample {split} pairs", key, lambda: sample_pairs(
            cfg.model, prompts, max_new_tokens=cfg.max_new_tokens, seed=seed, model_seed=cfg.seed, progress=self.show_bars,
            pairs_per_prompt=cfg.pairs_per_prompt))
        return key, record["result"]

    def arm(self, mix: float, samples: list[dict], labels_key: str, held_path: Path, held_key: str) -> tuple[dict, dict]:
        """One mix: its annotators' pairs, the linear EM, the reward models, the policies (trained, not yet
        evaluated). Returns (the arm's results so far, method -> (model folder, its key))."""
        cfg, name = self.cfg, _arm_name(mix)
        arm_dir = self.out / name
        pairs = assign(cfg.groups, cfg.annotators, mix, samples, self.golds)
        counts = {g: sum(r["group"] == g for r in pairs) for g in cfg.groups}
        if min(counts.values()) == 0:
            raise ConfigError(f"{name}: a group has no labelled training pairs ({counts}); use more train_prompts")
        pairs_path = arm_dir / "pairs.jsonl"
        write_jsonl(pairs, pairs_path)
        pairs_key = fingerprint(labels_key, cfg.groups, cfg.group_rewards, cfg.annotators)
        warn_single_label_annotators(load_records(str(pairs_path), "pairs"), str(pairs_path))
        arm = {"pairs": counts, "reward_models": {}, "policies": {},
               "em": fit_linear_em(pairs, len(cfg.groups), cfg.seed, arm_dir / "em_components.json")}
        for method in cfg.reward_methods:
            args = _reward_overrides(cfg, method, pairs_path, held_path, arm_dir / f"reward-{method}", len(pairs))
            key = fingerprint("reward", pairs_key, held_key, key_args(args))
            record = self.job(f"{name} reward-{method}", key, lambda: _train_reward(args, method, key))
            report = record["result"]
            self.configs[f"{name}/reward-{method}"] = report.pop("config")
            arm["reward_models"][method] = {g: v["accuracy"] for g, v in report["groups"].items()}
            if method == "mixture":
                arm["neural_em"] = neural_em(report)
        trained = {}
        for method in _split_methods(cfg.policy_methods)[0]:
            args = _policy_overrides(cfg, method, pairs_path, arm_dir / method, self.out / "train_prompts.jsonl")
            key = fingerprint("policy", pairs_key, key_args(args))
            record = self.job(f"{name} {method}", key, lambda: train_run(args, key, keep_checkpoints=False))
            self.configs[f"{name}/{method}"] = record["result"]["config"]
            trained[policy_name(name, method)] = (record["result"]["model_dir"], key)
        return arm, trained

    def online(self, prompts: list) -> dict:
        """The RL policies on the groups' gold rewards (mean, min): trained once, shared by all arms."""
        cfg, trained = self.cfg, {}
        for method in _split_methods(cfg.policy_methods)[1]:
            run_dir = self.out / GOLD / method
            args = _policy_overrides(cfg, method, None, run_dir, self.out / "train_prompts.jsonl")
            key = fingerprint("policy", prompts, key_args(args))
            record = self.job(f"{GOLD} {method}", key, lambda: train_run(args, key, keep_checkpoints=False))
            self.configs[f"{GOLD}/{method}"] = record["result"]["config"]
            trained[policy_name(GOLD, method)] = (record["result"]["model_dir"], key)
        return trained

    def evaluate_policies(self, trained: dict, prompts: list, arms: dict) -> dict:
        """Each group's gold reward and KL to π_ref of every policy. The plain policies are sampled once
        (π_ref too) and scored with every group's gold reward; the conditioned ones, and π_ref, once per
        group with the group in the prompt. Fills each arm's ``policies``; returns label -> metrics."""
        cfg, models = self.cfg, {}
        for conditioned, methods in _eval_batches(cfg):
            names = _policy_names(cfg, methods)
            for g in cfg.groups if conditioned else [None]:
                golds = {g: self.golds[g]} if conditioned else self.golds
                done = self._evaluate_pass(names, g, golds, trained, prompts)
                for g2 in golds:
                    reference = done[REFERENCE]["extra_rewards"][g2]["mean"]
                    for name in names:
                        models[f"{name} @{g2}"] = entry = _group_metrics(done[_suffixed(name, g)], g2, next(iter(golds)), reference)
                        for arm in arms:
                            method = name.split("/")[1]
                            if method in methods and policy_name(arm, method) == name:
                                arms[arm]["policies"].setdefault(method, {})[g2] = {
                                    "gold_reward": entry["reward_mean"], "kl": entry["kl"], "reference_gold_reward": reference}
        return models

    def _evaluate_pass(self, names: list[str], group: str | None, golds: dict, trained: dict, prompts: list) -> dict:
        """One evaluation pass (π_ref sampled once), on prompts carrying ``group`` when given, scored with
        ``golds``; name -> metrics, π_ref's under REFERENCE."""
        cfg = self.cfg
        group_prompts = prompts if group is None else [condition_prompt(p, group) for p in prompts]
        specs = {_suffixed(n, group): trained[n][0] for n in names}
        keys = {_suffixed(n, group): trained[n][1] for n in names}
        specs_of = [cfg.group_rewards[cfg.groups.index(g)] for g in golds]
        base = fingerprint("evaluate", cfg.model, group_prompts, list(golds), specs_of, cfg.eval_samples, cfg.max_new_tokens, cfg.seed)

        def run(pending: dict, on_model) -> dict:
            return evaluate(pending, cfg.model, group_prompts, next(iter(golds.values())), extra_rewards=golds,
                            num_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=16,
                            progress=self.show_bars, algorithms={name: name.split("/")[1].split(" @")[0] for name in pending},
                            on_model=on_model)

        _, done = self.evaluate(specs, keys, base, run, reference=_reference_name(group),
                                settings=f"evaluate settings {_reference_name(group)}")
        return done


def _group_metrics(metrics: dict, group: str, primary: str, reference: float) -> dict:
    """A policy's evaluation as seen by ``group``: its gold reward in ``reward_mean/se`` (the win rate
    only where it was computed with that group's reward, ``primary``)."""
    score = metrics["extra_rewards"][group]
    method = metrics["algorithm"]
    return {**metrics, "reward_mean": score["mean"], "reward_se": score["se"], "algorithm": f"{method} @{group}",
            "win_rate": metrics["win_rate"] if group == primary else None, "reference_reward_mean": reference}


def _common(cfg: DiverseStudyConfig, out: Path) -> list[str]:
    return [f"output_dir={out}", f"model.name={cfg.model}", f"data.max_length={cfg.max_length}", f"train.seed={cfg.seed}",
            f"train.micro_batch_size={cfg.micro_batch_size}", "train.overwrite_output_dir=true", "train.lr_scheduler=constant",
            "train.warmup_steps=1", "train.progress_bar=false", f"train.save_steps={cfg.save_steps}"]


def _reward_overrides(cfg: DiverseStudyConfig, method: str, pairs: Path, held: Path, out: Path, num_pairs: int) -> list[str]:
    extra = [f"reward.groups={method}", *([f"reward.backbone={cfg.reward_backbone}"] if cfg.reward_backbone else [])]
    if method == "mixture":
        # The EM's schedule follows the run's length: a quarter pooled warm-up, then 6 E-steps or so.
        steps = -(-num_pairs // cfg.micro_batch_size) * cfg.offline_epochs
        extra += [f"reward.num_components={len(cfg.groups)}", f"reward.em_warmup_steps={max(1, steps // 4)}",
                  f"reward.em_interval_steps={max(1, steps // 8)}"]
    return ["algorithm=reward", *_common(cfg, out), f"data.path={pairs}", f"data.eval_path={held}",
            f"train.num_epochs={cfg.offline_epochs}", f"train.learning_rate={cfg.reward_learning_rate}", *extra, *cfg.train_overrides]


def _train_reward(args: list[str], method: str, key: str) -> dict:
    """Train the reward model(s) of ``reward.groups = method``, each continuing a killed run of the same
    key (a finished one is kept) and deleting its checkpoints when done: {"groups": {g: held-out report},
    "config"} (the mixture's: {"groups": {g: its component's report}, "components", "em", "config"})."""
    run = load_run_config(None, args)
    report: dict = {"groups": {}}
    for member in ALGORITHMS["reward"].member_runs(run):  # per_group: one run per group
        member_key = fingerprint(key, str(member.output_dir))
        if not finished(member.output_dir, member_key):
            train_resumable(member, member_key, keep_checkpoints=False)
        result = json.loads((Path(member.output_dir) / "reward_eval.json").read_text())
        report["groups"].update(result["groups"])
    if method == "mixture":
        report["components"] = result["components"]
        report["em"] = json.loads((Path(run.output_dir) / "em_components.json").read_text())
    report["config"] = run_config_to_dict(run)
    return report


def _policy_overrides(cfg: DiverseStudyConfig, method: str, pairs: Path, out: Path, prompts: Path) -> list[str]:
    lora = [f"model.lora.enabled={str(cfg.lora).lower()}", "model.lora.dropout=0.0", f"train.learning_rate={cfg.learning_rate}"]
    if method.startswith("rloo_"):
        reward = f"{method.split('_')[1]}({' | '.join(cfg.group_rewards)})"
        extra = ["algorithm=rloo", f"data.path={prompts}", f"train.max_steps={cfg.online_steps}", f"rloo.reward={reward}",
                 f"rloo.max_new_tokens={cfg.max_new_tokens}", f"rloo.kl_coef={cfg.kl_coef}", "train.grad_accum_steps=2"]
    else:
        algo = "grdpo" if method == "grdpo" else "dpo"
        extra = [f"algorithm={algo}", f"data.path={pairs}", f"train.num_epochs={cfg.offline_epochs}", f"{algo}.beta={cfg.beta}"]
        if method == "dpo_conditioned":
            extra.append("dpo.condition_on_group=true")
    return [*extra, *_common(cfg, out), *lora, *cfg.train_overrides]
