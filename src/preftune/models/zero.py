"""Whole weights for a decode under DeepSpeed ZeRO-3 (see preftune/train/zero.py).

ZeRO-3 gathers each module's weights in a hook before its forward; generation runs a different
number of forwards on each process, so those gathers would not pair up and the ranks would hang.
As under FSDP2 (preftune/models/fsdp.py) the whole model is gathered once for the decode, with the
hooks taken off meanwhile (TRL's ``unwrap_model_for_generation`` does the same), and put back after.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

from torch import nn

_OFFLOAD: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()
"""model -> the DeepSpeed parameter-offload object (hook owner) of the engine that partitions it."""


def register(model: nn.Module, offload: object) -> None:
    """Remember which engine's hooks partition ``model`` (preftune/train/zero.py calls it)."""
    _OFFLOAD[model] = offload


def is_partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s weights are ZeRO-3 partitions (every forward of it is collective)."""
    first = next(model.parameters(), None)
    return first is not None and hasattr(first, "ds_id")


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Collective (every process enters it): gather all of ``model``'s ZeRO-3 partitions, run any
    number of forwards on them with no collective, partition them again on exit."""
    import deepspeed  # here: only a ZeRO-3 run reaches this

    offload = _OFFLOAD[model]
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for p in offload.module.parameters():
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)
