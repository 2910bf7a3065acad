"""AdamW and the warmup + decay schedule."""

from __future__ import annotations

import torch
from transformers import get_scheduler


def build_optimizer(params: list[torch.nn.Parameter], t) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("no trainable parameters (is every weight frozen?)")
    # Decay matrices only: biases and norm gains are conventionally left alone.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps
    )


def build_scheduler(optimizer: torch.optim.Optimizer, t, total_steps: int):
    name = {"constant": "constant_with_warmup"}.get(t.lr_scheduler, t.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
