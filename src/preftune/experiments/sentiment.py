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
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from preftune.algorithms import ALGORITHMS
from preftune.config import ConfigError, apply_overrides, doc, from_dict, read_yaml, to_dict
from preftune.data.loaders import load_records
from preftune.eval.evaluate import REFERENCE, best_of_n_curve, evaluate
from preftune.eval.report import write_report
from preftune.experiments.claims import judge_claims
from preftune.experiments.costs import estimate_seconds
from preftune.experiments.figures import study_plots
from preftune.experiments.jobs import StudyJobs, fingerprint, train_run
from preftune.experiments.progress import StudyProgress
from preftune.label.items import load_items
from preftune.label.session import LabelSession
from preftune.label.store import LabelStore
from preftune.models.cache import write_jsonl
from preftune.models.loading import load_model
from preftune.rewards.spec import resolve_reward
from preftune.rollout.sampling import generate_completions
from preftune.train.checkpoint import list_checkpoints

log = logging.getLogger("preftune.experiments")

# What a job may train, read from the algorithm table: online algorithms on the prompts with the gold
# reward; text policies on the labelled pairs (KTO splits them into thumbs up/down, SFT takes the
# preferred completions). Not study jobs: reward models (not a policy), mDPO (needs images), grDPO
# (needs annotator groups: the diverse-preferences study).
_NOT_JOBS = {"reward", "mdpo", "grdpo"}
ONLINE = {name for name, cls in ALGORITHMS.items() if cls.online}
OFFLINE = {name for name, cls in ALGORITHMS.items() if not cls.online and name not in _NOT_JOBS}


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
        factory=lambda: ["dpo:beta=0.05", "dpo:beta=1.0", "rloo:kl_coef=0.02"],
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
    tracked_jobs: list[str] = doc(
        factory=list, help="Jobs (entries of `jobs`) whose checkpoints are evaluated over training too: repetition "
        "and gold reward by step (the unlikelihood claim). Their runs keep every checkpoint.",
    )
    tracked_checkpoints: int = doc(4, "Evenly spaced checkpoints of each tracked job that are evaluated (its final model included).")
    save_steps: int = doc(
        10, "Every job writes a checkpoint every N steps, so a killed study continues a job from its newest one. 0 = only at the end.",
    )
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
        for job in self.tracked_jobs:
            if job not in self.jobs:
                raise ConfigError(f"{path}.tracked_jobs: '{job}' is not one of jobs ({', '.join(self.jobs)})")
        if self.tracked_jobs and self.tracked_checkpoints < 2:
            raise ConfigError(f"{path}.tracked_checkpoints: must be at least 2 (a step before the end and the end), got {self.tracked_checkpoints}")
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
    """Run (or continue) the study in ``cfg.output_dir``; returns the path of report.html. Every job
    that finished in an earlier run with the same settings is skipped (see :mod:`.jobs`)."""

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = _Study(cfg, out, StudyProgress(plan_stages(cfg), enabled=progress),
                   progress)
    try:
        return study.run()
    finally:
        study.progress.close()


def plan_stages(cfg: StudyConfig) -> list[tuple[str, float]]:
    """Every stage of the study in order, with its estimated seconds (:func:`estimate_seconds`)."""
    stages = [("collect pairs", estimate_seconds(cfg, "pairs"))]
    for job in cfg.jobs:
        name, label, _ = parse_job(job)
        stages.append((f"train {label}", estimate_seconds(cfg, name)))
    models = [parse_job(j)[1] for j in cfg.jobs] + [f"checkpoint {i}" for _ in cfg.tracked_jobs for i in range(cfg.tracked_checkpoints - 1)]
    if cfg.proxy_reward_model:
        stages.append(("train proxy reward model", estimate_seconds(cfg, "reward")))
    if cfg.proxy_rl is not None:
        stages.append((f"train {parse_job(cfg.proxy_rl)[1]}-on-proxy", estimate_seconds(cfg, parse_job(cfg.proxy_rl)[0])))
        models += [f"checkpoint {i}" for i in range(cfg.proxy_rl_checkpoints)]
    stages += [("evaluate reference", estimate_seconds(cfg, "evaluate"))]
    stages += [(f"evaluate {m}", estimate_seconds(cfg, "evaluate")) for m in models]
    if cfg.proxy_reward_model:
        stages.append(("best-of-n curve", estimate_seconds(cfg, "best_of_n_curve")))
    return stages


