"""What `preftune eval` runs: models against a reference on a prompts file -> results.json + report.html;
its settings (:class:`EvalConfig`) and :func:`run_eval`, called by the command (preftune/commands/eval.py)
and by pipelines' evaluate stages.

    preftune eval models=[dpo=runs/dpo/model,rloo=runs/rloo/model] prompts=builtin:movie_review_prompts max_rows=64
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from preftune.config import ConfigError, doc, shared, to_dict
from preftune.data.loaders import load_records
from preftune.eval.evaluate import REFERENCE, best_of_n_curve, evaluate
from preftune.eval.plots import bar_plot, frontier_plot, overoptimization_plot
from preftune.eval.report import write_report
from preftune.models.cache import write_jsonl
from preftune.models.loading import load_model
from preftune.rewards.spec import resolve_reward
from preftune.train.export import resolve_model

_MODEL_KEYS = ("name", "path", "algorithm")


@dataclass
class EvalConfig:
    models: Union[str, list[Any]] = doc(
        factory=list,
        help="Models to compare with the reference: a list of `name=path` strings (a plain path or model name "
        "is named after its run folder), or mappings {name, path, algorithm}; a path is anything `model.name` "
        "accepts or a trained run's `OUTPUT_DIR/model` (full weights or a LoRA adapter). `algorithm` groups "
        "models on the frontier plot; by default it is read from the run's config.yaml. Empty = only the reference.",
    )
    reference: str = doc(
        "smollm2-135m-instruct", "The reference model π_ref: KL is measured to it and win rates against its completions."
    )
    prompts: str = doc(
        "builtin:movie_review_prompts",
        "Prompts file (.jsonl/.json/.parquet/.csv with a `prompt` or `messages` column), 'builtin:NAME', or a dataset name.",
    )
    split: str = shared("split")
    max_rows: Optional[int] = doc(None, "Use only the first N prompts. null = all.")
    reward: str = doc(
        "vader",
        "The gold reward: 'vader' (VADER sentiment), 'module:function' or 'file.py:function' (texts in, floats "
        "out), or trained reward model(s) (a run directory or model folder; comma-separated = ensemble).",
    )
    proxy_reward: Optional[str] = doc(
        None,
        "A second reward (same forms as reward; typically a trained reward model) reported per model and "
        "optimised by the best-of-n curve. Required when best_of_n is set.",
    )
    num_samples: int = doc(1, "Completions per prompt and model.")
    max_new_tokens: int = shared("max_new_tokens")
    temperature: float = shared("temperature", note="The same for every model. Only 1.0 with top_p 1.0 samples the "
                                "models' own distributions, which the KL estimate assumes.")
    top_p: float = shared("top_p", note="The same for every model; < 1 biases the KL estimate like temperature.")
    seed: int = doc(0, "Sampling seed, the same for every model.")
    batch_size: int = doc(8, "Prompts per generate call and rows per log-prob forward pass.")
    text_as_chat: bool = shared("text_as_chat")
    tie_tolerance: float = doc(0.0, "Win rate: rewards differing by at most this much are a tie (ties count half).")
    num_examples: int = doc(3, "Sample outputs per model shown in the report.")
    best_of_n: list[int] = doc(
        factory=list,
        help="Over-optimisation curve: best-of-n sizes, e.g. [1, 2, 4, 8, 16] (max(n) samples per prompt from the "
        "reference, picked by proxy_reward; gold and proxy reward vs the closed-form KL). Empty = off.",
    )
    output_dir: str = doc("runs/eval", "Where results.json, completions.jsonl, the PNG plots and report.html go.")
    title: str = doc("preftune evaluation", "Title of the report.")

    def validate(self, path: str) -> None:
        model_entries(self, path)  # raises on a malformed entry or a repeated name
        if self.num_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.num_examples < 0:
            raise ConfigError(f"{path}: num_samples, max_new_tokens and batch_size must be >= 1, num_examples >= 0")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"{path}.max_rows: must be >= 1 or null, got {self.max_rows}")
        if self.temperature < 0 or not (0 < self.top_p <= 1) or self.tie_tolerance < 0:
            raise ConfigError(f"{path}: need temperature >= 0, 0 < top_p <= 1, tie_tolerance >= 0")
        if any(n < 1 for n in self.best_of_n):
            raise ConfigError(f"{path}.best_of_n: sizes must be >= 1, got {self.best_of_n}")
        if self.best_of_n and not self.proxy_reward:
            raise ConfigError(f"{path}.best_of_n: needs proxy_reward (the reward best-of-n picks by)")
        if not self.prompts:
            raise ConfigError(f"{path}.prompts: required (a prompts file or builtin:NAME)")


def model_entries(cfg: EvalConfig, path: str = "eval") -> list[dict]:
    """``cfg.models`` as ``[{"name", "path", "algorithm" (or None)}]``, names unique."""
    items = cfg.models
    if isinstance(items, str):
        items = [s.strip() for s in items.split(",") if s.strip()]
    entries = []
    for i, item in enumerate(items):
        where = f"{path}.models[{i}]"
        if isinstance(item, str):
            name, sep, spec = item.partition("=")
            if not sep:
                name, spec = _default_name(item), item
            entry = {"name": name.strip(), "path": spec.strip(), "algorithm": None}
        elif isinstance(item, dict):
            unknown = [k for k in item if k not in _MODEL_KEYS]
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {list(_MODEL_KEYS)}")
            if not isinstance(item.get("path"), str) or not item["path"]:
                raise ConfigError(f"{where}.path: required (a model name or folder)")
            name = item.get("name") or _default_name(item["path"])
            algorithm = item.get("algorithm")
            if not isinstance(name, str) or (algorithm is not None and not isinstance(algorithm, str)):
                raise ConfigError(f"{where}: name and algorithm must be strings")
            entry = {"name": name, "path": item["path"], "algorithm": algorithm}
        else:
            raise ConfigError(f"{where}: expected 'name=path' or a mapping {{name, path, algorithm}}, got {item!r}")
        if not entry["name"] or not entry["path"]:
            raise ConfigError(f"{where}: empty name or path in {item!r}")
        if entry["name"] == "reference":
            raise ConfigError(f"{where}: 'reference' names the reference model; choose another name")
        if any(e["name"] == entry["name"] for e in entries):
            raise ConfigError(f"{where}: the name {entry['name']!r} is used twice")
        entries.append(entry)
    return entries


def _default_name(spec: str) -> str:
    p = Path(spec)
    if p.name == "model" and p.parent.name:  # runs/dpo-b0.1/model -> dpo-b0.1
        return p.parent.name
    if p.parent.name == "checkpoints" and p.parent.parent.name:  # runs/rloo/checkpoints/step-000010 -> rloo@10
        step = p.name.removeprefix("step-").lstrip("0") or "0"
        return f"{p.parent.parent.name}@{step}"
    return p.name or spec


def run_eval(cfg: EvalConfig) -> Path:
    """Evaluate, write results.json, completions.jsonl, the plots and report.html; return the report's path."""
    entries = model_entries(cfg)
    records = load_records(cfg.prompts, "prompts", split=cfg.split)
    prompts = [r.prompt for r in records[: cfg.max_rows]]  # [:None] = all
    try:
        gold = resolve_reward(cfg.reward)
        proxy = resolve_reward(cfg.proxy_reward) if cfg.proxy_reward else None
    except ValueError as err:  # a bad 'module:function' spec: one clear line, not a traceback
        raise ConfigError(f"eval.reward / eval.proxy_reward: {err}") from None
    model, tokenizer = load_model(resolve_model(cfg.reference))  # loaded once: evaluation and best-of-n share it
    reference = (model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer)
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                    batch_size=cfg.batch_size, text_as_chat=cfg.text_as_chat)
    results = evaluate(
        {e["name"]: e["path"] for e in entries}, reference, prompts, gold, proxy_reward=proxy,
        num_samples=cfg.num_samples, num_examples=cfg.num_examples, tie_tolerance=cfg.tie_tolerance,
        algorithms={e["name"]: e["algorithm"] for e in entries if e["algorithm"]}, keep_completions=True, **sampling,
    )
    results["settings"].update(reward=cfg.reward, proxy_reward=cfg.proxy_reward, reference=cfg.reference)
    if cfg.best_of_n:
        results["best_of_n"] = best_of_n_curve(reference, prompts, gold, proxy, cfg.best_of_n, **sampling)
        results["best_of_n"].update(reward=cfg.reward, proxy_reward=cfg.proxy_reward)
    del reference, model

    out = Path(cfg.output_dir)
    completions = results.pop("completions")
    write_jsonl(({"model": name, **row} for name, rows in completions.items() for row in rows), out / "completions.jsonl")
    models = results["models"]
    points = [{"algorithm": m["algorithm"], "label": name, "kl": m["kl"], "reward": m["reward_mean"],
               "kl_se": m["kl_se"], "reward_se": m["reward_se"]} for name, m in models.items()]
    plots = {"frontier": frontier_plot(points, reward_label=f"gold reward ({cfg.reward})")}
    plots["reward"] = bar_plot(list(models), [m["reward_mean"] for m in models.values()],
                               errors=[m["reward_se"] for m in models.values()], ylabel="gold reward",
                               title="Mean gold reward (± SE)")
    rated = {name: m["win_rate"] for name, m in models.items() if name != REFERENCE}
    if rated:
        plots["win_rate"] = bar_plot(list(rated), [w["rate"] for w in rated.values()],
                                     errors=[(w["ci_low"], w["ci_high"]) for w in rated.values()],
                                     ylabel="win rate vs reference", title="Win rate vs reference (95% CI)", hline=0.5)
    if cfg.best_of_n:
        curve = results["best_of_n"]
        extra = [{"label": name, "kl": m["kl"], "gold": m["reward_mean"], "proxy": m.get("proxy_reward_mean")}
                 for name, m in models.items() if name != REFERENCE]
        plots["overoptimization"] = overoptimization_plot(curve["kl"], curve["gold_mean"], curve["proxy_mean"],
                                                          ns=curve["n"], points=extra)
    return write_report(results, out, title=cfg.title, configs={"eval": to_dict(cfg)}, plots=plots)
