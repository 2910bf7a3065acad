"""Shared harness of the preftune-vs-other-trainer benchmarks (``dpo_vs_trl.py`` and the like).

A benchmark defines named contestants ("variants") and a function that trains one of them inside a
child process, reporting to a :class:`Probe`; this module does the rest:

* one child process per run, launched one after another (peak RSS from ``getrusage`` is per
  process), with the same torch/OMP thread count and offline environment for every child;
* a fresh ``PREFTUNE_CACHE`` per run (so reference log-probs are always recomputed and timed) whose
  ``models/`` links to the real cache (no contestant pays for a model conversion);
* noise control for shared machines: the CPU share of *other* processes during the timed steps
  (from ``/proc/stat``), ``--wait-quiet`` before each run and ``--retries`` of noisy runs;
* the summary of a run: steady-state tokens per wall- and CPU-second over the timed steps (the
  first ``--warmup`` steps are discarded), median step time, peak RSS, precompute time, first loss;
* the table, the ours/theirs ratios against targets, and a JSON file with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------- probes


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def system_busy_s() -> float:
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
        b0, t0 = system_busy_s(), time.monotonic()
        time.sleep(window_s)
        frac = (system_busy_s() - b0) / ((time.monotonic() - t0) * ncpu)
        if frac < threshold or time.monotonic() > deadline:
            return frac


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Probe:
    """Time stamps, memory marks and token counts of one run, recorded inside its child process.

    The trainer's hooks call :meth:`mark` at named moments (``model_loaded`` is required: it is the
    memory baseline), :meth:`add_tokens` for each micro-batch and :meth:`step_end` at the end of each
    optimizer step; anything else worth keeping goes into ``extra`` (``precompute_s``, ``lengths``).
    """

    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: dict[str, dict] = {}
        self.steps: list[dict] = []
        self.pending_fwd = 0
        self.pending_tokens = 0
        self.pending_loss: list[float] = []
        self.extra: dict = {}

    def mark(self, name: str) -> None:
        self.marks[name] = {"t": time.perf_counter() - self.t0, "rss_mb": rss_mb(), "peak_mb": peak_mb(),
                            "cpu_s": cpu_s(), "sys_busy_s": system_busy_s()}

    def add_tokens(self, fwd: int, counted: int) -> None:
        """A micro-batch: ``fwd`` positions the forward processes (no padding), ``counted`` the tokens
        that tok/s counts (the benchmark's definition, the same for every contestant)."""
        self.pending_fwd += fwd
        self.pending_tokens += counted

    def step_end(self, step: int, loss: float | None) -> None:
        """End of an optimizer step; ``loss`` None: the mean of the losses in ``pending_loss``."""
        if loss is None and self.pending_loss:
            loss = sum(self.pending_loss) / len(self.pending_loss)
        self.steps.append(
            {"step": step, "t": time.perf_counter() - self.t0, "cpu_s": cpu_s(), "sys_busy_s": system_busy_s(),
             "fwd_tokens": self.pending_fwd, "tokens": self.pending_tokens, "loss": loss,
             "peak_mb": peak_mb(), "rss_mb": rss_mb()}
        )
        self.pending_fwd = self.pending_tokens = 0
        self.pending_loss = []

    def result(self) -> dict:
        return {"marks": self.marks, "steps": self.steps, **self.extra}


def mark_when_model_loaded(probe: Probe) -> None:
    """Mark ``model_loaded`` (the memory baseline) right after preftune's ``load_model`` returns; the
    training code imports it from the module at call time, so patching the module attribute works."""
    import preftune.models.loading as loading

    original = loading.load_model

    def load_model(*args, **kwargs):
        out = original(*args, **kwargs)
        probe.mark("model_loaded")
        return out

    loading.load_model = load_model


def best_runs(runs: dict[str, list[dict]], max_others: float, key: str) -> dict[str, dict]:
    """Per variant, the run to report: each successful run is marked ``noisy`` when other processes
    used more than ``max_others`` of the CPUs; the best by ``key`` among the quiet runs (or among all
    successful ones if none was quiet), else the last failed run."""
    results: dict[str, dict] = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        for r in ok:
            r["noisy"] = r["others_cpu_share"] > max_others
        quiet = [r for r in ok if not r["noisy"]]
        results[name] = max(quiet or ok, key=lambda r: r[key]) if ok else rs[-1]
    return results


def child_main(spec_path: str, result_path: str, train: Callable[[dict, Probe], None]) -> None:
    """Entry point of a child process: ``train(spec, probe)`` one run, then write the probe's record."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    probe = Probe()
    probe.extra["loadavg_start"] = os.getloadavg()
    train(spec, probe)
    probe.extra["loadavg_end"] = os.getloadavg()
    probe.extra["torch_threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(probe.result()))


# ------------------------------------------------------------------------------------------- summary


def summarize(raw: dict, warmup: int) -> dict:
    """Steady-state figures of one run from its probe record (see the module docstring)."""
    steps = raw["steps"]
    if len(steps) <= warmup:
        return {"error": f"only {len(steps)} steps recorded"}
    timed = steps[warmup:]
    start = steps[warmup - 1]
    t0, c0 = start["t"], start["cpu_s"]
    ncpu = os.cpu_count() or 1
    wall = timed[-1]["t"] - t0
    # CPU-seconds used by OTHER processes during the timed steps, as a share of the machine.
    others = max(0.0, (timed[-1]["sys_busy_s"] - start["sys_busy_s"]) - (timed[-1]["cpu_s"] - c0)) / (wall * ncpu)
    tokens = sum(s["tokens"] for s in timed)
    fwd = sum(s["fwd_tokens"] for s in timed)
    step_times = [b["t"] - a["t"] for a, b in zip(steps[warmup - 1 :], steps[warmup:])]
    load = raw["marks"]["model_loaded"]
    out = dict(
        timed_steps=len(timed),
        wall_s=wall,
        s_per_step=sorted(step_times)[len(step_times) // 2],
        step_times=step_times,
        tokens=tokens,
        fwd_tokens=fwd,
        tok_s=tokens / wall,
        fwd_tok_s=fwd / wall,
        cpu_tok_s=tokens / (timed[-1]["cpu_s"] - c0),
        rss_after_load_mb=load["rss_mb"],
        peak_train_mb=timed[-1]["peak_mb"],
        peak_increase_mb=timed[-1]["peak_mb"] - load["rss_mb"],
        precompute_s=raw.get("precompute_s"),
        first_loss=steps[0]["loss"],
        losses=[s["loss"] for s in steps],
        loadavg=[raw.get("loadavg_start"), raw.get("loadavg_end")],
        others_cpu_share=others,
    )
    a, b = raw["marks"].get("precompute_start"), raw["marks"].get("precompute_end")
    if a and b and b["t"] > a["t"]:
        out["precompute_others_cpu_share"] = max(0.0, (b["sys_busy_s"] - a["sys_busy_s"]) - (b["cpu_s"] - a["cpu_s"])) / (
            (b["t"] - a["t"]) * ncpu)
    lengths = raw.get("lengths") or {}
    if any(lengths.values()):
        out["token_lengths"] = {k: [min(x), max(x), round(sum(x) / len(x), 1)] for k, x in lengths.items() if x}
    return out


def fmt(x, spec="{:.2f}"):
    return "-" if x is None else spec.format(x)


def print_table(results: dict[str, dict], columns: list[tuple], name_width: int = 24) -> None:
    """One row per variant (``*`` marks a noisy measurement). ``columns``: (header, width, value of a result
    row -> text); a header starting with two spaces is printed left-aligned after two spaces (a free tail)."""
    head = f"{'variant':<{name_width}}" + "".join(h if h.startswith("  ") else f"{h:>{w}}" for h, w, _ in columns)
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<{name_width}} ERROR {r['error']}")
            continue
        label = name + (" *" if r.get("noisy") else "")
        print(f"{label:<{name_width}}" + "".join(f"  {v(r)}" if h.startswith("  ") else f"{v(r):>{w}}" for h, w, v in columns))


def dpo_columns(max_others: float = 0.10) -> list[tuple]:
    """The columns of the DPO benchmark's table (a precompute time whose CPU was shared is starred)."""
    def precompute(r: dict) -> str:
        return fmt(r["precompute_s"], "{:.1f}") + ("*" if (r.get("precompute_others_cpu_share") or 0) > max_others else "")

    return [
        ("s/step", 8, lambda r: f"{r['s_per_step']:.2f}"), ("tok/s", 8, lambda r: f"{r['tok_s']:.1f}"),
        ("fwd tok/s", 10, lambda r: f"{r['fwd_tok_s']:.1f}"), ("cpu tok/s", 10, lambda r: fmt(r["cpu_tok_s"], "{:.1f}")),
        ("peak GB", 9, lambda r: f"{r['peak_train_mb'] / 1024:.2f}"), ("+load GB", 9, lambda r: f"{r['peak_increase_mb'] / 1024:.2f}"),
        ("precomp s", 10, precompute), ("loss@1", 9, lambda r: fmt(r["first_loss"], "{:.4f}")),
        ("others", 8, lambda r: fmt(r["others_cpu_share"], "{:.0%}")),
    ]


def ratios(results: dict[str, dict], comparisons: list[tuple]) -> list[dict]:
    """ours/theirs ratios for each (ours, theirs, tok/s target or None, peak target or None) present."""
    rows = []
    for ours, theirs, speed_target, mem_target in comparisons:
        a, b = results.get(ours), results.get(theirs)
        if not a or not b or "error" in a or "error" in b:
            continue
        row = {
            "ours": ours, "theirs": theirs,
            "tok_s": a["tok_s"] / b["tok_s"],
            "cpu_tok_s": a["cpu_tok_s"] / b["cpu_tok_s"],
            "peak": a["peak_train_mb"] / b["peak_train_mb"],
            "peak_increase": a["peak_increase_mb"] / b["peak_increase_mb"],
            "same_tokens": a["tokens"] == b["tokens"],
            "speed_target": speed_target, "mem_target": mem_target,
        }
        if speed_target is not None:
            row["speed_met"] = row["tok_s"] >= speed_target
        if mem_target is not None:
            row["mem_met"] = row["peak"] <= mem_target
        rows.append(row)
    return rows


def print_ratios(rows: list[dict], label: str = "preftune / other") -> None:
    print(f"\n{label:<46}{'tok/s':>7}{'cpu':>7}{'peak':>7}{'+load':>7}  target")
    for r in rows:
        targets = []
        if r["speed_target"] is not None:
            targets.append(f"tok/s >= {r['speed_target']}x {'MET' if r['speed_met'] else 'MISSED'}")
        if r["mem_target"] is not None:
            targets.append(f"peak <= {r['mem_target']}x {'MET' if r['mem_met'] else 'MISSED'}")
        same = "" if r["same_tokens"] else " (token counts differ)"
        print(f"{r['ours'] + ' / ' + r['theirs']:<46}{r['tok_s']:>7.2f}{fmt(r['cpu_tok_s']):>7}{r['peak']:>7.2f}"
              f"{r['peak_increase']:>7.2f}  {', '.join(targets)}{same}")


def ratio_ranges(runs: dict[str, list[dict]], comparisons: list[tuple]) -> list[dict]:
    """min and max over the repeats of each ours/theirs ratio, each taken within one repeat (runs of
    the same round of ``--repeat``, so that slow phases of a shared machine hit both sides alike).
    A repeat's run of a variant is its last attempt (the quiet one, if any was)."""
    by_round: dict[int, dict[str, dict]] = {}
    for name, rs in runs.items():
        for r in rs:
            if "error" not in r:
                rep = int(r["run"][len(name) + 1 :].split("-")[0])
                by_round.setdefault(rep, {})[name] = r
    rows = []
    for ours, theirs, speed_target, mem_target in comparisons:
        per_round = [ratios(results, [(ours, theirs, speed_target, mem_target)]) for results in by_round.values()]
        per_round = [x[0] for x in per_round if x]
        if not per_round:
            continue
        row = {"ours": ours, "theirs": theirs, "rounds": len(per_round),
               "speed_target": speed_target, "mem_target": mem_target}
        for key in ("tok_s", "cpu_tok_s", "peak"):
            values = [x[key] for x in per_round]
            row[key] = [min(values), max(values)]
        row["noisy_rounds"] = sum(1 for results in by_round.values()
                                  if any(results.get(n, {}).get("noisy") for n in (ours, theirs)))
        rows.append(row)
    return rows


def print_ratio_ranges(rows: list[dict], label: str = "preftune / other") -> None:
    print(f"\n{label + ', min - max over rounds':<46}{'tok/s':>13}{'cpu tok/s':>13}{'peak':>13}  rounds (noisy)")
    for r in rows:
        cells = "".join(f"{r[k][0]:>6.2f}-{r[k][1]:<6.2f}" for k in ("tok_s", "cpu_tok_s", "peak"))
        print(f"{r['ours'] + ' / ' + r['theirs']:<46}{cells}  {r['rounds']} ({r['noisy_rounds']})")


# ------------------------------------------------------------------------------------------- parent


def add_common_args(p: argparse.ArgumentParser, *, out: str) -> None:
    """Options every benchmark shares (model, steps, threads, noise control, output)."""
    p.add_argument("--model", default="smollm2-135m-instruct", help="any name preftune's load_model accepts")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1: the first step pays one-off costs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch / OMP threads of every contestant")
    p.add_argument("--out", default=out, help="where the JSON results go")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run wait up to S seconds for other processes to go idle (shared machines)")
    p.add_argument("--repeat", type=int, default=1, help="run the variant list this many times (alternating order); "
                   "each variant's best quiet run (highest tok/s) is kept, all runs are in the JSON")
    p.add_argument("--max-others", type=float, default=0.10, metavar="F",
                   help="a run during which other processes used more than this share of the CPUs is noisy")
    p.add_argument("--retries", type=int, default=0, help="run a noisy variant again up to this many times")
    p.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)