class _Study(StudyJobs):
    """One run of the study: its jobs in order, each skipped when done earlier (the ledger)."""

    def __init__(self, cfg: StudyConfig, out: Path, progress_line, progress: bool):
        super().__init__(out, progress_line)
        self.cfg, self.show_bars = cfg, progress
        self.configs: dict = {"study": _as_dict(cfg)}

    def run(self) -> Path:
        cfg, out = self.cfg, self.out
        t0 = time.perf_counter()
        train, test = split_prompts(cfg, load_records(cfg.prompts, "prompts"))
        pairs_key = fingerprint("pairs", cfg.model, cfg.prompts, cfg.held_out, cfg.train_prompts, cfg.max_new_tokens, cfg.gold_reward, cfg.seed)
        pairs = self.job("collect pairs", pairs_key, lambda: _collect(cfg, train, out, self.show_bars))["result"]
        models, keys, algorithms = {}, {}, {}
        tracked: dict[str, list[dict]] = {}
        for job in cfg.jobs:
            name, label, overrides = parse_job(job)
            extra = [f"train.save_total_limit={TRACKED_LIMIT}"] if job in cfg.tracked_jobs else []
            run_dir, key = self.train(name, label, overrides + extra, pairs_key, pairs["pairs_path"])
            models[label], keys[label] = str(run_dir / "model"), key
            if job in cfg.tracked_jobs:
                tracked[label] = [{"step": 0, "model": "reference"}]
                for step, checkpoint in _spaced_checkpoints(run_dir, cfg.tracked_checkpoints)[:-1]:
                    models[f"{label}@{step}"], keys[f"{label}@{step}"] = str(checkpoint), fingerprint(key, step)
                    tracked[label].append({"step": step, "model": f"{label}@{step}"})
                tracked[label].append({"step": _last_step(run_dir), "model": label})
        proxy, proxy_key, proxy_rl_models = None, None, []
        if cfg.proxy_reward_model:
            proxy_key = fingerprint("proxy", pairs_key, self._proxy_overrides(pairs["pairs_path"]))
            record = self.job("train proxy reward model", proxy_key, lambda: train_proxy(cfg, Path(pairs["pairs_path"]), out))
            proxy, self.configs["proxy_reward_model"] = record["result"]["model_dir"], record["result"]["config"]
        if cfg.proxy_rl is not None:
            name, label, overrides = parse_job(cfg.proxy_rl)
            label += "-on-proxy"
            every = cfg.online_steps // cfg.proxy_rl_checkpoints
            overrides += [f"{name}.reward={proxy}", f"train.save_steps={every}", f"train.save_total_limit={cfg.proxy_rl_checkpoints + 1}"]
            run_dir, key = self.train(name, label, overrides, fingerprint(pairs_key, proxy_key), pairs["pairs_path"])

            for checkpoint in list_checkpoints(run_dir)[-cfg.proxy_rl_checkpoints:]:
                step = int(checkpoint.name.split("-")[1])
                models[f"{label}@{step}"], keys[f"{label}@{step}"] = str(checkpoint), fingerprint(key, step)
                algorithms[f"{label}@{step}"] = f"{name} on proxy"
                proxy_rl_models.append(f"{label}@{step}")
        results = self.evaluate_models(models, keys, algorithms, [p.prompt for p in test], proxy, proxy_key)
        if proxy is not None:
            key = fingerprint("best-of-n", self._eval_key(proxy_key, [p.prompt for p in test]), sorted(cfg.best_of_n))
            results["best_of_n"] = self.job("best-of-n curve", key, lambda: self._best_of_n(test, proxy))["result"]
        results["claims"] = judge_claims(results, tracked=tracked, proxy_rl=proxy_rl_models, max_new_tokens=cfg.max_new_tokens)
        results["tracked_checkpoints"] = tracked
        results["pairs"] = pairs["stats"]
        results["timings_seconds"] = {**{k: round(v, 1) for k, v in self.timings.items()},
                                      "total (this run)": round(time.perf_counter() - t0, 1),
                                      "total (all jobs, as they ran)": round(sum(self.timings.values()), 1)}
        results["cpu_seconds"] = {k: v for k, v in self.cpu.items() if v is not None}
        results["machine"] = machine()
        plots = study_plots(results, tracked, proxy_rl_models)
        return write_report(results, out, title="Sentiment control: preference tuning vs RL", configs=self.configs, plots=plots)

    def train(self, name: str, label: str, overrides: list[str], upstream_key: str, pairs_path: str) -> tuple[Path, str]:
        args = job_overrides(self.cfg, name, label, overrides, Path(pairs_path), self.out)
        key = fingerprint("train", upstream_key, args)
        run_dir = self.out / "runs" / label
        record = self.job(f"train {label}", key, lambda: train_run(args, key))
        self.configs[label] = record["result"]["config"]
        return run_dir, key

    def _proxy_overrides(self, pairs_path: str) -> list[str]:
        return proxy_overrides(self.cfg, Path(pairs_path), self.out)

    def _eval_key(self, proxy_key, prompts: list) -> str:
        cfg = self.cfg
        return fingerprint("evaluate", cfg.model, prompts, cfg.gold_reward, proxy_key, cfg.eval_samples, cfg.max_new_tokens, cfg.seed)

    def evaluate_models(self, models: dict, keys: dict, algorithms: dict, prompts: list, proxy, proxy_key) -> dict:
        """Evaluate every model not evaluated earlier (with the same settings and weights) in one pass
        that samples the reference once; each model's metrics are stored as soon as it is done."""

        cfg = self.cfg

        def run(pending: dict, on_model) -> dict:
            return evaluate(pending, cfg.model, prompts, cfg.gold_reward, proxy_reward=proxy, num_samples=cfg.eval_samples,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=16, progress=self.show_bars,
                            algorithms=algorithms, on_model=on_model)

        settings, done = self.evaluate(models, keys, self._eval_key(proxy_key, prompts), run)
        return {"settings": settings, "models": {name: done[name] for name in [REFERENCE, *models]}}

    def _best_of_n(self, test: list, proxy: str) -> dict:
        cfg = self.cfg
        return best_of_n_curve(cfg.model, [p.prompt for p in test], cfg.gold_reward, proxy, cfg.best_of_n,
                               max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=16, progress=self.show_bars)


