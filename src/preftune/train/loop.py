"""THE training loop. Every algorithm runs through `train`; none overrides it.

The loop owns accumulation, loss normalisation over the global batch, clipping, AdamW and the
schedule, mixed precision, distributed wrapping (Accelerate), checkpoint/resume and logging. An
algorithm only turns a micro-batch into (summed loss, metrics); see preftune.algorithms.base.

Launch (the same config runs on one CPU, one GPU or many processes):
    preftune train configs/sft.yaml                              # one process
    accelerate launch --num_processes 2 -m preftune train ...    # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node 2 -m preftune train ...            # same, with torchrun
    torchrun --nproc_per_node 2 -m preftune train ... train.sharding=fsdp2   # FSDP2 (train/sharding.py)
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m preftune train ...   # same, on GPUs
    torchrun --nproc_per_node 2 -m preftune train ... train.sharding=zero3   # DeepSpeed ZeRO (train/zero.py)
    accelerate launch --config_file configs/accelerate/zero3.yaml -m preftune train ...   # same
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from preftune.algorithms import ALGORITHMS
from preftune.config import ConfigError, RunConfig, run_config_to_dict
from preftune.data.records import DataError
from preftune.data.source import split_eval
from preftune.models.lora import apply_lora, enable_gradient_checkpointing
from preftune.train import sharding, zero
from preftune.train.checkpoint import (
    checkpoints_dir,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from preftune.train.evaluate import evaluate
from preftune.train.guard import StepGuard, step_rows
from preftune.train.metrics import MetricsLog
from preftune.train.optim import build_optimizer, build_scheduler
from preftune.train.zero import ZeroPlan

log = logging.getLogger("preftune.train")


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    metrics_path: Path
    steps: int
    last_metrics: dict


def _check_output_dir(run: RunConfig, accelerator: Accelerator) -> Path | None:
    """Return the checkpoint to resume from; refuse to silently overwrite an earlier run's work."""
    out = Path(run.output_dir)
    if run.train.resume_from:
        return resolve_resume(out, run.train.resume_from)
    if list_checkpoints(out):
        if not run.train.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {out} holds checkpoints of an earlier run. Continue it with "
                "train.resume_from=latest, or discard them with train.overwrite_output_dir=true"
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(checkpoints_dir(out))
        accelerator.wait_for_everyone()
    return None


def build_module(run: RunConfig, *, gradient_checkpointing: bool = False):
    """The algorithm module of ``run``: its policy (a causal LM, or e.g. a reward model's classifier)
    with LoRA applied, plus whatever heads the algorithm adds. Checkpoints name weights after it."""

    algo_cls = ALGORITHMS[run.algorithm]
    model, tokenizer = algo_cls.load_policy(run.algo, run)
    lora = run.model.lora
    if lora.enabled:
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return algo_cls(run.algo, model, tokenizer, run)


def build_algorithm(run: RunConfig):
    """Load data, model and algorithm (everything before the optimizer)."""
    algo_cls = ALGORITHMS[run.algorithm]
    records = algo_cls.load_records(run.algo, run.data.path, run.data.split)  # bad data fails before the model loads
    if run.data.max_rows is not None:
        records = records[: run.data.max_rows]
    if not records:
        raise DataError(
            f"no usable {algo_cls.needs.data_kind} rows (rows that carry no training signal are dropped: pairs whose "
            "chosen equals rejected, rankings whose completions are all tied)", source=str(run.data.path),
        )
    algo = build_module(run, gradient_checkpointing=run.model.gradient_checkpointing)
    examples, report = algo.tokenize(records, source=run.data.path)
    if not examples:
        raise DataError(f"no rows left to train on after tokenization ({report}); raise data.max_length or "
                        "use data.truncation=keep_end", source=str(run.data.path))
    eval_examples: list[dict] = []
    if run.data.eval_path:
        eval_records = algo_cls.load_records(run.algo, run.data.eval_path, run.data.split)
        eval_examples, _ = algo.tokenize(eval_records, source=run.data.eval_path)
    else:
        examples, eval_examples = split_eval(examples, run.data.eval_fraction, run.train.seed)
    return algo, examples, eval_examples, report


