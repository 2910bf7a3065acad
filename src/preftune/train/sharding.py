"""FSDP2 sharding applied by the loop itself: the same code on CPU (gloo) and GPU (NCCL).

Accelerate 1.15 ignores its FSDP plugin on a CPU-only machine (it reports MULTI_CPU and wraps
nothing), so the loop calls torch's ``fully_shard`` itself: on every decoder layer, then on the
model (its root). It does so when ``train.sharding=fsdp2`` or when an Accelerate launch config asks
for FSDP version 2 (GPU); the model is then never handed to ``accelerator.prepare``, so Accelerate
and the loop can never both wrap it.

What changes under sharding, and where it is handled:
- gradient accumulation: ``set_requires_gradient_sync(False)`` on all but the last micro-batch;
- the gradient norm / clipping: over DTensor shards, summed across processes (:func:`clip_`);
- checkpoints: full state dicts gathered to rank 0 (:func:`gather_states`), the same files as an
  unsharded run, so `preftune export` and every other reader work unchanged;
- the final model: rank 0 loads the gathered weights into a fresh, unsharded module and saves it;
- generation: the whole model is gathered once for the decode (preftune/models/fsdp.py);
- reference log-probs are precomputed before sharding (each process scores its own batches).

DeepSpeed ZeRO (``train.sharding=zero2|zero3`` or an Accelerate DeepSpeed launch config) is planned
here too and driven by preftune/train/zero.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from preftune.config import ConfigError
from preftune.models.fsdp import fsdp_modules
from preftune.models.lora import enable_gradient_checkpointing, is_peft_model
from preftune.train import zero
from preftune.train.zero import ZeroPlan

# torch.distributed.* is imported inside the functions that shard: builds without distributed support
# (and every unsharded run) never load it.

log = logging.getLogger("preftune.train")


@dataclass(frozen=True)
class ShardPlan:
    reshard_after_forward: bool = True
    """Full shard (free each layer's gathered weights after its forward); false keeps them until backward."""
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    layer_classes: tuple[str, ...] = ()
    """Class names of the modules sharded one by one; empty = the model's ``_no_split_modules``."""


def plan_for(run: Any, accelerator: Any) -> ShardPlan | ZeroPlan | None:
    """The sharding this run asks for (None = none): ``train.sharding`` or an Accelerate FSDP or
    DeepSpeed launch config (on GPU Accelerate's state; on CPU the variables its launcher exported).
    A ZeroPlan is DeepSpeed's (preftune/train/zero.py)."""

    kind = accelerator.distributed_type
    zero_plan = zero.plan_from_launch(run)  # Accelerate never sees a DeepSpeed launch (zero.hidden_from_accelerate)
    if zero_plan is not None:
        if accelerator.num_processes == 1:
            log.info("ZeRO asked for with one process: nothing to shard, training unsharded")
            return None
        return zero_plan
    plugin = accelerator.state.fsdp_plugin if kind == DistributedType.FSDP else _launch_fsdp_plugin()
    asked = plugin is not None or run.train.sharding == "fsdp2"
    # Under Accelerate's FSDP state (GPU) even one process is sharded by the loop: handed the model,
    # Accelerate would wrap it itself.
    if asked and accelerator.num_processes == 1 and kind != DistributedType.FSDP:
        log.info("FSDP2 asked for with one process: nothing to shard, training unsharded")
        return None
    if plugin is not None:
        if int(getattr(plugin, "fsdp_version", 1)) != 2:
            raise ConfigError("the Accelerate launch config asks for FSDP version 1; preftune shards with FSDP2: set "
                              "fsdp_version: 2 (see configs/accelerate/fsdp2.yaml)")
        from torch.distributed.fsdp import CPUOffloadPolicy  # here: see the note above

        layers = plugin.transformer_cls_names_to_wrap or ()
        return ShardPlan(
            reshard_after_forward=bool(plugin.reshard_after_forward),
            activation_checkpointing=bool(plugin.activation_checkpointing),
            cpu_offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
            layer_classes=tuple(n for n in ([layers] if isinstance(layers, str) else layers) if n),
        )
    if run.train.sharding == "fsdp2":
        return ShardPlan(activation_checkpointing=run.model.gradient_checkpointing)
    return None


def as_planned(run: Any, plan: ShardPlan | ZeroPlan | None) -> Any:
    """``run`` with ``train.sharding`` set to what ``plan`` does ("none", "fsdp2", "zero2", "zero3"), so
    that algorithms refusing a sharded run (their checks read ``train.sharding``) also see a sharding
    asked for by an Accelerate launch config, and a one-process "sharded" run is not refused."""
    kind = "none" if plan is None else f"zero{plan.stage}" if isinstance(plan, ZeroPlan) else "fsdp2"
    if kind == run.train.sharding:
        return run
    return dataclasses.replace(run, train=dataclasses.replace(run.train, sharding=kind))


def _launch_fsdp_plugin():
    """The FSDP plugin an ``accelerate launch --config_file`` with FSDP exported (FSDP_* variables)
    where Accelerate did not act on it: on a CPU-only machine it reports MULTI_CPU and drops it."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return None

    return FullyShardedDataParallelPlugin()


def _hf_root(model: nn.Module) -> nn.Module:
    """The module every forward and ``generate`` of ``model`` goes through: a peft model's base model."""

    return model.get_base_model() if is_peft_model(model) else model


def shard(algo: nn.Module, plan: ShardPlan) -> None:
    """Apply FSDP2 in place to the policy and a live reference model: each decoder layer, then the
    model (its root unit: embeddings, final norm and head, so a tied embedding stays one parameter),
    then any other child of ``algo`` with parameters (PPO's value head). Every forward must enter the
    model's own forward for the root unit to gather: preftune/models/logprobs.py takes its plain path
    (whole-vocabulary logits) for a sharded model instead of calling backbone and head apart."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard  # here: see the note above
    from torch.distributed.tensor import DTensor  # here: see the note above


    kwargs: dict = {"reshard_after_forward": plan.reshard_after_forward}
    if plan.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    models = [m for m in (algo.policy, getattr(algo, "reference_model", None)) if m is not None]
    if plan.activation_checkpointing:
        enable_gradient_checkpointing(algo.policy)
    for model in models:
        root = _hf_root(model)
        if getattr(getattr(root, "config", None), "vision_config", None) is not None:
            raise ConfigError("train.sharding=fsdp2: vision-language models (mdpo) are not supported yet; their image and "
                              "text parts are called apart, past the root unit that FSDP2 gathers")
        names = set(plan.layer_classes) or set(getattr(root, "_no_split_modules", None) or ())
        layers = [m for m in root.modules() if type(m).__name__ in names]
        if not layers:
            raise ConfigError(f"sharding: no decoder layers of class {sorted(names)} in {type(root).__name__}; name "
                              "them with fsdp_transformer_layer_cls_to_wrap in the Accelerate config")
        for layer in layers:
            fully_shard(layer, **kwargs)
        # Embeddings, final norm and head (tied or not) in one root unit, left gathered after the
        # forward (torch's default for a root) so a head applied to its output finds whole weights.
        fully_shard(root, **{**kwargs, "reshard_after_forward": None})
    sharded = {id(m) for m in models}
    for child in algo.children():
        if id(child) not in sharded and any(not isinstance(p, DTensor) for p in child.parameters()):
            fully_shard(child, **kwargs)
    left = [n for n, p in algo.named_parameters() if not isinstance(p, DTensor)]
    if left:
        raise RuntimeError(f"sharding left parameters unsharded (their gradients would not be reduced): {left[:5]}")
    log.info("FSDP2: %d decoder layers per model sharded over %d processes", len(layers), torch.distributed.get_world_size())


def is_sharded(module: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor  # here: see the note above

    return any(isinstance(p, DTensor) for p in module.parameters())


@contextlib.contextmanager
def no_gradient_sync(module: nn.Module):
    """Accumulate gradients locally (no reduce-scatter) inside; the next micro-batch outside syncs."""

    mods = fsdp_modules(module)
    for m in mods:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_requires_gradient_sync(True, recurse=False)


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients of (sharded) parameters: local shard squares summed over processes."""
    from torch.distributed.tensor import DTensor  # here: see the note above

    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = local[0].device if local else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in local:
        total += g.detach().float().pow(2).sum()
    torch.distributed.all_reduce(total)  # every parameter is a Shard(0) DTensor: each element counted once
    return total.sqrt()


def clip_(params: list[nn.Parameter], max_norm: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_'s rule (scale by max_norm / (norm + 1e-6) when above) on shards;
    returns the norm before clipping."""
    from torch.distributed.tensor import DTensor  # here: see the note above

    norm = grad_norm(params)
    if max_norm is not None and math.isfinite(float(norm)):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef)
    return float(norm)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions  # here: see the note above

    return StateDictOptions(full_state_dict=True, **kw)


def gather_states(module: nn.Module, optimizer: Any) -> tuple[dict, dict]:
    """Collective: (trainable weights, optimizer state) as full CPU tensors on rank 0 ({} elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict  # here: see the note above

    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    weights = get_model_state_dict(module, options=_options(cpu_offload=True))
    weights = {n: v.contiguous() for n, v in weights.items() if n in trainable}
    optim = get_optimizer_state_dict(module, _unwrap(optimizer), options=_options(cpu_offload=True))
    return weights, optim


def load_states(module: nn.Module, optimizer: Any, weights: dict, optim: dict) -> None:
    """Every process reads the full state dicts; each keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict  # here: see the note above

    set_model_state_dict(module, weights, options=_options(strict=False))
    set_optimizer_state_dict(module, _unwrap(optimizer), optim, options=_options())


def save_final(run: Any, algo: nn.Module, out_dir, is_main: bool) -> None:
    """Collective: gather the weights; rank 0 loads them into a fresh unsharded module and saves it
    like an unsharded run's ``model/`` (``from_pretrained``-loadable; a peft adapter under LoRA)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict  # here: see the note above

    full = get_model_state_dict(algo, options=_options(cpu_offload=True))
    if is_main:
        save_fresh(run, full, out_dir)


def save_fresh(run: Any, full: dict, out_dir) -> None:
    """Load gathered whole weights into a fresh unsharded module of ``run`` and save it."""
    from preftune.train.loop import build_module  # here: the loop imports this module

    fresh = build_module(run)
    missing, _ = fresh.load_state_dict(full, strict=False)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    if trainable & set(missing):
        raise RuntimeError(f"gathered weights lack trained parameters: {sorted(trainable & set(missing))[:5]}")
    fresh.save(out_dir)


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer
