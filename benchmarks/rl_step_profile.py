#!/usr/bin/env python
"""Where an online RL step's time goes (GRPO / RLOO / ...), and how close the rollout's decode is to
the fp32 decode limit of this machine.

    python benchmarks/rl_step_profile.py                                  # GRPO on SmolLM2-135M, 4 prompts x 4, 32 tokens
    python benchmarks/rl_step_profile.py --algorithm rloo --steps 3 --threads 1
    python benchmarks/rl_step_profile.py --model tiny-random-llama        # smoke run
    python benchmarks/rl_step_profile.py --sampler fp16 --threads 1       # rollouts from a quantized copy (TIS cap 2)

One process, the real loop's pieces: the algorithm's rollout (``make_rollout``: sampling, reward,
old-policy / reference forward, advantages) and the loop's step (``_run_step``: forward + backward of
every micro-batch), then the optimizer step. Phases are timed by wrapping the methods the loop calls:

* ``generate``: ``OnlineAlgorithm._generate`` (the rollout backend's ``generate``);
* ``sampler sync``: ``OnlineAlgorithm._sync_sampler`` (re-quantizing the int8 copy; ~0 for ``hf``);
* ``reward``: the reward source; ``score_rows``: the old-policy / reference forward of the rollout;
* ``rollout other``: the rest of ``make_rollout`` (advantages, row building, metrics);
* ``train fwd+bwd``: ``_run_step``; ``optimizer``: AdamW step and zero_grad.

The decode limit: the same model, the same rollout batch (rows x left-padded prompt), one prefill and
then ``max_new_tokens`` single-token forwards with the KV cache and nothing else (no sampling, no
stopping logic, under inference mode): generated tokens/s of the rollout's sampler as a fraction of
that is how much of the decode is overhead (the best of 3 limit runs against the sampler's best step). Numbers depend on the load of the machine: the script
prints the CPU share other processes used while it ran (from /proc/stat), so a busy run is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import cpu_s, system_busy_s  # noqa: E402


def timed(store: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[name] += time.perf_counter() - start

    return wrapper


@torch.inference_mode()
def decode_limit(model, tokenizer, prompt_ids: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of prefill + ``new_tokens`` bare cached forwards over the whole batch (fp32)."""
    from preftune.rollout.sampling import _left_pad

    ids, mask = _left_pad(prompt_ids, tokenizer.pad_token_id, next(model.parameters()).device)
    model.eval()
    start = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return len(prompt_ids) * new_tokens / (time.perf_counter() - start)


