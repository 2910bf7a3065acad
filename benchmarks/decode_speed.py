#!/usr/bin/env python
"""Decode speed of the rollout samplers, as ratios measured in one process, interleaved.

    python benchmarks/decode_speed.py --threads 1                    # SmolLM2-135M, 16 rows x <= 32 tokens, 3 rounds
    python benchmarks/decode_speed.py --threads 1 --compile          # also a static KV cache + torch.compile'd decode
    python benchmarks/decode_speed.py --model tiny-random-llama --rounds 1   # smoke run

The rollout batch of ``rl_step_profile.py`` (4 movie-review prompts x 4 samples = 16 left-padded rows,
<= 32 new tokens, T = 1, the sampler's log-probs kept), decoded by:

* ``fp32 sampler``: the ``hf`` rollout backend (the policy's own ``generate``, what RLOO/GRPO run);
* ``int8 sampler`` / ``fp16 sampler``: the ``int8`` / ``fp16`` backends (a dynamically quantized copy
  with int8 / fp16 linear weights, ``sampler=int8`` / ``fp16``);
* ``fp32 limit`` / ``int8 limit`` / ``fp16 limit``: a prefill and ``max_new_tokens - 1`` bare single-token cached
  forwards of the same model over the same batch, nothing else (``rl_step_profile.decode_limit``);
* ``fp32 static+compile`` (``--compile``): ``generate`` with a static KV cache and the decode step
  compiled by ``torch.compile`` (inductor, CPU); its compile time is reported separately.

Each round runs every variant once, in an order rotated per round; the ratios are taken within a round
(same load) and their median is reported, so a machine loaded by other jobs still gives usable
ratios, while the absolute tokens/s are only indicative (the CPU share of other processes is printed).
Rates are **row-steps/s**: rows x decode steps (the batch decodes until its last row ends), the work
the decode loop does; ``tokens/s`` (generated tokens up to each row's EOS) is reported next to it.

Each quantized copy's mismatch with the fp32 policy is measured on its own samples: the fp32 training
forward's log-probs of its sampled tokens give the mean ratio π_fp32/π_q and the k3 estimate of
KL(π_q‖π_fp32) per token, the quantities ``tis/ratio`` and ``tis/kl`` of a training run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import cpu_s, system_busy_s  # noqa: E402
from rl_step_profile import decode_limit  # noqa: E402


def rollout_batch(model_name: str, prompts: int, k: int, lora: bool):
    """The policy, tokenizer and the rollout's prompt ids (the first ``prompts`` prompts, ``k`` times each)."""
    from preftune.run_config import load_run_config
    from preftune.train.loop import build_algorithm

    run = load_run_config(None, [
        "algorithm=rloo", "output_dir=/tmp/decode_speed", f"model.name={model_name}", "data.path=builtin:movie_review_prompts",
        "data.max_length=96", "rloo.kl_coef=0", f"model.lora.enabled={str(lora).lower()}", "model.lora.dropout=0.0",
    ])
    algo, examples, _, _ = build_algorithm(run)
    return algo.policy.eval(), algo.tokenizer, [examples[i]["prompt_ids"] for i in range(prompts) for _ in range(k)]


def sampler_run(backend, prompt_ids, settings, seed: int):
    """(row-steps/s, tokens/s, rows) of one rollout's generate."""
    start = time.perf_counter()
    rows = backend.generate(prompt_ids, settings, seed=seed, return_logps=True)
    seconds = time.perf_counter() - start
    steps = max(r["completion_tokens"] for r in rows)
    return len(rows) * steps / seconds, sum(r["completion_tokens"] for r in rows) / seconds, rows


def _cpu_compile_config(CompileConfig):
    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")  # no CUDA graphs on CPU
    config._compile_all_devices = True  # transformers auto-compiles on accelerators only, unless told
    return config


def compiled_generate(model, tokenizer, prompt_ids, settings, seed: int):
    """``generate`` with a static KV cache and a compiled decode step (same sampling settings as the
    sampler, EOS stop, logits kept); returns (row-steps/s, tokens/s)."""
    from transformers import CompileConfig

    from preftune.rollout.sampling import _eos_and_pad, _generation_config, _left_pad, _token_stats

    eos, pad = _eos_and_pad(model, tokenizer)
    config = _generation_config(settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k, pad, eos, True)
    config.cache_implementation = "static"
    config.compile_config = _cpu_compile_config(CompileConfig)
    ids, mask = _left_pad(prompt_ids, pad, "cpu")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, output_logits=True,
                             return_dict_in_generate=True)
        generated = out.sequences[:, ids.shape[1]:]
        _token_stats(out.logits, generated)
    seconds = time.perf_counter() - start
    is_eos = torch.isin(generated, torch.tensor(eos))
    lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, generated.shape[1])
    return generated.numel() / seconds, int(lengths.sum()) / seconds


def mismatch(policy, tokenizer, rows) -> dict:
    """π_fp32 vs π_int8 on the int8 sampler's tokens: mean ratio, k3 KL(π_int8‖π_fp32), max |Δ log π| per token."""
    from preftune.data.collate import collate_completions
    from preftune.rollout.scoring import score_tokens

    batch = collate_completions([{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]} for r in rows],
                                tokenizer.pad_token_id)
    out = score_tokens(policy, None, batch, kl_estimator="k1", autocast=contextlib.nullcontext)
    d = torch.cat([out["logps"][i][out["mask"][i]] - torch.tensor(r["logps"]) for i, r in enumerate(rows)])
    return {"mean_ratio": float(d.exp().mean()), "kl_k3": float(((d.exp() - 1) - d).mean()),
            "max_abs_dlogp": float(d.abs().max()), "mean_abs_dlogp": float(d.abs().mean()), "tokens": int(d.numel())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lora", action="store_true", help="a LoRA policy (the int8 copy quantizes the merged weights)")
    p.add_argument("--compile", action="store_true", help="also the static KV cache + torch.compile'd decode step")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_speed.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from preftune.rollout.backends import SamplingSettings, make_backend

    policy, tok, prompt_ids = rollout_batch(args.model, args.prompts, args.k, args.lora)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=len(prompt_ids))
    fp32 = make_backend("hf", tok)
    fp32.sync(policy)
    quantized, build_s, refresh_s, last = {}, {}, {}, {}
    for name in ("int8", "fp16"):
        quantized[name] = make_backend(name, tok)
        t = time.perf_counter()
        quantized[name].sync(policy)
        build_s[name] = time.perf_counter() - t
        with torch.no_grad():  # an update, so that the refresh re-quantizes every linear layer as in training
            for q in policy.parameters():
                if q.requires_grad:
                    q.add_(0.0)
        t = time.perf_counter()
        quantized[name].sync(policy)
        refresh_s[name] = time.perf_counter() - t

    def quantized_sampler(name):
        def run(seed):
            rate, tokens, rows = sampler_run(quantized[name], prompt_ids, settings, seed)
            last[name] = rows
            return rate, tokens
        return run

    def limit(model):
        return lambda seed: (decode_limit(model, tok, prompt_ids, args.max_new_tokens), None)

    variants = {
        "fp32 sampler": lambda seed: sampler_run(fp32, prompt_ids, settings, seed)[:2],
        "int8 sampler": quantized_sampler("int8"),
        "fp16 sampler": quantized_sampler("fp16"),
        "fp32 limit": limit(policy),
        "int8 limit": limit(quantized["int8"].model),
        "fp16 limit": limit(quantized["fp16"].model),
    }
    compile_s = None
    if args.compile:
        t = time.perf_counter()
        compiled_generate(policy, tok, prompt_ids, settings, 0)  # compiles (and warms up) the decode step
        compile_s = time.perf_counter() - t
        variants["fp32 static+compile"] = lambda seed: compiled_generate(policy, tok, prompt_ids, settings, seed)
    for fn in variants.values():  # warm-up
        fn(0)

    names = list(variants)
    rates: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[float]] = {n: [] for n in names}
    busy0, wall0, cpu0 = system_busy_s(), time.perf_counter(), cpu_s()
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            rate, tok_s = variants[name](r + 1)
            rates[name].append(rate)
            if tok_s is not None:
                tokens[name].append(tok_s)
        print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names), flush=True)
    others = max(0.0, (system_busy_s() - busy0) - (cpu_s() - cpu0)) / (time.perf_counter() - wall0) / (os.cpu_count() or 1)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    pairs = [("int8 sampler", "fp32 sampler"), ("fp16 sampler", "fp32 sampler"), ("fp32 sampler", "fp32 limit"),
             ("int8 sampler", "fp32 limit"), ("fp16 sampler", "fp32 limit"), ("int8 limit", "fp32 limit"),
             ("fp16 limit", "fp32 limit")]
    if args.compile:
        pairs += [("fp32 static+compile", "fp32 sampler"), ("fp32 static+compile", "fp32 limit")]
    result = {
        "model": args.model, "rows": len(prompt_ids), "max_new_tokens": args.max_new_tokens, "lora": args.lora,
        "threads": torch.get_num_threads(), "rounds": args.rounds, "other_processes_cpu_share": others,
        "row_steps_per_s": rates, "tokens_per_s": {n: v for n, v in tokens.items() if v},
        "ratios": {f"{a} / {b}": ratio(a, b) for a, b in pairs},
        "build_s": build_s, "refresh_s": refresh_s, "compile_s": compile_s,
        "mismatch": {name: mismatch(policy, tok, rows) for name, rows in last.items()},
    }
    print(f"{args.model}: {len(prompt_ids)} rows x <= {args.max_new_tokens} tokens, {result['threads']} thread(s), "
          f"{args.rounds} interleaved rounds (other processes used {others:.0%} of the CPUs)")
    for name in names:
        tok_s = f", {statistics.median(tokens[name]):.1f} tokens/s" if tokens[name] else ""
        print(f"  {name:20s} {statistics.median(rates[name]):7.1f} row-steps/s{tok_s}")
    for key, value in result["ratios"].items():
        print(f"  {key:40s} {value:5.2f}x")
    for name, m in result["mismatch"].items():
        print(f"{name} copy: built in {build_s[name]:.1f} s, refreshed in {refresh_s[name]:.1f} s; on its {m['tokens']} sampled "
              f"tokens π_fp32/π_{name} = {m['mean_ratio']:.4f}, KL(π_{name}‖π_fp32) = {m['kl_k3']:.2e}, "
              f"max |Δ log π| = {m['max_abs_dlogp']:.3f}")
    if compile_s is not None:
        print(f"static cache + torch.compile: first call (compile) {compile_s:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
