"""PROTOTYPE (not used by preftune): time and peak RSS of one DPO training step under memory options.

Each configuration runs in its own process (peak RSS is per process), in the same way a preftune
DPO step does (policy forward over the pair batch through preftune.models.logprobs, DPO loss against
precomputed reference log-probs, backward, clip, AdamW), and reports the median step time and the
process's peak RSS. Options compared (see --configs):

    gc=none|full|sac|half  activation checkpointing: none (preftune today), every layer (TRL's
                           default), selective (save matmul/attention outputs, recompute the
                           element-wise ops: SiLU, products, RMSNorm, RoPE, casts), or every 2nd layer
    layout=padded|shared   preftune's [prompt+chosen; prompt+rejected] rows, or one row per pair with
                           the prompt once (benchmarks/proto_shared_prompt.py)
    optim=default|fused    torch.optim.AdamW as preftune builds it, or fused=True (TRL's default)
    mmap=N                 mallopt(M_MMAP_THRESHOLD, N) at start: large blocks go back to the OS
                           when freed instead of staying in glibc's heap (0 = glibc's default)

    python benchmarks/proto_memory.py --configs "gc=none" "gc=sac" "gc=full" "gc=none,layout=shared"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sac_context():
    from functools import partial

    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_efficient_attention.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return partial(create_selective_checkpoint_contexts, policy)


def child(cfg: dict, args) -> dict:
    if cfg.get("mmap"):
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(cfg["mmap"]))  # M_MMAP_THRESHOLD
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.data import make_pairs
    from benchmarks.proto_shared_prompt import shared_prompt_batch, shared_prompt_logps
    from preftune.data.collate import collate_pairs
    from preftune.data.records import PairRecord
    from preftune.data.tokenize import tokenize_pairs
    from preftune.models.loading import load_model
    from preftune.models.logprobs import concatenated_logps

    model, tok = load_model(args.model)
    rss_load = _rss_mb()
    gc = cfg.get("gc", "none")
    if gc == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc == "half":
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)
    elif gc == "sac":
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": sac_context()})
    model.train()
    n = args.pairs * (args.steps + 1)
    recs = [PairRecord(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in make_pairs(n, 0)]
    examples, _ = tokenize_pairs(recs, tok, max_length=512)
    pad = tok.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, **({"fused": True} if cfg.get("optim") == "fused" else {}))
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    times, parts = [], []
    for s in range(args.steps + 1):
        ex = examples[s * args.pairs : (s + 1) * args.pairs]
        t0 = time.perf_counter()
        with ac:
            if cfg.get("layout") == "shared":
                c, r = shared_prompt_logps(model, shared_prompt_batch(ex, pad))
            else:
                out = concatenated_logps(model, collate_pairs(ex, pad))
                c, r = out["chosen_logps"], out["rejected_logps"]
        loss = -torch.nn.functional.logsigmoid(0.1 * ((c - c.detach()) - (r - r.detach()))).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if s:  # step 0 allocates the optimizer state
            times.append(t3 - t0)
            parts.append((t1 - t0, t2 - t1, t3 - t2))
    med = sorted(range(len(times)), key=lambda i: times[i])[len(times) // 2]
    return {"cfg": cfg, "s_per_step": statistics.median(times), "fwd_bwd_opt": parts[med], "steps": times,
            "peak_mb": _peak_mb(), "rss_after_load_mb": rss_load, "peak_increase_mb": _peak_mb() - rss_load}


def parse_cfg(text: str) -> dict:
    return dict(kv.split("=", 1) for kv in text.split(",") if kv)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--configs", nargs="+", default=["gc=none", "gc=sac", "gc=half", "gc=full", "gc=none,layout=shared",
                                                     "gc=sac,layout=shared", "gc=none,optim=fused", "gc=none,mmap=131072"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(parse_cfg(args.child), args)))
        return 0
    from benchmarks.dpo_vs_trl import _system_busy_s

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    base = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype, "--steps", str(args.steps),
            "--pairs", str(args.pairs), "--threads", str(args.threads)]
    results = []
    for rep in range(args.repeats):
        for text in (args.configs if rep % 2 == 0 else args.configs[::-1]):
            b0, t0 = _system_busy_s(), time.perf_counter()
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            out = subprocess.run(base + ["--child", text], env=env, capture_output=True, text=True)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            own = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            others = ((_system_busy_s() - b0) - own) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(text, "FAILED", out.stderr[-2000:])
                continue
            r = json.loads(line[0][7:])
            r["others"] = others
            results.append(r)
            f, b, o = r["fwd_bwd_opt"]
            print(f"{text:<28} {r['s_per_step']:6.2f} s/step (fwd {f:.2f} bwd {b:.2f} clip+opt {o:.2f})  "
                  f"peak {r['peak_mb'] / 1024:5.2f} GB  +load {r['peak_increase_mb'] / 1024:5.2f} GB  "
                  f"others {others:.0%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