TRACKED_LIMIT = 1000  # a tracked job keeps all its checkpoints (LoRA: a few MB each); evenly spaced ones are evaluated


def _spaced_checkpoints(run_dir: Path, count: int) -> list[tuple[int, Path]]:
    """``count`` evenly spaced checkpoints of a run (its last one included), as (step, path)."""

    found = list_checkpoints(run_dir)
    if len(found) > count:
        found = [found[round(i * (len(found) - 1) / (count - 1))] for i in range(count)] if count > 1 else found[-1:]
    return [(int(p.name.split("-")[1]), p) for p in found]


def _last_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir)
    return int(found[-1].name.split("-")[1]) if found else 0


def _collect(cfg: StudyConfig, train: list, out: Path, progress: bool) -> dict:
    path, stats = collect_pairs(cfg, train, out, progress=progress)
    return {"pairs_path": str(path), "stats": stats}


def machine() -> dict:
    """Where the numbers were measured: CPU model and count, load average at the end."""

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "load_average_1_5_15_min": [round(x, 2) for x in load] if load else None}


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
        "train.lr_scheduler=constant", "train.warmup_steps=1", f"train.save_steps={cfg.save_steps}",
    ]
    return common


def job_overrides(cfg: StudyConfig, name: str, label: str, overrides: list[str], pairs: Path, out: Path) -> list[str]:
    """The dotted overrides of one training job (a RunConfig from defaults)."""
    common = [f"algorithm={name}", *_common(cfg, label, out)]
    if name in ONLINE:
        data = out / "train_prompts.jsonl"
        if not data.exists():
            prompts = split_prompts(cfg, load_records(cfg.prompts, "prompts"))[0]
            write_jsonl([{"prompt": p.prompt} for p in prompts], data)
        common += [f"data.path={data}", f"train.max_steps={cfg.online_steps}", f"{name}.reward={cfg.gold_reward}",
                   f"{name}.max_new_tokens={cfg.max_new_tokens}", f"train.grad_accum_steps={1 if name == 'ppo' else 2}"]
    else:
        data = out / "preferred.jsonl" if name == "sft" else pairs
        common += [f"data.path={data}", f"train.num_epochs={cfg.offline_epochs}"]
    return [*common, *overrides, *cfg.train_overrides]


def proxy_overrides(cfg: StudyConfig, pairs: Path, out: Path) -> list[str]:
    return ["algorithm=reward", *_common(cfg, "proxy-reward-model", out), f"data.path={pairs}",
            f"train.num_epochs={cfg.offline_epochs}", *cfg.train_overrides]


def train_proxy(cfg: StudyConfig, pairs: Path, out: Path) -> dict:
    args = proxy_overrides(cfg, pairs, out)
    result = train_run(args, fingerprint("proxy", args))
    return {"model_dir": str(Path(result["model_dir"]).parent), "config": result["config"]}


def _as_dict(cfg: StudyConfig) -> dict:
    return to_dict(cfg)


def load_study_config(path: Optional[str], overrides: list[str]) -> StudyConfig:
    data = read_yaml(path) if path else {}
    return from_dict(StudyConfig, apply_overrides(data, overrides), "study")


def summary(report: Path) -> str:
    data = json.loads((report.parent / "results.json").read_text())
    lines = [f"{'model':28s} {'gold reward':>12s} {'KL':>8s} {'win rate':>9s} {'length':>7s}"]
    for name, m in data["models"].items():
        wr = (m.get("win_rate") or {}).get("rate")
        lines.append(f"{name:28s} {m['reward_mean']:12.3f} {m['kl']:8.2f} {('%.2f' % wr) if wr is not None else '-':>9s} {m['length_mean']:7.1f}")
    return "\n".join(lines)
