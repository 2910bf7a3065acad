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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.algorithms import ALGORITHMS
from preftune.config import ConfigError, apply_overrides, doc, from_dict, read_yaml, run_config_to_dict, to_dict
from preftune.data.groups import assignment_accuracy, condition_prompt, warn_single_label_annotators
from preftune.data.loaders import load_records
from preftune.eval.evaluate import REFERENCE, evaluate
from preftune.eval.plots import bar_plot, frontier_plot
from preftune.eval.report import write_report
from preftune.experiments.costs import LOAD, estimate_seconds
from preftune.experiments.sentiment import split_prompts
from preftune.losses.diverse import fit_bt_mixture
from preftune.models.cache import write_jsonl
from preftune.models.loading import load_model
from preftune.rewards.sentiment import VaderSentiment
from preftune.rewards.spec import resolve_reward
from preftune.rollout.sampling import generate_completions
from preftune.run_config import load_run_config
from preftune.train.loop import train

log = logging.getLogger("preftune.experiments")

POLICY_METHODS = ("dpo", "grdpo", "dpo_conditioned", "rloo_mean", "rloo_min")
REWARD_METHODS = ("pooled", "per_group", "conditioned", "mixture")


def calm(prompts, completions) -> list[float]:
    """Group B's gold reward: calm, short continuations: −0.05 per word − 0.5 per '!'."""
    return [-0.05 * len(c.split()) - 0.5 * c.count("!") for c in completions]


def longer(prompts, completions) -> list[float]:
    """A stand-in for sentiment on tiny random models (whose text VADER scores 0): characters / 10."""
    return [len(c) / 10 for c in completions]


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
    offline_epochs: int = doc(2, "Passes over the pairs (reward models and DPO-family policies).")
    online_steps: int = doc(20, "Rollouts of the RLOO policies.")
    micro_batch_size: int = doc(8, "Rows per forward pass.")
    train_overrides: list[str] = doc(factory=list, help="Extra dotted overrides for every training run (e.g. model.dtype=bf16).")
    eval_samples: int = doc(2, "Completions per test prompt, model and group in the evaluation.")
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
        if self.test_prompts > self.held_out or self.train_prompts < 2:
            raise ConfigError(f"{path}: need train_prompts >= 2 and test_prompts <= held_out")


def load_diverse_config(path: str | None, overrides: list[str]) -> DiverseStudyConfig:
    data = read_yaml(path) if path else {}
    return from_dict(DiverseStudyConfig, apply_overrides(data, overrides), "study")


def plan_stages(cfg: DiverseStudyConfig) -> list[tuple[str, float]]:
    """Every stage of the study with its estimated seconds on a quiet 2-core CPU, from the per-row costs of
    ``preftune.experiments.costs`` (measured on the sentiment study's SmolLM2 LoRA runs; this study's reward
    models train all weights, its RLOO steps accumulate 2 micro-batches, and each policy is evaluated per
    group together with π_ref). The mixture adds ~8 forward passes over the pairs (its E-steps)."""
    sample = estimate_seconds(cfg, "pairs") + estimate_seconds(dataclasses.replace(cfg, train_prompts=cfg.test_prompts), "pairs")
    reward = estimate_seconds(cfg, "reward")
    rewards = {"pooled": reward, "conditioned": reward, "per_group": reward + LOAD * (len(cfg.groups) - 1),
               "mixture": LOAD + (reward - LOAD) * (1 + 8 / (3 * cfg.offline_epochs))}
    stages = [("sample pairs", sample)]
    for mix in cfg.mixes:
        arm = _arm_name(mix)
        stages += [(f"{arm} reward-{m}", rewards[m]) for m in cfg.reward_methods]
        for m in cfg.policy_methods:
            rloo = LOAD + 2 * (estimate_seconds(cfg, "rloo") - LOAD)
            stages.append((f"{arm} {m}", rloo if m.startswith("rloo_") else estimate_seconds(cfg, "dpo")))
            stages += [(f"{arm} evaluate {m} @{g}", 2 * estimate_seconds(cfg, "evaluate")) for g in cfg.groups]
    return stages


