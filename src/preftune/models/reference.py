"""Reference-policy log-probs: live (a frozen copy, or the adapter-disabled base under LoRA) or
precomputed once before training and cached on disk.

The cache key is a hash of (reference weights, tokenized data, precision, code version): a changed
dataset, tokenizer setting, truncation, model or dtype can never reuse a stale cache.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from preftune.models.cache import atomic_path, cache_dir
from preftune.models.loading import ModelLoadError
from preftune.models.lora import is_peft_model

log = logging.getLogger("preftune.reference")

CACHE_VERSION = 1



def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with no trainable parameter, in eval mode (no dropout in π_ref)."""
    model.requires_grad_(False)
    return model.eval()


def reference_model(policy: torch.nn.Module, *, load: Callable[[], torch.nn.Module] | None = None,
                    copy_policy: bool = True, what: str = "reference") -> torch.nn.Module | None:
    """π_ref, set up the same way for every algorithm that has one.

    ``load`` given (a named reference model): the model it loads, frozen; a load error names ``what``.
    Else, with ``copy_policy``, a frozen copy of the initial policy, except under LoRA, whose
    adapter-disabled policy is π_ref already (None). None as well without ``copy_policy`` (the
    reference columns are precomputed once, from the policy before training).
    """
    if load is not None:
        try:
            return frozen(load())
        except ModelLoadError as err:
            raise ModelLoadError(f"{what}: {err}") from None
    if copy_policy and not is_peft_model(policy):
        return frozen(copy.deepcopy(policy))
    return None

def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the reference weights (LoRA adapter weights excluded: the reference is the base)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.replace("base_model.model.", "").replace(".base_layer", "").encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def examples_fingerprint(examples: Iterable[dict], keys: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex[k] for k in keys], separators=(",", ":")).encode())
    return h.hexdigest()


def cache_key(model_fp: str, data_fp: str, dtype: str) -> str:
    return hashlib.sha256(f"{CACHE_VERSION}|{model_fp}|{data_fp}|{dtype}".encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_dir() / "reference_logps" / f"{key}.safetensors"


def load_cached(key: str, n: int) -> dict[str, torch.Tensor] | None:
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        values = load_file(str(path))
    except Exception as exc:  # a corrupt cache file is recomputed, never trusted
        log.warning("reference cache %s unreadable (%s); recomputing", path, exc)
        return None
    if any(v.shape[0] != n for v in values.values()):
        return None
    return values


def save_cached(key: str, values: dict[str, torch.Tensor]) -> Path:
    path = cache_path(key)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in values.items()}, str(tmp))
    return path


def precompute(
    examples: list[dict],
    compute: Callable[[list[dict]], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    length_of: Callable[[dict], int] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Run `compute` (rows -> {name: Tensor[rows]}) over all examples in batches; each process
    takes every world_size-th batch and the shards are gathered, so every process ends up with the
    full [N] columns. Rows are batched by length to cut padding."""
    order = sorted(range(len(examples)), key=lambda i: length_of(examples[i])) if length_of else list(range(len(examples)))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[rank::world_size]
    local: dict[int, dict[str, float]] = {}
    with torch.no_grad():
        for idx in tqdm(mine, desc="reference log-probs", disable=not progress, dynamic_ncols=True):
            out = compute([examples[i] for i in idx])
            for j, i in enumerate(idx):
                local[i] = {k: float(v[j]) for k, v in out.items()}
    if world_size > 1:
        import torch.distributed as dist  # here: only multi-process runs need it

        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, local)
        for part in gathered:
            local.update(part)
    names = sorted(next(iter(local.values())))
    return {k: torch.tensor([local[i][k] for i in range(len(examples))], dtype=torch.float32) for k in names}


def attach(examples: list[dict], columns: dict[str, torch.Tensor]) -> list[dict]:
    """Return examples with the precomputed columns added as float fields."""
    return [{**ex, **{k: float(v[i]) for k, v in columns.items()}} for i, ex in enumerate(examples)]


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Reference log-probs are computed without dropout."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)
