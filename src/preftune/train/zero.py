"""DeepSpeed ZeRO-2 / ZeRO-3 driven by the loop itself: the same code on CPU (gloo) and GPU (NCCL).

Accelerate 1.15 enables DeepSpeed only on GPU (with ``cpu=True`` it reports MULTI_CPU); in its
DeepSpeed state it turns bf16 autocast off and, handed the model, would let DeepSpeed's engine scale
the loss by its own accumulation count. So the Accelerator is made without seeing a DeepSpeed launch
(:func:`hidden_from_accelerate`: on GPU it is then a plain NCCL process group, as on CPU a gloo one)
and, as for FSDP2 (preftune/train/sharding.py), the loop builds the engine (``deepspeed.initialize``)
from ``train.sharding=zero2|zero3`` or from the ACCELERATE_DEEPSPEED_* variables an Accelerate
DeepSpeed launch config exported, and keeps its own semantics:

- loss: the loop's global-batch normalisation, passed as is (``backward(scale_wrt_gas=False)``);
  the engine averages gradients over processes like DDP, which the loop's ``x world`` undoes;
- accumulation: the loop marks the last micro-batch (``set_gradient_accumulation_boundary``);
- the guard: the global gradient norm is read from the ZeRO optimizer before the step, with the
  routine its step uses (:func:`grad_norm`); a refused step is dropped through DeepSpeed's own
  overflow path (:func:`skip`), so nothing of it is applied; clipping is DeepSpeed's, the same rule
  as torch's ``clip_grad_norm_`` (scale by max_norm / (norm + 1e-6) when above);
- optimizer and schedule: the loop's torch AdamW (DeepSpeed keeps its state per partition) and
  scheduler, so a sharded run steps like an unsharded one;
- checkpoints: ``trainable.safetensors`` gathered to rank 0, the same file as an unsharded run
  (`preftune export` reads it); the optimizer state of each process in ``optimizer_<rank>.pt``;
- the final model: rank 0 saves whole weights (ZeRO-3: gathered into a fresh module);
- generation under ZeRO-3: the policy gathered once for the decode (preftune/models/zero.py).

Weights stay fp32 (preftune loads them so; bf16 is autocast), as under FSDP2.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from preftune.config import ConfigError
from preftune.models import zero as zero_models

log = logging.getLogger("preftune.train")


@dataclass(frozen=True)
class ZeroPlan:
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False


def plan_from_launch(run: Any) -> ZeroPlan | None:
    """The ZeRO plan of ``train.sharding=zero2|zero3`` or of an Accelerate DeepSpeed launch config."""
    plugin = _launch_plugin()
    if plugin is None:
        return {"zero2": ZeroPlan(2), "zero3": ZeroPlan(3)}.get(run.train.sharding)
    z = plugin.deepspeed_config.get("zero_optimization", {})
    stage = int(z.get("stage", 0))
    if stage not in (2, 3):
        raise ConfigError(f"the DeepSpeed launch config asks for ZeRO stage {stage}; preftune runs stages 2 and 3 "
                          "(configs/accelerate/zero2.yaml, zero3.yaml; plain data parallel: ddp.yaml)")
    offload = lambda key: str((z.get(key) or {}).get("device", "none")).lower() == "cpu"  # noqa: E731
    if any(str((z.get(key) or {}).get("device", "none")).lower() == "nvme" for key in ("offload_optimizer", "offload_param")):
        raise ConfigError("the DeepSpeed launch config offloads to NVMe; preftune offloads to CPU RAM only")
    return ZeroPlan(stage, offload("offload_optimizer"), offload("offload_param"))


_LAUNCH_FLAG = "ACCELERATE_USE_DEEPSPEED"


def _launch_plugin():
    """The DeepSpeed plugin an ``accelerate launch --config_file zero*.yaml`` exported (its
    ACCELERATE_DEEPSPEED_* variables), or None."""
    if os.environ.get(_LAUNCH_FLAG, "").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin  # here: reads the variables

    return DeepSpeedPlugin()


@contextlib.contextmanager
def hidden_from_accelerate():
    """Inside, Accelerate does not see a DeepSpeed launch (it reads the flag when its state is made)."""
    flag = os.environ.pop(_LAUNCH_FLAG, None)
    try:
        yield
    finally:
        if flag is not None:
            os.environ[_LAUNCH_FLAG] = flag


def import_deepspeed():
    """deepspeed, or a one-line ConfigError saying how to install it."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("ZeRO sharding needs DeepSpeed: bash scripts/install.sh --deepspeed (or pip install "
                          "'preftune[deepspeed]' and then pip install --no-deps deepspeed==0.19.8)") from None
    return deepspeed