@dataclass
class _Session:
    """Everything one training run holds between steps."""

    run: RunConfig
    accelerator: Accelerator
    algo: Any
    inner: Any
    params: list
    optimizer: Any
    scheduler: Any
    source: Any
    eval_examples: list
    metrics_log: MetricsLog
    guard: StepGuard
    total_steps: int
    step: int
    sharded: bool = False


def _make_accelerator(run: RunConfig) -> Accelerator:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # A second run in one process (tests, studies) may change mixed precision; Accelerate keeps a
        # process-wide singleton, so drop it when there is no process group to keep.
        AcceleratorState._reset_state(reset_partial_state=True)
    # cpu=True without CUDA: that is how Accelerate recognises a multi-process CPU (gloo) launch.
    with zero.hidden_from_accelerate():  # a DeepSpeed launch config is the loop's to act on (train/zero.py)
        return Accelerator(
            mixed_precision="bf16" if run.model.dtype == "bf16" else "no", log_with=run.train.report_to or None,
            project_dir=str(run.output_dir), cpu=not torch.cuda.is_available(),
        )


def _distribute(algo, plan, rows: list[dict], accelerator: Accelerator, t):
    """Place ``algo`` as ``plan`` says (DDP through Accelerate, FSDP2 shards, or a DeepSpeed engine)
    and prepare ``rows`` (train + held-out, one call: the hook may free what it used, e.g. a
    reference model). Returns (algo as trained, the bare module, trainable parameters, the torch
    optimizer, prepared rows)."""
    if plan is None:
        params = [p for p in algo.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, t)
        algo, optimizer = accelerator.prepare(algo, optimizer)
        inner = accelerator.unwrap_model(algo)
        return algo, inner, params, optimizer, inner.prepare_examples(rows, accelerator)
    # Before sharding: each process scores its own share of rows there (e.g. reference log-probs),
    # which a sharded forward, collective in every layer, could not do.
    inner = algo.to(accelerator.device)
    rows = inner.prepare_examples(rows, accelerator)
    if isinstance(plan, ZeroPlan):
        params = [p for p in algo.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, t)
        algo = zero.initialize(algo, optimizer, plan, t, bf16=accelerator.mixed_precision == "bf16")  # the engine: DeepSpeed partitions the optimizer's groups
        return algo, inner, params, optimizer, rows
    sharding.shard(algo, plan)  # Accelerate never sees the model, so it cannot wrap it a second time
    params = [p for p in algo.parameters() if p.requires_grad]  # the sharded (DTensor) parameters
    # Not handed to accelerator.prepare either: under an FSDP2 launch config Accelerate refuses an
    # optimizer without its model, and there is nothing for it to do (no grad scaler: bf16 or fp32).
    return algo, inner, params, build_optimizer(params, t), rows


def _start(run: RunConfig) -> _Session:
    """Data, model, optimizer, schedule and batch source of ``run``, resumed if asked."""
    t, out = run.train, Path(run.output_dir)
    check_output_dir_writable(out)  # before minutes of model loading and reference log-probs
    accelerator = _make_accelerator(run)
    resume_path = _check_output_dir(run, accelerator)
    plan = sharding.plan_for(run, accelerator)  # before any model loads: a refused launch config costs nothing
    if isinstance(plan, ZeroPlan):
        zero.import_deepspeed()  # not installed: one line, before the model loads
    set_seed(t.seed)
    algo, examples, eval_examples, report = build_algorithm(sharding.as_planned(run, plan))
    if accelerator.is_main_process:
        log.info("data: %d training rows, %d held out, from %s; %s", len(examples), len(eval_examples), run.data.path, report)
    algo, inner, params, optimizer, both = _distribute(algo, plan, examples + eval_examples, accelerator, t)
    examples, eval_examples = both[: len(examples)], both[len(examples) :]
    source = inner.make_source(examples, accelerator)
    total_steps = t.max_steps or t.num_epochs * source.steps_per_epoch
    scheduler = build_scheduler(optimizer, t, total_steps)  # stepped by us, once per optimizer step
    if zero.is_engine(algo):
        optimizer = algo.optimizer  # ZeRO's: its state is per partition (checkpoints); the scheduler drives its groups
    step = 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, module=inner, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator)
        step = int(state["step"])
        source.load_state_dict(state["source"])
        inner.load_extra_state(state["algorithm"])
        follow_learning_rate(optimizer, scheduler, t.learning_rate)
        if accelerator.is_main_process:
            log.info("resumed from %s at step %d", resume_path, step)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(run_config_to_dict(run), sort_keys=False))
    if t.report_to:
        accelerator.init_trackers(out.name, config=_flat(run_config_to_dict(run)))
    metrics_log = MetricsLog(out / "metrics.jsonl", resume_step=step if resume_path else None, enabled=accelerator.is_main_process)
    guard = StepGuard(t, out, chance_loss=inner.chance_loss(), log_warning=metrics_log.write)
    guard.last_checkpoint = resume_path.name if resume_path is not None else None
    return _Session(run, accelerator, algo, inner, params, optimizer, scheduler, source, eval_examples,
                    metrics_log, guard, total_steps, step, sharded=plan is not None)