def run_diverse_study(cfg: DiverseStudyConfig, *, progress: bool = True) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("diverse study: about %.0f minutes on a quiet 2-core CPU (estimated from preftune.experiments.costs)",
             sum(sec for _, sec in plan_stages(cfg)) / 60)
    t0, timings = time.perf_counter(), {}

    train, test = split_prompts(cfg, load_records(cfg.prompts, "prompts"))
    golds = _gold_sources(cfg)
    train_samples = _sample_pairs(cfg, [p.prompt for p in train], cfg.seed + 1, progress)
    test_samples = _sample_pairs(cfg, [p.prompt for p in test], cfg.seed + 2, progress)
    held_path, held_stats = _write_held_out(cfg, test_samples, golds, out)
    timings["sample pairs"] = time.perf_counter() - t0
    arms, models, configs = {}, {}, {"study": _as_dict(cfg)}
    for mix in cfg.mixes:
        start = time.perf_counter()
        arm, arm_models, arm_configs = _run_arm(cfg, mix, train_samples, golds, held_path, [p.prompt for p in test], out, progress)
        arms[_arm_name(mix)], timings[_arm_name(mix)] = arm, time.perf_counter() - start
        models.update(arm_models)
        configs.update(arm_configs)
    timings["total"] = time.perf_counter() - t0
    results = {"settings": {"groups": cfg.groups, "group_rewards": cfg.group_rewards, "mixes": cfg.mixes,
                            "annotators": cfg.annotators, "model": cfg.model, "test_prompts": len(test)},
               "models": models, "held_out_pairs": held_stats, "arms": arms,
               "timings_seconds": {k: round(v, 1) for k, v in timings.items()}}
    return write_report(results, out, title="Diverse preferences: pooled vs group-aware", configs=configs, plots=_plots(cfg, results))


def _arm_name(mix: float) -> str:
    return f"mix{round(mix * 100)}"


def _gold_sources(cfg: DiverseStudyConfig) -> dict:
    return {g: resolve_reward(spec) for g, spec in zip(cfg.groups, cfg.group_rewards)}


def _sample_pairs(cfg: DiverseStudyConfig, prompts: list, seed: int, progress: bool) -> list[dict]:
    """Two samples per prompt from π_ref: [{"prompt", "a", "b"}] (identical samples dropped)."""

    model, tok = load_model(cfg.model, seed=cfg.seed)
    rows = generate_completions(model, tok, [p for p in prompts for _ in range(2)], max_new_tokens=cfg.max_new_tokens,
                                temperature=1.0, batch_size=16, seed=seed, progress=progress)
    del model
    pairs = [{"prompt": a["prompt"], "a": a["completion"], "b": b["completion"]} for a, b in zip(rows[::2], rows[1::2])]
    return [p for p in pairs if p["a"].strip() and p["b"].strip() and p["a"] != p["b"]]


def _label(pairs: list[dict], gold, group: str, annotator: str | None = None) -> list[dict]:
    """Rows {prompt, chosen, rejected, group(, annotator)} by ``gold``; ties dropped."""
    if not pairs:
        return []
    prompts = [p["prompt"] for p in pairs]
    sa, sb = gold(prompts, [p["a"] for p in pairs]), gold(prompts, [p["b"] for p in pairs])
    out = []
    for p, x, y in zip(pairs, sa, sb):
        if x == y:
            continue
        win, lose = (p["a"], p["b"]) if x > y else (p["b"], p["a"])
        row = {"prompt": p["prompt"], "chosen": win, "rejected": lose, "group": group}
        out.append(row if annotator is None else {**row, "annotator": annotator})
    return out


def _write_held_out(cfg, samples: list[dict], golds: dict, out: Path) -> tuple[Path, dict]:
    """Every held-out pair labelled by every group (ties dropped per group) -> held_out_pairs.jsonl."""

    rows, stats = [], {}
    for g, gold in golds.items():
        labelled = _label(samples, gold, g)
        if not labelled:
            raise ConfigError(f"no held-out pair could be labelled for group {g!r} (all ties); use more test_prompts")
        stats[g] = len(labelled)
        rows += labelled
    stats["disagreement_rate"] = disagreement_rate(samples, list(golds.values())[:2])
    path = out / "held_out_pairs.jsonl"
    write_jsonl(rows, path)
    return path, stats


def disagreement_rate(samples: list[dict], golds: list) -> float | None:
    """Share of the pairs both rewards order strictly on which they order oppositely."""
    if not samples:
        return None
    prompts = [p["prompt"] for p in samples]
    diffs = []
    for gold in golds:
        a, b = gold(prompts, [p["a"] for p in samples]), gold(prompts, [p["b"] for p in samples])
        diffs.append([x - y for x, y in zip(a, b)])
    strict = [(d1, d2) for d1, d2 in zip(*diffs) if d1 != 0 and d2 != 0]
    return sum((d1 > 0) != (d2 > 0) for d1, d2 in strict) / len(strict) if strict else None


