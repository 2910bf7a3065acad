"""Whole weights for a decode under FSDP2 sharding (see preftune/train/sharding.py).

A sharded model all-gathers each decoder layer in every forward; generation runs a different number
of forwards on each process (rows stop at different lengths), so those collectives would not pair
up and the ranks would hang. Instead the whole model is gathered once, on every process together,
the decode runs on local full weights (no collective per token), and the shards are restored after.
The price is the full model in memory for the rollout — what TRL's ``unwrap_model_for_generation``
and OpenRLHF's weight sync to vLLM pay too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from preftune.models import zero


def fsdp_modules(model: nn.Module) -> list:
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule  # here: after the check that this build has it

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Collective (every process enters it): gather ``model``'s FSDP2 shards (or ZeRO-3 partitions:
    preftune/models/zero.py), keep them gathered through any number of forwards, reshard on exit.
    A no-op for a model that is not sharded."""
    if zero.is_partitioned(model):
        with zero.full_weights(model):
            yield
        return
    mods = fsdp_modules(model)
    if not mods:
        yield
        return
    # Keep every group unsharded after its forward. FSDP2 (torch 2.13) keeps that choice in each
    # param group's post_forward_mesh_info; saved and restored exactly, root and layers alike.
    states = [m._get_fsdp_state() for m in mods]
    saved = [(g, g.post_forward_mesh_info) for st in states for g in st._fsdp_param_groups]
    auto = [(st, st._auto_reshard_after_forward) for st in states]
    for m in mods:
        m.unshard()  # outside inference_mode: the gathered tensors must stay usable for training
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for group, info in saved:
            group.post_forward_mesh_info = info
        for st, value in auto:
            st._auto_reshard_after_forward = value
        if states[0]._is_root:  # reshard everything and forget the decode's forward order (backward prefetch reads it)
            mods[0].reset_iter_state()
        else:
            for m in mods:
                m.reshard()