def train(run: RunConfig) -> TrainResult:
    """Run ``run`` to its last step; raises NonFiniteError (nothing bad applied or saved) on a NaN/inf step."""
    s = _start(run)
    t, out = run.train, Path(run.output_dir)
    bar = tqdm(total=s.total_steps, initial=s.step, disable=not (t.progress_bar and s.accelerator.is_main_process),
               desc=run.algorithm, dynamic_ncols=True)
    last: dict = {}
    window_tokens, window_start = 0, time.perf_counter()
    s.algo.train()
    while s.step < s.total_steps:
        sums, grad_norm, lr, applied = _optimizer_step(s)
        window_tokens += int(sums.pop("tokens"))
        if s.step % t.logging_steps == 0 or s.step == s.total_steps or not applied:
            elapsed = time.perf_counter() - window_start
            last = {"step": s.step, "epoch": round(s.source.epochs_done(), 4), **sums, "lr": lr, "grad_norm": grad_norm,
                    "tokens": window_tokens, "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 2), **_peak_memory()}
            if not applied:
                last["skipped"] = True
            s.metrics_log.write(last)
            if t.report_to:
                s.accelerator.log({k: v for k, v in last.items() if isinstance(v, (int, float))}, step=s.step)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            window_tokens, window_start = 0, time.perf_counter()
        if s.guard.stop is not None:
            bar.close()
            raise s.guard.stop  # before any evaluation or checkpoint of the bad step
        bar.update(1)
        last = {**last, **_maybe_evaluate_and_save(s)}
    bar.close()
    model_dir = out / "model"
    s.accelerator.wait_for_everyone()
    if zero.is_engine(s.algo):
        zero.save_final(run, s.inner, model_dir, s.accelerator.is_main_process)  # whole weights on rank 0
    elif s.sharded:
        sharding.save_final(run, s.inner, model_dir, s.accelerator.is_main_process)  # gathered: one whole model
    elif s.accelerator.is_main_process:
        s.inner.save(model_dir)
    s.accelerator.wait_for_everyone()
    if t.report_to:
        s.accelerator.end_training()
    return TrainResult(out, model_dir, out / "metrics.jsonl", s.step, last)


def _optimizer_step(s: _Session) -> tuple[dict, float, float, bool]:
    """Forward/backward one global batch and apply it unless the guard refuses (NaN/inf anywhere).
    Returns (step metrics, gradient norm, learning rate, whether the update was applied)."""
    micro_batches = s.source.next_step()
    sums = _run_step(s.algo, micro_batches, s.accelerator, s.source.pop_metrics(), sharded=s.sharded)
    engine = zero.is_engine(s.algo)
    if engine:
        grad_norm = zero.grad_norm(s.algo)  # DeepSpeed clips inside its step, by the same rule
    elif s.sharded:
        grad_norm = sharding.clip_(s.params, s.run.train.max_grad_norm)
    else:
        grad_norm = _clip(s.accelerator, s.params, s.run.train.max_grad_norm)
    lr = s.scheduler.get_last_lr()[0]
    describe = lambda: step_rows(s.source.last_step_rows(), s.inner.tokenizer)  # noqa: E731
    applied = s.guard.check(s.step + 1, sums, grad_norm, s.accelerator, describe)
    if engine:
        zero.step(s.algo, applied)
    elif applied:
        s.optimizer.step()
    s.scheduler.step()  # the schedule follows the step count, applied or skipped
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    if applied:
        s.source.observe(sums)
    return sums, grad_norm, lr, applied


def _maybe_evaluate_and_save(s: _Session) -> dict:
    """Held-out evaluation and checkpoint when the step asks for them; returns the evaluation metrics."""
    t, step = s.run.train, s.step
    ev: dict = {}
    if s.eval_examples and ((t.eval_steps and step % t.eval_steps == 0) or step == s.total_steps):
        ev = evaluate(s.algo, s.inner, s.eval_examples, t.eval_batch_size, s.accelerator)
        s.metrics_log.write({"step": step, **ev})
        if t.report_to:
            s.accelerator.log(ev, step=step)
    if t.save_steps and (step % t.save_steps == 0 or step == s.total_steps):
        s.guard.last_checkpoint = f"step-{step:06d}"
        save_checkpoint(
            s.run.output_dir, step, module=s.inner, optimizer=s.optimizer, scheduler=s.scheduler,
            trainer_state={"world_size": s.accelerator.num_processes},
            accelerator=s.accelerator, keep_last=t.save_total_limit, source_state=s.source.state_dict(),
            algorithm_state=s.inner.extra_state(),
        )
    return ev


def follow_learning_rate(optimizer: Any, scheduler: Any, learning_rate: float) -> None:
    """A resumed run follows the learning rate of the config it is resumed with (e.g. lowered after a
    non-finite stop), on the same schedule; unchanged, the restored state is left exactly as saved."""
    if all(base == learning_rate for base in scheduler.base_lrs):
        return
    log.info("learning rate %s from the checkpoint replaced by %s (train.learning_rate)", scheduler.base_lrs[0], learning_rate)
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def check_output_dir_writable(out: Path) -> None:
    """ConfigError unless ``output_dir`` is (or can be made) a writable folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: cannot create or write {out} ({probe} is not a writable folder)")


def _run_step(algo, micro_batches: list[dict], accelerator: Accelerator, source_metrics: dict, sharded: bool = False) -> dict:
    """Forward/backward every micro-batch of one optimizer step; return globally reduced metrics
    (the algorithm's, and the batch source's, e.g. rollout statistics: name -> (sum, count))."""
    device = accelerator.device
    inner = accelerator.unwrap_model(algo)
    inner.before_step(micro_batches, accelerator)
    units = torch.tensor(float(sum(inner.count_units(b) for b in micro_batches)), device=device)
    global_units = accelerator.reduce(units, reduction="sum").clamp(min=1.0)
    world = accelerator.num_processes
    loss_total = torch.zeros((), device=device)
    metric_sums: dict[str, list[torch.Tensor]] = {
        name: [s.detach().float().to(device), c.detach().float().to(device)] for name, (s, c) in source_metrics.items()
    }
    tokens = 0
    engine = zero.is_engine(algo)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens += inner.count_tokens(batch)
        last = i == len(micro_batches) - 1
        if last or engine:  # the engine reduces at the boundary the loop marks
            sync = contextlib.nullcontext()
        else:
            sync = sharding.no_gradient_sync(algo) if sharded else accelerator.no_sync(algo)
        with sync:
            with accelerator.autocast():
                loss_sum, metrics = algo(batch)
            # DDP, FSDP2 and ZeRO average gradients over processes; x world turns that into the global sum.
            if engine:
                zero.backward(algo, loss_sum * world / global_units, last)
            else:
                accelerator.backward(loss_sum * world / global_units)
        loss_total += loss_sum.detach().float()
        for name, (s, c) in metrics.items():
            acc = metric_sums.setdefault(name, [torch.zeros((), device=device), torch.zeros((), device=device)])
            acc[0] += s.detach().float()
            acc[1] += c.detach().float()
    names = sorted(metric_sums)
    packed = torch.stack([loss_total, torch.tensor(float(tokens), device=device)] + [x for n in names for x in metric_sums[n]])
    packed = accelerator.reduce(packed, reduction="sum")
    result = {"loss": float(packed[0] / global_units), "tokens": float(packed[1]), "units": float(global_units)}
    for j, name in enumerate(names):
        s, c = packed[2 + 2 * j], packed[3 + 2 * j]
        result[name] = float(s / c) if c > 0 else float("nan")
    return result


def _clip(accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _peak_memory() -> dict:
    """Peak CUDA memory allocated by this process so far (GiB); nothing on CPU."""
    if not torch.cuda.is_available():
        return {}
    return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flat(v, key + "."))
        else:
            flat[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