def _assign(cfg, mix: float, samples: list[dict], golds: dict) -> list[dict]:
    """Round-robin pairs to annotators; the first round(mix·n) annotators are in the first group, the
    rest spread over the other groups; each labels with their group's gold reward."""
    n_first = round(mix * cfg.annotators)
    others = cfg.groups[1:]
    members = [cfg.groups[0]] * n_first + [others[i % len(others)] for i in range(cfg.annotators - n_first)]
    rows = []
    for i, pair in enumerate(samples):
        a = i % cfg.annotators
        rows += _label([pair], golds[members[a]], members[a], annotator=f"{members[a]}-{a}")
    return rows


def _run_arm(cfg, mix, samples, golds, held_path, test_prompts, out, progress):
    name = _arm_name(mix)
    arm_dir = out / name
    pairs = _assign(cfg, mix, samples, golds)
    counts = {g: sum(r["group"] == g for r in pairs) for g in cfg.groups}
    if min(counts.values()) == 0:
        raise ConfigError(f"{name}: a group has no labelled training pairs ({counts}); use more train_prompts")
    pairs_path = arm_dir / "pairs.jsonl"
    write_jsonl(pairs, pairs_path)

    warn_single_label_annotators(load_records(str(pairs_path), "pairs"), str(pairs_path))
    arm = {"pairs": counts, "reward_models": {}, "policies": {}, "em": _em(cfg, pairs, arm_dir)}
    configs = {}
    for method in cfg.reward_methods:
        report, configs[f"{name}/reward-{method}"] = _train_reward(cfg, method, pairs_path, held_path, arm_dir / f"reward-{method}",
                                                                   len(pairs))
        arm["reward_models"][method] = {g: v["accuracy"] for g, v in report["groups"].items()}
        if method == "mixture":
            arm["neural_em"] = _neural_em(report)
    models = {}
    for method in cfg.policy_methods:
        model_dir, configs[f"{name}/{method}"] = _train_policy(cfg, method, pairs_path, arm_dir, test_prompts)
        for g in cfg.groups:
            metrics = _evaluate(cfg, method, model_dir, g, golds[g], test_prompts, progress)
            label = f"{name}/{method} @{g}"
            models[label] = {**metrics, "algorithm": f"{method} @{g}"}
            arm["policies"].setdefault(method, {})[g] = {"gold_reward": metrics["reward_mean"], "kl": metrics["kl"],
                                                         "reference_gold_reward": metrics["reference_reward_mean"]}
    arm["summary"] = _summary(cfg, arm)
    return arm, models, configs


def _common(cfg, out: Path) -> list[str]:
    return [f"output_dir={out}", f"model.name={cfg.model}", f"data.max_length={cfg.max_length}", f"train.seed={cfg.seed}",
            f"train.micro_batch_size={cfg.micro_batch_size}", "train.overwrite_output_dir=true", "train.lr_scheduler=constant",
            "train.warmup_steps=1", "train.progress_bar=false"]


