"""Evaluate models against a reference: gold reward, KL to the reference, win rate, length, repetition.

    from preftune.eval import evaluate, best_of_n_curve
    results = evaluate({"dpo": "runs/dpo/model", "rloo": "runs/rloo/model"}, "smollm2-135m-instruct",
                       prompts, "vader", num_samples=2, max_new_tokens=48)
    curve = best_of_n_curve("smollm2-135m-instruct", prompts, "vader", "runs/reward", ns=[1, 2, 4, 8])

Every model samples with the same seed and settings (a model identical to the reference gives
identical completions: KL 0, all ties). KL(π‖π_ref) is estimated from π's own samples as the mean
of Σ_t log π(y_t|·) − log π_ref(y_t|·), both computed by :func:`per_token_logps` on exactly the
sampled token ids (the sampler's numbers are never used). The log-probs are those of the models
themselves (temperature 1, no truncation): with ``temperature != 1`` or ``top_p < 1`` the samples
come from a different distribution than the one whose KL is computed, so the estimate is no longer
KL(π‖π_ref); ``results["settings"]["kl_exact_sampling"]`` says which case a report is in.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from preftune.data.collate import collate_completions
from preftune.eval.metrics import (
    best_of_n_kl,
    distinct_n,
    mean_and_se,
    mean_repeated_ngram_fraction,
    repeated_ngram_fraction,
    sequence_kl,
    win_rate,
)
from preftune.models.loading import load_model
from preftune.models.logprobs import per_token_logps, sequence_logps
from preftune.rewards.spec import resolve_reward
from preftune.rollout.sampling import generate_completions
from preftune.train.export import resolve_model

log = logging.getLogger("preftune.eval")

__all__ = ["REFERENCE", "best_of_n_curve", "describe_model", "evaluate"]

REFERENCE = "reference"
"""The key of the reference model in ``results["models"]``."""

ModelSpec = str | tuple  # a name load_model understands, or an already loaded (model, tokenizer)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def evaluate(
    models: Mapping[str, ModelSpec],
    reference: ModelSpec,
    prompts: Sequence[Any],
    reward: str | Callable,
    *,
    proxy_reward: str | Callable | None = None,
    extra_rewards: Mapping[str, str | Callable] | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    text_as_chat: bool = False,
    progress: bool = True,
    num_examples: int = 3,
    tie_tolerance: float = 0.0,
    algorithms: Mapping[str, str] | None = None,
    keep_completions: bool = False,
    device: str | None = None,
    on_model: Callable[[str, dict], None] | None = None,
) -> dict:
    """Sample ``num_samples`` completions per prompt from the reference and from every model, and compare them.

    Args:
        models: display name -> model spec (any name ``load_model`` accepts, a training checkpoint, a run's
            ``OUTPUT_DIR/model`` incl. LoRA adapters, or a loaded ``(model, tokenizer)``, which is not freed).
        reference: π_ref, the same kinds of spec. Loaded once and kept while the models are evaluated one at
            a time (at most two models in memory); each loaded model is freed after use.
        prompts: text, conversations, token-id lists or prompt records (anything with ``.prompt``).
        reward: the gold reward: a reward source (``prompts, completions -> floats``) or a spec for ``resolve_reward``.
        proxy_reward, extra_rewards: a second reward (e.g. a reward model), and name -> more rewards
            (e.g. each annotator group's), scored on the same completions and reported per model.
        tie_tolerance: win-rate rows whose rewards differ by at most this much are ties.
        algorithms: display name -> algorithm label for frontier plots; else read from the run's config.yaml.
        keep_completions: also return every sampled row under ``results["completions"][name]``.
        device: where loaded models run; None = CUDA when available, else CPU.
        on_model: called with (name, metrics) as each model (the reference first) is done, e.g. to keep finished ones.

    Returns:
        ``{"settings": {...}, "models": {name: metrics}}``, the reference first under :data:`REFERENCE`. Metrics, over all
        prompts × num_samples completions: ``reward_mean/std/se``, ``kl``, ``kl_se`` (sequence KL to the reference, 0 for
        it), ``kl_per_token``, ``win_rate`` (see :func:`~preftune.eval.metrics.win_rate`; None for the reference),
        ``length_mean/se`` (tokens, with the EOS), ``eos_rate``, ``distinct_1/2``, ``repeated_3gram(_se)``,
        ``proxy_reward_mean/se``, ``extra_rewards`` ({name: {mean, se}}); ``n``, ``spec``, ``algorithm``, ``seconds``,
        ``samples`` (first ``num_examples``)."""
    rewards = _rewards(models, reward, proxy_reward, extra_rewards)
    texts = [_prompt_value(p) for p in prompts]
    repeated = [p for p in texts for _ in range(num_samples)]  # prompt-major, as `preftune generate`
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                    text_as_chat=text_as_chat)
    results: dict = {"settings": _settings(sampling, num_samples, texts, repeated, reward, proxy_reward, tie_tolerance,
                                           reference), "models": {}}
    summary = dict(tie_tolerance=tie_tolerance, num_samples=num_samples, num_examples=num_examples)
    completions = _compare(models, reference, results["models"], repeated, sampling, rewards, summary, dict(algorithms or {}),
                           progress, device, on_model)
    return {**results, "completions": completions} if keep_completions else results


def _rewards(models: Mapping, reward, proxy_reward, extra_rewards) -> tuple:
    """(gold, proxy or None, {name: extra reward}) as callables; refuses a model named like the reference."""
    if REFERENCE in models:
        raise ValueError(f"{REFERENCE!r} names the reference model; give the model another name")
    return (_reward(reward), _reward(proxy_reward) if proxy_reward is not None else None,
            {name: _reward(r) for name, r in (extra_rewards or {}).items()})


def _compare(models: Mapping[str, ModelSpec], reference: ModelSpec, out: dict, repeated: list, sampling: dict,
             rewards: tuple, summary: dict, algorithms: dict, progress: bool, device: str | None,
             on_model: Callable[[str, dict], None] | None = None) -> dict[str, list[dict]]:
    """Fill ``out`` (``results["models"]``) with the reference's and every model's metrics; return every
    model's rows. The reference stays loaded throughout, each model only while it is evaluated."""
    gold_fn, proxy_fn, extra_fns = rewards
    completions: dict[str, list[dict]] = {}
    ref_model, ref_tok, ref_owned = _load(reference, device)
    try:
        start = time.perf_counter()
        ref_rows = _sample(ref_model, ref_tok, repeated, sampling, progress, f"sample {REFERENCE}")
        ref_gold = _score(gold_fn, repeated, ref_rows)
        ref_metrics = _summarise(ref_rows, ref_gold, _score(proxy_fn, repeated, ref_rows), None, None, None, **summary)
        ref_metrics.update(_extra(extra_fns, repeated, ref_rows))
        out[REFERENCE] = {"spec": _spec_name(reference), "algorithm": REFERENCE, **ref_metrics,
                          "seconds": time.perf_counter() - start}
        if on_model is not None:
            on_model(REFERENCE, out[REFERENCE])
        completions[REFERENCE] = _rows_out(ref_rows, ref_gold)
        for name, spec in tqdm(list(models.items()), desc="eval models", unit="model", disable=not progress):
            entry, completions[name] = _evaluate_model(name, spec, (ref_model, ref_tok), repeated, sampling, rewards,
                                                       ref_gold, summary, progress, device)
            algorithm = entry.pop("algorithm")
            out[name] = {"spec": _spec_name(spec), "algorithm": algorithms.get(name) or algorithm, **entry}
            if on_model is not None:
                on_model(name, out[name])
    finally:
        if ref_owned:
            del ref_model
            _free_memory()
    return completions


def _settings(sampling: dict, num_samples: int, texts: list, repeated: list, reward, proxy_reward,
              tie_tolerance: float, reference: ModelSpec) -> dict:
    """``results["settings"]`` of :func:`evaluate` (warns when the samples are not the models' own)."""
    if not (sampling["temperature"] == 1.0 and sampling["top_p"] == 1.0):
        log.warning("temperature=%s top_p=%s: samples are not drawn from the models' own distributions, so "
                    "'kl' is not KL(pi||pi_ref) (see preftune.eval.evaluate)", sampling["temperature"], sampling["top_p"])
    return {
        **sampling, "num_samples": num_samples, "prompts": len(texts), "completions_per_model": len(repeated),
        "reward": _describe_reward(reward), "proxy_reward": _describe_reward(proxy_reward),
        "tie_tolerance": tie_tolerance,
        "kl_exact_sampling": sampling["temperature"] == 1.0 and sampling["top_p"] == 1.0,
        "kl_estimator": "mean over samples of sum_t log pi(y_t) - log pi_ref(y_t) (samples from pi)",
        "reference": _spec_name(reference),
    }


def _evaluate_model(name: str, spec: ModelSpec, ref: tuple, repeated: list, sampling: dict, rewards: tuple,
                    ref_gold: list, summary: dict, progress: bool, device: str | None) -> tuple[dict, list[dict]]:
    """One model against the reference: (its metrics with ``algorithm`` and ``seconds``, its rows)."""
    start = time.perf_counter()
    (ref_model, ref_tok), (gold_fn, proxy_fn, extra_fns) = ref, rewards
    rows, logps = _sample_model(name, spec, ref_tok, repeated, sampling, progress, device)
    ref_logps = _sequence_logps(ref_model, ref_tok, rows, sampling["batch_size"], progress, f"log-probs {REFERENCE}")
    gold = _score(gold_fn, repeated, rows)
    metrics = _summarise(rows, gold, _score(proxy_fn, repeated, rows), ref_gold, logps, ref_logps, **summary)
    metrics.update(_extra(extra_fns, repeated, rows))
    metrics = {"algorithm": describe_model(spec).get("algorithm", "model"), **metrics, "seconds": time.perf_counter() - start}
    return metrics, _rows_out(rows, gold, logps, ref_logps)


def _sample_model(name: str, spec: ModelSpec, ref_tok, repeated: list, sampling: dict, progress: bool,
                  device: str | None) -> tuple[list[dict], list[float]]:
    """A model's completions and their log-probs under it; the model is freed after, if loaded here."""
    model, tok, owned = _load(spec, device)
    try:
        _check_vocab(name, tok, ref_tok)
        rows = _sample(model, tok, repeated, sampling, progress, f"sample {name}")
        return rows, _sequence_logps(model, tok, rows, sampling["batch_size"], progress, f"log-probs {name}")
    finally:
        if owned:
            del model
            _free_memory()


def best_of_n_curve(
    reference: ModelSpec,
    prompts: Sequence[Any],
    reward: str | Callable,
    proxy_reward: str | Callable,
    ns: Sequence[int] = (1, 2, 4, 8, 16),
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    text_as_chat: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> dict:
    """The over-optimisation curve of best-of-n: gold and proxy reward vs KL while optimising the proxy.

    ``max(ns)`` completions are sampled per prompt from the reference and scored by both rewards once.
    For each n they are split into ``max(ns) // n`` disjoint groups of n; each group keeps its
    completion with the highest PROXY reward, and the gold and proxy rewards of the kept ones are
    averaged (per prompt over its groups, then over prompts; the SE is over prompts). Every group is
    an exact best-of-n draw, so the groups only reduce variance. KL is the closed form
    log n − (n − 1)/n (:func:`~preftune.eval.metrics.best_of_n_kl`), relative to the sampling
    distribution (the reference at ``temperature`` / ``top_p``).

    Returns:
        ``{"n", "kl", "gold_mean", "gold_se", "proxy_mean", "proxy_se"}`` (lists aligned with sorted
        ``ns``), and ``gold_picked_mean`` / ``gold_picked_se``: best-of-n picking by the gold reward
        instead (the gold best-of-n frontier, at the same KL) plus ``samples_per_prompt``, ``prompts``, ``reward``, ``proxy_reward``.
    """
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ValueError(f"best-of-n sizes must be positive integers, got {ns}")
    gold_fn, proxy_fn = _reward(reward), _reward(proxy_reward)
    texts = [_prompt_value(p) for p in prompts]
    per_prompt = ns[-1]
    repeated = [p for p in texts for _ in range(per_prompt)]
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    batch_size=batch_size, text_as_chat=text_as_chat)
    model, tok, owned = _load(reference, device)
    try:
        rows = _sample(model, tok, repeated, sampling, progress, "sample best-of-n")
    finally:
        if owned:
            del model
            _free_memory()
    gold, proxy = _score(gold_fn, repeated, rows), _score(proxy_fn, repeated, rows)
    curve: dict = {"n": ns, "kl": [best_of_n_kl(n) for n in ns], "gold_mean": [], "gold_se": [],
                   "proxy_mean": [], "proxy_se": [], "gold_picked_mean": [], "gold_picked_se": [],
                   "samples_per_prompt": per_prompt, "prompts": len(texts),
                   "reward": _describe_reward(reward), "proxy_reward": _describe_reward(proxy_reward)}
    for n in ns:
        picks = _best_of_n_picks(gold, proxy, n, per_prompt, len(texts))
        for key, values in zip(("gold", "proxy", "gold_picked"), picks):
            mean, se = mean_and_se(values)
            curve[f"{key}_mean"].append(mean)
            curve[f"{key}_se"].append(se)
    return curve


def _best_of_n_picks(gold: list, proxy: list, n: int, per_prompt: int, prompts: int) -> tuple[list, list, list]:
    """Per prompt: the mean gold and proxy reward of the best-by-proxy completion of each group of n,
    and the mean gold reward of the best-by-gold one (best-of-n on the gold reward itself)."""
    gold_per_prompt, proxy_per_prompt, gold_picked_per_prompt = [], [], []
    for i in range(prompts):
        base = i * per_prompt
        picks, gold_picks = [], []
        for g in range(per_prompt // n):
            group = range(base + g * n, base + (g + 1) * n)
            picks.append(max(group, key=lambda j: proxy[j]))  # first of equal proxy scores
            gold_picks.append(max(group, key=lambda j: gold[j]))
        gold_per_prompt.append(math.fsum(gold[j] for j in picks) / len(picks))
        proxy_per_prompt.append(math.fsum(proxy[j] for j in picks) / len(picks))
        gold_picked_per_prompt.append(math.fsum(gold[j] for j in gold_picks) / len(gold_picks))
    return gold_per_prompt, proxy_per_prompt, gold_picked_per_prompt


def describe_model(spec: ModelSpec) -> dict:
    """What a model spec says about itself: for a run's ``OUTPUT_DIR/model`` (or ``OUTPUT_DIR``, or a
    checkpoint ``OUTPUT_DIR/checkpoints/step-N``), the run's ``algorithm`` and, where its section has
    one, ``beta`` (read from ``OUTPUT_DIR/config.yaml``). Empty for anything else."""
    if not isinstance(spec, str):
        return {}
    path = Path(spec).expanduser()
    candidates = [path / "config.yaml", path.parent / "config.yaml"]
    if path.parent.name == "checkpoints":
        candidates.append(path.parent.parent / "config.yaml")
    for config in candidates:
        if path.is_dir() and config.is_file():
            try:
                data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                return {}
            algorithm = data.get("algorithm") if isinstance(data, dict) else None
            if not isinstance(algorithm, str):
                return {}
            section = data.get(algorithm) if isinstance(data.get(algorithm), dict) else {}
            out = {"algorithm": algorithm}
            if isinstance(section.get("beta"), (int, float)):
                out["beta"] = float(section["beta"])
            return out
    return {}


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def _reward(spec):
    if callable(spec):
        return spec

    return resolve_reward(spec)


def _describe_reward(spec) -> str | None:
    if spec is None or isinstance(spec, str):
        return spec
    return getattr(spec, "name", None) or repr(spec)


def _spec_name(spec: ModelSpec) -> str:
    if isinstance(spec, str):
        return spec
    model = spec[0]
    return str(getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


def _prompt_value(prompt):
    return prompt.prompt if hasattr(prompt, "prompt") else prompt


def _load(spec: ModelSpec, device: str | None):
    """-> (model, tokenizer, owned): ``owned`` = loaded here, so freed here."""
    if isinstance(spec, tuple):
        model, tokenizer = spec
        return model, tokenizer, False
    model, tokenizer = load_model(resolve_model(spec))  # a training checkpoint: its export
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(target).eval(), tokenizer, True


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_vocab(name: str, tokenizer, ref_tokenizer) -> None:
    # KL compares probabilities of the same token sequences: both models must read the same ids.
    if tokenizer is not ref_tokenizer and tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise ValueError(f"model {name!r} has a different vocabulary from the reference: KL over token "
                         "sequences is undefined; evaluate it against a reference with its tokenizer")


def _sample(model, tokenizer, prompts, sampling: dict, progress: bool, desc: str) -> list[dict]:
    log.info("%s: %d completions", desc, len(prompts))
    return generate_completions(model, tokenizer, prompts, return_token_ids=True, progress=progress, **sampling)


def _sequence_logps(model, tokenizer, rows: list[dict], batch_size: int, progress: bool, desc: str) -> list[float]:
    """log π(completion | prompt) of each row's exact token ids, summed over the completion's tokens."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i]["prompt_ids"]) + len(rows[i]["completion_ids"])))
    out = [0.0] * len(rows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
                index = order[start : start + batch_size]
                batch = collate_completions(
                    [{"prompt_ids": rows[i]["prompt_ids"], "completion_ids": rows[i]["completion_ids"]} for i in index], pad_id
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                values = sequence_logps(per_token_logps(model, batch), batch["completion_mask"])
                for i, v in zip(index, values.tolist()):
                    out[i] = v
    finally:
        model.train(was_training)
    return out


def _score(fn, prompts, rows) -> list[float] | None:
    if fn is None:
        return None
    scores = [float(s) for s in fn(list(prompts), [r["completion"] for r in rows])]
    if len(scores) != len(rows):
        raise ValueError(f"the reward returned {len(scores)} scores for {len(rows)} completions")
    return scores


def _summarise(rows, gold, proxy, ref_gold, logps, ref_logps, tie_tolerance, num_samples, num_examples) -> dict:
    texts = [r["completion"] for r in rows]
    reward_mean, reward_se = mean_and_se(gold)
    tokens = sum(r["completion_tokens"] for r in rows)
    if logps is None:  # the reference against itself: log π/π_ref is 0 for every token
        kl, kl_se, kl_per_token = 0.0, 0.0, 0.0
    else:
        kl, kl_se = sequence_kl(logps, ref_logps)
        kl_per_token = math.fsum(a - b for a, b in zip(logps, ref_logps)) / max(tokens, 1)
    metrics = {
        "n": len(rows),
        "reward_mean": reward_mean,
        "reward_std": _std(gold),
        "reward_se": reward_se,
        "kl": kl,
        "kl_se": kl_se,
        "kl_per_token": kl_per_token,
        "win_rate": win_rate(gold, ref_gold, tie_tolerance=tie_tolerance) if ref_gold is not None else None,
        "length_mean": tokens / len(rows) if rows else math.nan,
        "length_se": mean_and_se([r["completion_tokens"] for r in rows])[1] if rows else math.nan,
        "eos_rate": sum(r["finished"] for r in rows) / len(rows) if rows else math.nan,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_3gram": mean_repeated_ngram_fraction(texts, 3),
        "repeated_3gram_se": mean_and_se([repeated_ngram_fraction(t, 3) for t in texts if len(t.split()) >= 3])[1],
    }
    if proxy is not None:
        metrics["proxy_reward_mean"], metrics["proxy_reward_se"] = mean_and_se(proxy)
    metrics["samples"] = [
        {"prompt": rows[i]["prompt"], "completion": rows[i]["completion"], "reward": gold[i]}
        for i in range(0, min(len(rows), num_examples * num_samples), num_samples)
    ]
    return metrics


def _extra(fns: dict, prompts, rows) -> dict:
    """``{"extra_rewards": {name: {"mean", "se"}}}`` of the extra rewards (nothing when there are none)."""
    if not fns:
        return {}
    return {"extra_rewards": {name: dict(zip(("mean", "se"), mean_and_se(_score(fn, prompts, rows)))) for name, fn in fns.items()}}


def _std(values) -> float:
    mean, se = mean_and_se(values)
    return se * math.sqrt(len(values)) if len(values) > 1 else math.nan


def _rows_out(rows, gold, logps=None, ref_logps=None) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        row = {"prompt": r["prompt"], "completion": r["completion"], "completion_tokens": r["completion_tokens"],
               "finished": r["finished"], "reward": gold[i]}
        if logps is not None:
            row["logp"], row["ref_logp"] = logps[i], ref_logps[i]
        out.append(row)
    return out