class Runner:
    """Launches the runs of one benchmark script, each in a child process of that script."""

    def __init__(self, script: str, args: argparse.Namespace, work: Path):
        from preftune.models.cache import cache_dir

        self.script, self.args, self.work = script, args, work
        # Fresh reference caches every run (so precompute is always measured), but the converted model
        # folder is shared: each run's PREFTUNE_CACHE is a scratch folder whose models/ links to the real one.
        self.real_cache = cache_dir()
        (self.real_cache / "models").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        threads = str(args.threads)
        env.update(
            OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TQDM_DISABLE="1",
            PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [env.get("PYTHONPATH")] if x]),
        )
        self.env = env

    def preload(self, model: str) -> None:
        """Convert/load the model once up front so no contestant pays for the GGUF conversion."""
        subprocess.run([sys.executable, "-c", f"from preftune.models.loading import load_model; load_model({model!r})"],
                       env=self.env, check=True, stdout=subprocess.DEVNULL)

    def run_one(self, name: str, tag: str, spec: dict) -> dict | None:
        """One run in its own process; its probe record, or None if it failed (the log tail is printed)."""
        run_cache = self.work / f"cache-{tag}"
        run_cache.mkdir(exist_ok=True)
        link = run_cache / "models"
        if not link.exists():
            link.symlink_to(self.real_cache / "models", target_is_directory=True)
        spec = dict(spec, variant=name, threads=self.args.threads, workdir=str(self.work))
        spec_path, result_path = self.work / f"spec-{tag}.json", self.work / f"result-{tag}.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(self.env, PREFTUNE_CACHE=str(run_cache), HF_DATASETS_CACHE=str(run_cache / "datasets"))
        if self.args.wait_quiet > 0:
            busy = wait_until_quiet(self.args.wait_quiet)
            print(f"[{time.strftime('%H:%M:%S')}] other processes using {busy:.0%} of the CPUs", flush=True)
        print(f"[{time.strftime('%H:%M:%S')}] {tag} ...", flush=True)
        log_path = self.work / f"log-{tag}.txt"
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, self.script, "--child", str(spec_path), str(result_path)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not result_path.exists():
            print(f"  FAILED (exit {proc.returncode}); last lines of {log_path}:\n{log_path.read_text()[-3000:]}", flush=True)
            return None
        return json.loads(result_path.read_text())

    def run_all(self, names: list[str], spec_of: Callable[[str], dict],
                summary_of: Callable[[str, dict], dict]) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """Every variant ``--repeat`` times (alternating order), noisy runs again up to ``--retries``
        times. Returns (each variant's best quiet run, all runs)."""
        args = self.args
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.repeat):
            for name in names if rep % 2 == 0 else names[::-1]:
                for attempt in range(1 + args.retries):
                    tag = f"{name}-{rep}" + (f"-retry{attempt}" if attempt else "")
                    t = time.perf_counter()
                    raw = self.run_one(name, tag, spec_of(name))
                    r = {"variant": name, "error": f"failed; log {self.work / f'log-{tag}.txt'}"} if raw is None else {
                        "variant": name, **summary_of(name, raw)}
                    r["run"] = tag
                    runs[name].append(r)
                    if "error" in r:
                        break
                    print(f"  {time.perf_counter() - t:.0f} s in all; {r['s_per_step']:.2f} s/step, {r['tok_s']:.1f} tok/s, "
                          f"peak {r['peak_train_mb'] / 1024:.2f} GB, first loss {fmt(r['first_loss'], '{:.4f}')}, "
                          f"other processes {r['others_cpu_share']:.0%} of the CPUs", flush=True)
                    if r["others_cpu_share"] <= args.max_others:
                        break
                    print(f"  other processes used more than {args.max_others:.0%} of the CPUs: "
                          + ("running it again" if attempt < args.retries else "keeping it, marked noisy"), flush=True)
        return best_runs(runs, args.max_others, "tok_s"), runs


def metadata(args: argparse.Namespace, **extra) -> dict:
    """Command, settings, machine and library versions of a benchmark run."""
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model, "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "seed": args.seed,
        "repeat": args.repeat, **extra,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "bf16": cpu_has_bf16()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(path: str, payload: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    return out