def _train_reward(cfg, method: str, pairs: Path, held: Path, out: Path, num_pairs: int) -> tuple[dict, dict]:
    """Train the reward model(s) of ``reward.groups = method``; {"groups": {g: held-out report}} + config
    (the mixture's: {"groups": {g: its component's report}, "components", "em"})."""

    extra = [f"reward.groups={method}"]
    if method == "mixture":
        # The EM's schedule follows the run's length: a quarter pooled warm-up, then 6 E-steps or so.
        steps = -(-num_pairs // cfg.micro_batch_size) * cfg.offline_epochs
        extra += [f"reward.num_components={len(cfg.groups)}", f"reward.em_warmup_steps={max(1, steps // 4)}",
                  f"reward.em_interval_steps={max(1, steps // 8)}"]
    run = load_run_config(None, ["algorithm=reward", *_common(cfg, out), f"data.path={pairs}", f"data.eval_path={held}",
                                 f"train.num_epochs={cfg.offline_epochs}", f"train.learning_rate={cfg.reward_learning_rate}",
                                 *extra, *cfg.train_overrides])
    report = {"groups": {}}
    for member in ALGORITHMS["reward"].member_runs(run):  # per_group: one run per group
        train(member)
        result = json.loads((Path(member.output_dir) / "reward_eval.json").read_text())
        report["groups"].update(result["groups"])
    if method == "mixture":
        report["components"] = result["components"]
        report["em"] = json.loads((out / "em_components.json").read_text())
    return report, run_config_to_dict(run)


def _neural_em(report: dict) -> dict:
    """The neural mixture's components: their annotators, prior and held-out accuracy per group; which
    component serves each group; how many annotators landed with their own group (up to labels)."""
    return {"assignment_accuracy": report["em"].get("assignment_accuracy"),
            "components": {k: {"annotators": c["annotators"], "prior": c["prior"],
                               "accuracy": {g: v["accuracy"] for g, v in c["groups"].items()}}
                           for k, c in report["components"].items()},
            "serves": {g: v["component"] for g, v in report["groups"].items()},
            "annotators": {a: {"component": v["component"], "responsibilities": v["responsibilities"]}
                           for a, v in report["em"]["annotators"].items()}}


def _train_policy(cfg, method: str, pairs: Path, arm_dir: Path, test_prompts: list) -> tuple[Path, dict]:
    lora = [f"model.lora.enabled={str(cfg.lora).lower()}", "model.lora.dropout=0.0", f"train.learning_rate={cfg.learning_rate}"]
    if method.startswith("rloo_"):
        rule = method.split("_")[1]
        prompts = arm_dir.parent / "train_prompts.jsonl"
        if not prompts.exists():
            write_jsonl([{"prompt": r["prompt"]} for r in _read_jsonl(pairs)], prompts)
        reward = f"{rule}({' | '.join(cfg.group_rewards)})"
        extra = ["algorithm=rloo", f"data.path={prompts}", f"train.max_steps={cfg.online_steps}", f"rloo.reward={reward}",
                 f"rloo.max_new_tokens={cfg.max_new_tokens}", f"rloo.kl_coef={cfg.kl_coef}", "train.grad_accum_steps=2"]
    else:
        algo = "grdpo" if method == "grdpo" else "dpo"
        extra = [f"algorithm={algo}", f"data.path={pairs}", f"train.num_epochs={cfg.offline_epochs}", f"{algo}.beta={cfg.beta}"]
        if method == "dpo_conditioned":
            extra.append("dpo.condition_on_group=true")
    run = load_run_config(None, [*extra, *_common(cfg, arm_dir / method), *lora, *cfg.train_overrides])
    result = train(run)
    return result.model_dir, run_config_to_dict(run)


def _evaluate(cfg, method: str, model_dir: Path, group: str, gold, prompts: list, progress: bool) -> dict:
    """Gold reward of ``group`` and KL to π_ref; a conditioned policy (and π_ref) get the group in the prompt."""

    if method == "dpo_conditioned":
        prompts = [condition_prompt(p, group) for p in prompts]
    res = evaluate({method: str(model_dir)}, cfg.model, prompts, gold, num_samples=cfg.eval_samples,
                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=16, progress=progress)
    metrics = res["models"][method]
    return {**metrics, "reference_reward_mean": res["models"][REFERENCE]["reward_mean"]}


def _em(cfg, pairs: list[dict], arm_dir: Path) -> dict:
    """EM over a mixture of K linear BT models on completion features, without the group labels."""

    texts = sorted({t for r in pairs for t in (r["chosen"], r["rejected"])})
    index = {t: i for i, t in enumerate(texts)}
    vader = VaderSentiment()([""] * len(texts), texts)
    feats = torch.tensor([[v, len(t.split()) / 10, t.count("!"), len(t) / 50] for v, t in zip(vader, texts)], dtype=torch.float32)
    annotators = sorted({r["annotator"] for r in pairs})
    a_index = {a: i for i, a in enumerate(annotators)}
    fit = fit_bt_mixture(torch.tensor([index[r["chosen"]] for r in pairs]), torch.tensor([index[r["rejected"]] for r in pairs]),
                         torch.tensor([a_index[r["annotator"]] for r in pairs]), num_items=len(texts),
                         num_annotators=len(annotators), num_components=min(len(cfg.groups), len(annotators)), features=feats,
                         iterations=15, m_steps=30, restarts=3, seed=cfg.seed)
    truth = {a: a.rsplit("-", 1)[0] for a in annotators}
    resp = fit["responsibilities"].tolist()
    component = [max(range(len(r)), key=r.__getitem__) for r in resp]
    correct, names = assignment_accuracy([truth[a] for a in annotators], component)
    em = {"features": ["vader", "words/10", "exclamations", "chars/50"], "weights": fit["weights"].tolist(),
          "prior": fit["prior"].tolist(), "assignment_accuracy": correct,
          "annotators": {a: {"group": truth[a], "component": c, "component_group": names[c], "responsibilities": r}
                         for a, c, r in zip(annotators, component, resp)}}
    arm_dir.mkdir(parents=True, exist_ok=True)
    (arm_dir / "em_components.json").write_text(json.dumps(em, indent=2) + "\n")
    return em


def _summary(cfg, arm: dict) -> dict:
    """The minority's loss under pooling, and what the group-aware methods recover."""
    minority = min(arm["pairs"], key=arm["pairs"].get)
    out = {"minority": minority}
    for method, accuracy in arm["reward_models"].items():
        out[f"minority_rm_accuracy_{method}"] = accuracy.get(minority)
    pol = arm["policies"]
    for method, per_group in pol.items():
        g = per_group[minority]
        out[f"minority_gold_gain_{method}"] = g["gold_reward"] - g["reference_gold_reward"]
    return out


def _plots(cfg, results: dict) -> dict[str, bytes]:
    plots = {}
    for g in cfg.groups:
        points = [{"algorithm": label.split("/")[1].split(" @")[0], "label": label.split("/")[0], "kl": m["kl"],
                   "reward": m["reward_mean"], "kl_se": m.get("kl_se"), "reward_se": m.get("reward_se")}
                  for label, m in results["models"].items() if label.endswith(f"@{g}")]
        refs = [m["reference_reward_mean"] for label, m in results["models"].items() if label.endswith(f"@{g}")]
        if refs:
            points.append({"algorithm": "reference", "label": "π_ref", "kl": 0.0, "reward": refs[0]})
        plots[f"group_{g}_reward_vs_kl"] = frontier_plot(points, title=f"Group {g}: its gold reward vs KL to π_ref",
                                                         reward_label=f"gold reward of group {g}")
    names, values = [], []
    for arm, data in results["arms"].items():
        for a, info in data["em"]["annotators"].items():
            names.append(f"{arm} {a}")
            values.append(info["responsibilities"][0])
    plots["em_components"] = bar_plot(names, values, ylabel="P(component 0 | labels)", title="EM: annotators' responsibilities")
    neural = [(f"{arm} {a} ({info['component']})", info["responsibilities"][0]) for arm, data in results["arms"].items()
              for a, info in data.get("neural_em", {}).get("annotators", {}).items()]
    if neural:
        plots["neural_em_components"] = bar_plot([n for n, _ in neural], [v for _, v in neural], ylabel="P(component 0 | labels)",
                                                 title="Neural reward mixture: annotators' responsibilities (component)")
    rm_names, rm_values = [], []
    for arm, data in results["arms"].items():
        for method, acc in data["reward_models"].items():
            for g, v in acc.items():
                rm_names.append(f"{arm} {method} @{g}")
                rm_values.append(v)
    if rm_names:
        plots["reward_model_accuracy"] = bar_plot(rm_names, rm_values, ylabel="held-out accuracy", hline=0.5,
                                                  title="Reward-model accuracy per group")
    return plots


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _as_dict(cfg) -> dict:
    return to_dict(cfg)


def summary(report: Path) -> str:
    data = json.loads((report.parent / "results.json").read_text())
    lines = [f"{'arm / method':28s} " + " ".join(f"{'RM acc ' + g:>10s} {'gold ' + g:>9s} {'KL ' + g:>7s}" for g in data["settings"]["groups"])]
    for arm, a in data["arms"].items():
        for method, acc in a["reward_models"].items():
            lines.append(f"{arm + ' reward-' + method:28s} " + " ".join(f"{acc.get(g, float('nan')):10.3f} {'':>9s} {'':>7s}" for g in data["settings"]["groups"]))
        for k, c in a.get("neural_em", {}).get("components", {}).items():
            accuracy = ", ".join(f"{g} {v:.3f}" for g, v in c["accuracy"].items())
            lines.append(f"{arm + ' mixture component ' + k:28s} annotators {', '.join(c['annotators'])}; accuracy {accuracy}")
        for method, per_group in a["policies"].items():
            lines.append(f"{arm + ' ' + method:28s} " + " ".join(
                f"{'':>10s} {per_group[g]['gold_reward']:9.3f} {per_group[g]['kl']:7.2f}" for g in data["settings"]["groups"]))
    return "\n".join(lines)
