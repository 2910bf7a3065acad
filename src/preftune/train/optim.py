"""AdamW and the warmup + decay schedule."""

from __future__ import annotations

import torch
from transformers import get_scheduler

_FUSED_DEVICES = ("cpu", "cuda")


def _can_fuse(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW kernel takes ``params``: floating-point tensors, all on the CPU or all
    on CUDA (torch >= 2.4, preftune's minimum, has both kernels)."""
    return all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params) and (
        len({p.device.type for p in params}) == 1
    )


def build_optimizer(params: list[torch.nn.Parameter], t) -> torch.optim.Optimizer:
    """AdamW over ``params`` with the settings of TrainConfig ``t``.

    Uses the fused kernel where it applies (one kernel for the whole update instead of a loop over
    tensors; the same math: ~0.3 s -> ~0.1 s per step for SmolLM2-135M on 2 CPU cores), else torch's
    default implementation.
    """
    if not params:
        raise ValueError("no trainable parameters (is every weight frozen?)")
    # Decay matrices only: biases and norm gains are conventionally left alone.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    if _can_fuse(params):
        kwargs["fused"] = True  # otherwise torch picks its default (foreach on CUDA, single-tensor on CPU)
    return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, t, total_steps: int):
    name = {"constant": "constant_with_warmup"}.get(t.lr_scheduler, t.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