def train_limit(model, batches: list[dict]) -> float:
    """Seconds of a bare forward + backward over the step's micro-batches: the model's full logits,
    log-softmax, the completion tokens' log-probs summed; none of preftune's loss, metrics or
    bookkeeping (preftune's forward evaluates the output head at the completion positions only)."""
    model.train()
    start = time.perf_counter()
    for b in batches:
        ids, mask = b["input_ids"], b["completion_mask"][:, 1:].float()
        logits = model(input_ids=ids, attention_mask=b["attention_mask"]).logits[:, :-1]
        logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        (logps * mask).sum().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--algorithm", default="grpo")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (0 for GRPO keeps no reference forward)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--sampler", default="hf", choices=["hf", "int8", "fp16"], help="rollout backend (<algorithm>.sampler)")
    p.add_argument("--tis-cap", type=float, default=None, help="<algorithm>.tis_cap (default: 2.0 with a quantized sampler, else off)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rl_step_profile.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    import preftune.algorithms.online as online
    from preftune.run_config import load_run_config
    from preftune.train.loop import _run_step, build_algorithm
    from preftune.train.optim import build_optimizer

    a, rows = args.algorithm, args.prompts * args.k
    cap = args.tis_cap if args.tis_cap is not None else (2.0 if args.sampler != "hf" else None)
    run = load_run_config(None, [
        f"algorithm={a}", "output_dir=/tmp/rl_step_profile", f"model.name={args.model}", "data.path=builtin:movie_review_prompts",
        "data.max_length=96", f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum_steps={max(1, rows // args.micro_batch)}",
        f"{a}.samples_per_prompt={args.k}", f"{a}.max_new_tokens={args.max_new_tokens}", f"{a}.generation_batch_size={rows}",
        f"{a}.kl_coef={args.beta}", f"{a}.log_samples_steps=0", "model.lora.enabled=true", "model.lora.dropout=0.0",
        f"{a}.sampler={args.sampler}", *([f"{a}.tis_cap={cap}"] if cap is not None else []),
    ])
    phases: dict[str, float] = defaultdict(float)
    online.OnlineAlgorithm._generate = timed(phases, "generate", online.OnlineAlgorithm._generate)
    online.OnlineAlgorithm._score_rows = timed(phases, "score_rows", online.OnlineAlgorithm._score_rows)
    online.OnlineAlgorithm._sync_sampler = timed(phases, "sampler sync", online.OnlineAlgorithm._sync_sampler)
    accelerator = Accelerator(cpu=True)
    algo, examples, _, _ = build_algorithm(run)
    algo.reward_fn = timed(phases, "reward", algo.reward_fn)
    optimizer = build_optimizer([q for q in algo.parameters() if q.requires_grad], run.train)
    algo, optimizer = accelerator.prepare(algo, optimizer)
    inner = accelerator.unwrap_model(algo)
    source = inner.make_source(examples, accelerator)
    make_rollout = inner.make_rollout
    inner.make_rollout = timed(phases, "rollout", make_rollout)
    generated, per_step = 0, []

    busy0, wall0, cpu0 = system_busy_s(), time.perf_counter(), cpu_s()
    for step in range(args.steps + 1):
        if step == 1:  # the first step warms up: discard it
            phases.clear()
            generated, start = 0, time.perf_counter()
            busy0, wall0, cpu0 = system_busy_s(), time.perf_counter(), cpu_s()
        gen_before = phases["generate"]
        batches = source.next_step()
        tokens = sum(int(b["completion_mask"].sum()) for b in batches)
        generated += tokens
        if step and phases["generate"] > gen_before:
            per_step.append(tokens / (phases["generate"] - gen_before))
        last_batches = batches
        t = time.perf_counter()
        _run_step(algo, batches, accelerator, source.pop_metrics())
        phases["train fwd+bwd"] += time.perf_counter() - t
        t = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phases["optimizer"] += time.perf_counter() - t
    total = time.perf_counter() - start
    others = max(0.0, (system_busy_s() - busy0) - (cpu_s() - cpu0)) / (time.perf_counter() - wall0) / (os.cpu_count() or 1)
    phases["rollout other"] = phases.pop("rollout") - phases["generate"] - phases["reward"] - phases["score_rows"] - phases["sampler sync"]

    prompts = [source.prompts[i]["prompt_ids"] for i in range(args.prompts) for _ in range(args.k)]
    # best of 3 (and the sampler's best step): on a shared machine the fastest run is the least disturbed one
    limit = max(decode_limit(inner.policy, inner.tokenizer, prompts, args.max_new_tokens) for _ in range(3))
    sampled = max(per_step) if per_step else float("nan")
    bare_train = min(train_limit(inner.policy, last_batches) for _ in range(3))
    train_s = phases["train fwd+bwd"] / args.steps
    result = {
        "model": args.model, "algorithm": a, "sampler": args.sampler, "tis_cap": cap, "rows": rows, "max_new_tokens": args.max_new_tokens, "beta": args.beta,
        "threads": torch.get_num_threads(), "steps": args.steps, "s_per_step": total / args.steps,
        "phases_s_per_step": {k: v / args.steps for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "sampled_tokens_per_s": sampled, "sampled_tokens_per_s_mean": generated / max(phases["generate"], 1e-9), "decode_limit_tokens_per_s": limit, "fraction_of_limit": sampled / limit,
        "train_limit_s": bare_train, "train_fraction_of_limit": bare_train / train_s,
        "other_processes_cpu_share": others,
    }
    print(f"{a} ({args.sampler} sampler) on {args.model}: {rows} rows x <= {args.max_new_tokens} tokens, β={args.beta}, {result['threads']} threads, "
          f"{result['s_per_step']:.2f} s/step over {args.steps} steps (other processes used {others:.0%} of the CPUs)")
    for name, s in result["phases_s_per_step"].items():
        print(f"  {name:14s} {s:7.2f} s  {s / result['s_per_step']:5.1%}")
    print(f"decode: sampler {sampled:.1f} tok/s, bare fp32 cached forward {limit:.1f} tok/s -> {result['fraction_of_limit']:.0%} of the limit")
    print(f"train: fwd+bwd {train_s:.2f} s/step, bare fwd+bwd of the same micro-batches {bare_train:.2f} s "
          f"-> {result['train_fraction_of_limit']:.0%} of the limit's speed")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