def _init_distributed(deepspeed: Any) -> None:
    """DeepSpeed's communication layer over the process group Accelerate made. On CPU (gloo) its
    shared-memory all-reduce kernel, compiled with g++ on first use (minutes), is not wanted: gloo
    does the reductions, so the op is marked unavailable before the backend is built."""
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "gloo"
    if backend == "gloo":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def ds_config(plan: ZeroPlan, t: Any, *, bf16: bool = False) -> dict:
    """The engine's config. ``bf16``: the loop trains under bf16 autocast. The engine's forward turns a
    CUDA autocast it was not configured for *off* (DeepSpeed's ``autocast_if_enabled``), which would
    train in fp32 while rollouts and the reference precompute, outside the engine, run in bf16; so its
    ``torch_autocast`` is the loop's, with no module marked for bf16 gradient communication (the
    reductions stay fp32, as under DDP and FSDP2)."""
    zero: dict = {"stage": plan.stage}
    if plan.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if plan.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    autocast = {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}} if bf16 else {}
    return {
        **autocast,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": 1,  # the loop sets each micro-batch's boundary itself
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: the same update as an unsharded run
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def initialize(algo: nn.Module, optimizer: torch.optim.Optimizer, plan: ZeroPlan, t: Any, *, bf16: bool = False) -> Any:
    """The DeepSpeed engine over ``algo`` (policy, live reference, heads) and the loop's optimizer;
    DeepSpeed takes the optimizer's parameter groups over as flat partitions (the scheduler built
    on it keeps working: the groups are the same dicts)."""
    deepspeed = import_deepspeed()
    _init_distributed(deepspeed)
    engine, *_ = deepspeed.initialize(model=algo, optimizer=optimizer, config=ds_config(plan, t, bf16=bf16))
    if plan.stage == 3:
        zero_models.register(algo.policy, engine.optimizer.parameter_offload)
    offloaded = [name for name, on in (("optimizer", plan.offload_optimizer), ("weights", plan.offload_params)) if on]
    log.info("DeepSpeed ZeRO-%d over %d processes%s", plan.stage, torch.distributed.get_world_size(),
             f" (offload: {', '.join(offloaded)})" if offloaded else "")
    return engine


def is_engine(module: Any) -> bool:
    return type(module).__name__ == "DeepSpeedEngine"


def stage_of(optimizer: Any) -> int:
    """The ZeRO stage of a DeepSpeed ZeRO optimizer; 0 for any other optimizer."""
    name = type(optimizer).__name__
    if not type(optimizer).__module__.startswith("deepspeed."):
        return 0
    return 3 if name == "DeepSpeedZeroOptimizer_Stage3" else 2


def backward(engine: Any, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch's (already globally normalised) loss; the last one reduces."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def grad_norm(engine: Any) -> float:
    """Collective: the global L2 norm of the accumulated gradients, before the step, by the routine
    the ZeRO optimizer's own step clips with (inf when any gradient is not finite). The step computes
    it once more (a local pass over the partition and one scalar all-reduce per parameter group)."""
    from deepspeed.runtime.utils import is_invalid_grad_norm  # here: only a ZeRO run reaches this

    opt = engine.optimizer
    if hasattr(opt, "_wait_for_offload_copies"):
        opt._wait_for_offload_copies()
    if stage_of(opt) == 3:
        from deepspeed.runtime.utils import combine_grad_norm_groups  # here: see above

        norm = combine_grad_norm_groups(opt._get_norm_groups())
    else:
        norm = opt.scaled_global_norm()
    if is_invalid_grad_norm(norm):  # DeepSpeed marks a non-finite group norm with -1
        return math.inf
    return float(norm) / opt.loss_scale


def step(engine: Any, applied: bool) -> None:
    """Apply the accumulated gradients (clipped by DeepSpeed), or drop them with nothing applied."""
    if applied:
        engine.step()
    else:
        skip(engine)


def skip(engine: Any) -> None:
    """Drop the step through DeepSpeed's overflow path (what it does for an fp16 overflow): gradients
    and partition buffers cleared, optimizer state and weights untouched."""
    opt = engine.optimizer
    name = "_get_norm_groups" if stage_of(opt) == 3 else "scaled_global_norm"
    bad = torch.tensor(math.inf)
    setattr(opt, name, (lambda: [bad]) if name == "_get_norm_groups" else (lambda norm_type=2: bad))
    try:
        engine.step()
    finally:
        delattr(opt, name)  # the class's method again
    if not opt.overflow:
        raise RuntimeError("DeepSpeed applied a step the loop refused (its overflow path did not engage)")


def _gathered(module: nn.Module, trainable_only: bool, is_main: bool) -> dict[str, torch.Tensor]:
    """Collective: whole CPU copies of ``module``'s parameters on rank 0 ({} elsewhere), one
    ZeRO-3 gather at a time (whole already under ZeRO-2)."""
    import deepspeed  # here: only a ZeRO run reaches this

    out: dict[str, torch.Tensor] = {}
    partitioned = zero_models.is_partitioned(module)
    for name, p in module.named_parameters():  # a tied weight once
        if trainable_only and not p.requires_grad:
            continue
        ctx = deepspeed.zero.GatheredParameters([p]) if partitioned else contextlib.nullcontext()
        with ctx:
            if is_main:
                out[name] = p.detach().contiguous().cpu().clone()
    return out


def gather_trainable(module: nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    return _gathered(module, True, is_main)


def optimizer_state(optimizer: Any) -> dict:
    """This process's ZeRO optimizer state: its partition of the fp32 weights and AdamW moments."""
    return optimizer.state_dict()


def load_optimizer_state(optimizer: Any, state: dict) -> None:
    """Restore this process's partition (weights from the saved fp32 copy, bit for bit); the same
    number of processes as the save (checked by the caller)."""
    states = [None] * torch.distributed.get_world_size()
    states[torch.distributed.get_rank()] = state
    optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)


def save_final(run: Any, module: nn.Module, out_dir, is_main: bool) -> None:
    """Collective: rank 0 saves ``model/`` like an unsharded run (``from_pretrained``-loadable; a
    peft adapter under LoRA). ZeRO-2 holds whole weights; ZeRO-3's are gathered into a fresh module."""
    if not zero_models.is_partitioned(module):
        if is_main:
            module.save(out_dir)
        return
    from preftune.train.sharding import save_fresh  # here: sharding imports the loop lazily too

    full = _gathered(module, False, is_main)
    if is_main:
        save_fresh(run, full, out_dir)
