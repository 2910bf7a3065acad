"""The controlled-sentiment study (the DPO paper's IMDB experiment, on the project's own prompts):
make a model continue movie-review openings more positively, with VADER as the gold reward.

    π_ref   the starting model (default: the packaged SmolLM2-135M-Instruct)
    pairs   2 samples per training prompt from π_ref; VADER picks the winner (ties dropped)
    train   any mix of jobs: DPO (several β), IPO, KTO, SFT on the preferred completions, the
            unlikelihood baseline (from the pairs); RLOO / PPO / best-of-n / REINFORCE (online, VADER)
    proxy   optionally a reward model on the same pairs, for the over-optimisation curves: best-of-n
            picking by it, and an RL job (proxy_rl) optimising it, evaluated at its checkpoints
    eval    gold reward, KL to π_ref, win rate vs π_ref, length, samples — on held-out test prompts
    report  results.json, the reward-KL frontier, report.html

Built only from the public API (load_run_config / train / evaluate / write_report). `preftune demo`
runs the short default; `preftune study CONFIG.yaml` runs any other mix (configs/studies/sentiment.yaml
is the full study).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from preftune.config import ConfigError, doc

log = logging.getLogger("preftune.experiments")

OFFLINE = {"dpo", "cdpo", "robust_dpo", "ipo", "hinge", "ref_free_dpo", "simpo", "orpo", "unlikelihood", "kto", "sft"}
ONLINE = {"rloo", "ppo", "best_of_n", "reinforce"}


@dataclass
class StudyConfig:
    output_dir: str = doc("runs/demo", "Where pairs, training runs, results.json, the plots and report.html go.")
    model: str = doc("smollm2-135m-instruct", "π_ref and the starting point of every job (any model.name).")
    prompts: str = doc(
        "builtin:movie_review_prompts",
        "Prompts file; its last `held_out` rows are the fixed test split, the rows before them the train split.",
    )
    held_out: int = doc(
        60, "Size of the fixed test split: the last rows of the prompts file, never used for pairs or training "
        "(the built-in 300 prompts: 240 train, 60 test). Keep it fixed across studies so their numbers compare.",
    )
    train_prompts: int = doc(96, "Prompts used to collect preference pairs and for online RL: the first rows of the train split.")
    test_prompts: int = doc(48, "Prompts evaluated: the first rows of the test split.")
    gold_reward: str = doc("vader", "The gold reward that labels pairs and scores the evaluation (any reward spec).")
    max_new_tokens: int = doc(24, "Tokens sampled per completion (pairs, rollouts and evaluation).")
    max_length: int = doc(80, "Prompt + completion tokens in training.")
    jobs: list[str] = doc(
        factory=lambda: ["dpo:beta=0.05", "dpo:beta=0.2", "dpo:beta=1.0", "rloo:kl_coef=0.02", "rloo:kl_coef=0.2"],
        help="Training jobs 'ALGORITHM[:key=value,...]' (keys of the algorithm's section). 'sft' trains on the "
        "preferred completions; offline jobs read the collected pairs, online ones the training prompts.",
    )
    lora: bool = doc(True, "Train LoRA adapters (r=16) instead of all weights.")
    learning_rate: float = doc(5e-4, "Learning rate of every job.")
    offline_epochs: int = doc(2, "Passes over the pairs for offline jobs.")
    online_steps: int = doc(20, "Optimizer steps (rollouts) of online jobs.")
    micro_batch_size: int = doc(8, "Rows per forward pass.")
    train_overrides: list[str] = doc(factory=list, help="Extra dotted overrides applied to every training job (e.g. model.dtype=bf16).")
    proxy_reward_model: bool = doc(
        False, "Also train a reward model on the pairs and plot best-of-n's gold vs proxy reward (over-optimisation)."
    )
    best_of_n: list[int] = doc(factory=lambda: [1, 2, 4, 8], help="n values of the over-optimisation curve.")
    proxy_rl: Optional[str] = doc(
        None,
        "An online job 'ALGORITHM[:key=value,...]' (e.g. 'rloo:kl_coef=0.01') trained against the proxy reward "
        "model instead of the gold reward; each of its checkpoints is evaluated with both rewards and drawn on "
        "the over-optimisation plot. Needs proxy_reward_model. null = off.",
    )
    proxy_rl_checkpoints: int = doc(4, "Evenly spaced checkpoints of the proxy_rl job that are evaluated (the last one is its final step).")
    eval_samples: int = doc(2, "Completions per test prompt and model in the evaluation.")
    seed: int = doc(0, "Seed of sampling and training.")

    def validate(self, path: str) -> None:
        if self.train_prompts < 2 or self.test_prompts < 1:
            raise ConfigError(f"{path}: need train_prompts >= 2 and test_prompts >= 1")
        if self.test_prompts > self.held_out:
            raise ConfigError(f"{path}.test_prompts: {self.test_prompts} is more than the test split (held_out = {self.held_out})")
        for job in self.jobs:
            name = job.split(":")[0]
            if name not in OFFLINE | ONLINE:
                raise ConfigError(f"{path}.jobs: unknown algorithm '{name}' in '{job}'. Valid: {', '.join(sorted(OFFLINE | ONLINE))}")
        if self.proxy_rl is not None:
            name = self.proxy_rl.split(":")[0]
            if name not in ONLINE:
                raise ConfigError(f"{path}.proxy_rl: '{name}' is not an online algorithm. Valid: {', '.join(sorted(ONLINE))}")
            if not self.proxy_reward_model:
                raise ConfigError(f"{path}.proxy_rl: needs proxy_reward_model: true (the reward it optimises)")
            if not 1 <= self.proxy_rl_checkpoints <= self.online_steps:
                raise ConfigError(f"{path}.proxy_rl_checkpoints: must be between 1 and online_steps ({self.online_steps})")


def parse_job(job: str) -> tuple[str, str, list[str]]:
    """'dpo:beta=0.1' -> ('dpo', 'dpo-beta0.1', ['dpo.beta=0.1'])."""
    name, _, rest = job.partition(":")
    settings = [kv for kv in rest.split(",") if kv]
    label = name + "".join(f"-{kv.replace('=', '')}" for kv in settings)
    section = "sft" if name == "sft" else name
    return name, label, [f"{section}.{kv}" for kv in settings]


def run_study(cfg: StudyConfig, *, progress: bool = True) -> Path:
    from preftune.data.loaders import load_records
    from preftune.eval.evaluate import best_of_n_curve, evaluate
    from preftune.eval.plots import bar_plot, frontier_plot, overoptimization_plot
    from preftune.eval.report import write_report

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    prompts = load_records(cfg.prompts, "prompts")
    train, test = split_prompts(cfg, prompts)

    start = time.perf_counter()
    pairs_path, pair_stats = collect_pairs(cfg, train, out, progress=progress)
    timings["collect pairs"] = time.perf_counter() - start

    models, configs = {}, {"study": _as_dict(cfg)}
    for job in cfg.jobs:
        name, label, overrides = parse_job(job)
        start = time.perf_counter()
        model_dir, run_cfg = train_job(cfg, name, label, overrides, pairs_path, out)
        timings[f"train {label}"] = time.perf_counter() - start
        models[label] = str(model_dir)
        configs[label] = run_cfg

    proxy, algorithms, proxy_rl_models = None, {}, []
    if cfg.proxy_reward_model:
        start = time.perf_counter()
        proxy, configs["proxy_reward_model"] = train_proxy(cfg, pairs_path, out)
        timings["train proxy reward model"] = time.perf_counter() - start
    if cfg.proxy_rl is not None:
        start = time.perf_counter()
        name, label, overrides = parse_job(cfg.proxy_rl)
        label += "-on-proxy"
        every = cfg.online_steps // cfg.proxy_rl_checkpoints
        overrides += [f"{name}.reward={proxy}", f"train.save_steps={every}", f"train.save_total_limit={cfg.proxy_rl_checkpoints + 1}"]
        run_dir, configs[label] = train_job(cfg, name, label, overrides, pairs_path, out)
        from preftune.train.checkpoint import list_checkpoints

        for checkpoint in list_checkpoints(run_dir.parent)[-cfg.proxy_rl_checkpoints:]:
            step = int(checkpoint.name.split("-")[1])
            models[f"{label}@{step}"] = str(checkpoint)
            algorithms[f"{label}@{step}"] = f"{name} on proxy"
            proxy_rl_models.append(f"{label}@{step}")
        timings[f"train {label}"] = time.perf_counter() - start

    start = time.perf_counter()
    results = evaluate(
        models, cfg.model, [p.prompt for p in test], cfg.gold_reward, proxy_reward=proxy,
        num_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=16, progress=progress,
        algorithms=algorithms,
    )
    timings["evaluate"] = time.perf_counter() - start
    plots = {"frontier": frontier_plot(frontier_points(results), title="Gold reward (VADER) vs KL to π_ref")}
    plots["reward"] = bar_plot_of(results, bar_plot)
    if proxy is not None:
        start = time.perf_counter()
        curve = best_of_n_curve(cfg.model, [p.prompt for p in test], cfg.gold_reward, proxy, cfg.best_of_n,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=16, progress=progress)
        results["best_of_n"] = curve
        rl_points = [{"label": m, "group": algorithms[m], "kl": results["models"][m]["kl"],
                      "gold": results["models"][m]["reward_mean"], "proxy": results["models"][m].get("proxy_reward_mean")}
                     for m in proxy_rl_models]
        plots["overoptimization"] = overoptimization_plot(curve["kl"], curve["gold_mean"], curve["proxy_mean"], ns=curve["n"],
                                                          points=rl_points)
        timings["best-of-n curve"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - t0
    results["pairs"] = pair_stats
    results["timings_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    return write_report(results, out, title="Sentiment control: preference tuning vs RL", configs=configs, plots=plots)


def split_prompts(cfg: StudyConfig, prompts: list) -> tuple[list, list]:
    """(train, test): the first ``train_prompts`` rows before the fixed test split (the last
    ``held_out`` rows), and the first ``test_prompts`` rows of that split."""
    available = len(prompts) - cfg.held_out
    if available < cfg.train_prompts:
        raise ConfigError(f"{cfg.prompts} has {len(prompts)} prompts: {max(available, 0)} before the test split "
                          f"(held_out = {cfg.held_out}), fewer than train_prompts = {cfg.train_prompts}")
    return prompts[: cfg.train_prompts], prompts[available : available + cfg.test_prompts]


def collect_pairs(cfg: StudyConfig, prompts: list, out: Path, *, progress: bool) -> tuple[Path, dict]:
    """Sample 2 completions per prompt from π_ref and have the gold reward label them, through the
    same judge as ``preftune label judge=...`` (ties dropped). Writes samples.jsonl, labels.jsonl
    (rankings with the judge's scores), pairs.jsonl and preferred.jsonl (the winners, for SFT)."""
    from preftune.generate import generate_completions, write_jsonl
    from preftune.label.items import load_items
    from preftune.label.session import LabelSession
    from preftune.label.store import LabelStore
    from preftune.models.loading import load_model
    from preftune.rollout.rewards import resolve_reward

    model, tok = load_model(cfg.model, seed=cfg.seed)
    repeated = [p.prompt for p in prompts for _ in range(2)]
    rows = generate_completions(model, tok, repeated, max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                batch_size=16, seed=cfg.seed + 1, progress=progress)
    del model
    samples, labels = out / "samples.jsonl", out / "labels.jsonl"
    write_jsonl(rows, samples)
    for stale in (labels, Path(str(labels) + ".skipped.jsonl")):  # a rerun labels its own samples afresh
        stale.unlink(missing_ok=True)
    session = LabelSession(load_items(str(samples)), LabelStore(labels), annotator=f"judge:{cfg.gold_reward}", shuffle=False)
    counts = session.judge(resolve_reward(cfg.gold_reward), progress=progress)
    pairs = []
    for row in session.store.labels:
        win, lose = row["ranking"][0][0], row["ranking"][1][0]
        pairs.append({"prompt": row["prompt"], "chosen": row["completions"][win], "rejected": row["completions"][lose],
                      "chosen_score": row["scores"][win], "rejected_score": row["scores"][lose]})
    ties = counts["skipped_all_tied"]
    if len(pairs) < 2:
        raise ConfigError(f"only {len(pairs)} preference pairs could be labelled (ties: {ties}); use more train_prompts")
    path = out / "pairs.jsonl"
    write_jsonl(pairs, path)
    write_jsonl([{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs], out / "preferred.jsonl")
    stats = {"pairs": len(pairs), "ties_dropped": ties, "mean_chosen_score": sum(p["chosen_score"] for p in pairs) / len(pairs),
             "mean_rejected_score": sum(p["rejected_score"] for p in pairs) / len(pairs)}
    log.info("collected %d preference pairs (%d ties dropped) into %s", len(pairs), ties, path)
    return path, stats


def _common(cfg: StudyConfig, label: str, out: Path) -> list[str]:
    common = [
        f"output_dir={out / 'runs' / label}", f"model.name={cfg.model}", f"model.lora.enabled={str(cfg.lora).lower()}",
        "model.lora.dropout=0.0", f"data.max_length={cfg.max_length}", f"train.learning_rate={cfg.learning_rate}",
        f"train.micro_batch_size={cfg.micro_batch_size}", f"train.seed={cfg.seed}", "train.overwrite_output_dir=true",
        "train.lr_scheduler=constant", "train.warmup_steps=1",
    ]
    return common


def train_job(cfg: StudyConfig, name: str, label: str, overrides: list[str], pairs: Path, out: Path) -> tuple[Path, dict]:
    from preftune.config import load_run_config, run_config_to_dict
    from preftune.train.loop import train

    common = [f"algorithm={name}", *_common(cfg, label, out)]
    if name in ONLINE:
        data = out / "train_prompts.jsonl"
        if not data.exists():
            from preftune.data.loaders import load_records
            from preftune.generate import write_jsonl

            prompts = split_prompts(cfg, load_records(cfg.prompts, "prompts"))[0]
            write_jsonl([{"prompt": p.prompt} for p in prompts], data)
        common += [f"data.path={data}", f"train.max_steps={cfg.online_steps}", f"{name}.reward={cfg.gold_reward}",
                   f"{name}.max_new_tokens={cfg.max_new_tokens}"]
        if name == "ppo":
            common += ["train.grad_accum_steps=1"]
        else:
            common += ["train.grad_accum_steps=2"]
    else:
        data = out / "preferred.jsonl" if name == "sft" else pairs
        common += [f"data.path={data}", f"train.num_epochs={cfg.offline_epochs}"]
    run = load_run_config(None, [*common, *overrides, *cfg.train_overrides])
    result = train(run)
    return result.model_dir, run_config_to_dict(run)


def train_proxy(cfg: StudyConfig, pairs: Path, out: Path) -> tuple[str, dict]:
    from preftune.config import load_run_config, run_config_to_dict
    from preftune.train.loop import train

    label = "proxy-reward-model"
    run = load_run_config(None, [
        "algorithm=reward", *_common(cfg, label, out), f"data.path={pairs}", f"train.num_epochs={cfg.offline_epochs}",
        *cfg.train_overrides,
    ])
    train(run)
    return str(Path(run.output_dir)), run_config_to_dict(run)


def frontier_points(results: dict) -> list[dict]:
    points = []
    for name, m in results["models"].items():
        points.append({"algorithm": m.get("algorithm") or name, "label": name, "kl": m.get("kl"), "reward": m.get("reward_mean"),
                       "kl_se": m.get("kl_se"), "reward_se": m.get("reward_se")})
    return points


def bar_plot_of(results: dict, bar_plot) -> bytes:
    names = list(results["models"])
    return bar_plot(names, [results["models"][n].get("reward_mean") for n in names], ylabel="mean gold reward")


def _as_dict(cfg: StudyConfig) -> dict:
    from preftune.config import to_dict

    return to_dict(cfg)


def load_study_config(path: Optional[str], overrides: list[str]) -> StudyConfig:
    from preftune.config import apply_overrides, from_dict, read_yaml

    data = read_yaml(path) if path else {}
    return from_dict(StudyConfig, apply_overrides(data, overrides), "study")


def summary(report: Path) -> str:
    data = json.loads((report.parent / "results.json").read_text())
    lines = [f"{'model':28s} {'gold reward':>12s} {'KL':>8s} {'win rate':>9s} {'length':>7s}"]
    for name, m in data["models"].items():
        wr = (m.get("win_rate") or {}).get("rate")
        lines.append(f"{name:28s} {m['reward_mean']:12.3f} {m['kl']:8.2f} {('%.2f' % wr) if wr is not None else '-':>9s} {m['length_mean']:7.1f}")
    return "\n".join(lines)
