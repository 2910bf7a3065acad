"""Checkpoints: trainable weights (safetensors), optimizer, scheduler, RNG states, data position.

Layout of ``OUTPUT_DIR/checkpoints/step-000123/``:
    trainable.safetensors   every parameter that requires grad (full model, or LoRA adapter + heads)
    optimizer.pt, scheduler.pt
    rng_state_<rank>.pt     python / numpy / torch (and CUDA) generators of each process
    source_state_<rank>.pt  each process's batch-source position (and rollout buffer, online)
    algorithm_state_<rank>.pt  what the algorithm keeps between steps, if anything (e.g. grdpo's group weights)
    trainer_state.json      step, world size ("sharding": "fsdp2", "zero2" or "zero3" when written by a sharded run)
    manifest.json           size and sha256 of every file above, written last

Under FSDP2 (preftune/train/sharding.py) the same files hold full state dicts gathered to rank 0;
its optimizer.pt is keyed by parameter name (torch.distributed.checkpoint.state_dict's layout).
Under DeepSpeed ZeRO (preftune/train/zero.py) trainable.safetensors is gathered to rank 0 too, and
each process writes its optimizer partition to optimizer_<rank>.pt instead of optimizer.pt.

A checkpoint is written into ``.step-000123.tmp`` and renamed into place only when complete, so a
crash mid-write never leaves something that looks like a checkpoint. Loading verifies the manifest;
a missing or corrupt checkpoint is an error, never a silent fresh start.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune.train import zero
from preftune.train.sharding import gather_states, is_sharded, load_states


class CheckpointError(RuntimeError):
    pass


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(output_dir: str | Path, resume_from: str) -> Path:
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(
                f"resume_from=latest but {checkpoints_dir(output_dir)} holds no checkpoint; "
                "remove resume_from to start a fresh run"
            )
        return found[-1]
    path = Path(resume_from)
    if not path.is_dir():
        raise CheckpointError(f"resume_from: checkpoint directory {path} does not exist")
    return path


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() yields a tied weight once, so safetensors sees no shared storage.
    return {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict,
    accelerator: Any,
    keep_last: int,
    source_state: Any = None,
    algorithm_state: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (collective: every process must call it). ``algorithm_state``:
    what the algorithm keeps between steps besides its weights (``Algorithm.extra_state``), per process."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    main = accelerator.is_main_process
    sharded, stage = is_sharded(module), zero.stage_of(optimizer)
    if sharded:  # the same files, gathered from every process's shards (optimizer state keyed by parameter name)
        weights, optim_state = gather_states(module, optimizer)
        trainer_state = {**trainer_state, "sharding": "fsdp2"}
    elif stage:  # the same weights file, gathered; the optimizer state stays per partition
        weights = zero.gather_trainable(module, main)
        trainer_state = {**trainer_state, "sharding": f"zero{stage}"}
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(weights if sharded or stage else trainable_state(module), str(tmp / "trainable.safetensors"))
        if not stage:
            torch.save(optim_state if sharded else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if stage:
        torch.save(zero.optimizer_state(optimizer), tmp / f"optimizer_{accelerator.process_index}.pt")
    if source_state is not None:
        torch.save(source_state, tmp / f"source_state_{accelerator.process_index}.pt")
    if algorithm_state:
        torch.save(algorithm_state, tmp / f"algorithm_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if main:
        manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: Path) -> dict:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no manifest.json; the checkpoint is incomplete or not a checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path}: corrupt ({exc})") from None
    for name, meta in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        if f.stat().st_size != meta["size"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: corrupt (size or checksum differs from manifest.json)")
    return manifest


def load_trainable(path: Path, module: torch.nn.Module) -> None:
    """Copy a checkpoint's ``trainable.safetensors`` into ``module``'s trainable parameters; the names
    must match exactly (same algorithm, model and LoRA setting)."""
    _copy_weights(_checked_weights(path, module), module)


def _copy_weights(weights: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))


def _checked_weights(path: Path, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    weights = load_file(str(path / "trainable.safetensors"))
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:5], sorted(set(weights) - expected)[:5]
        raise CheckpointError(
            f"{path}: trainable weights do not match this model (missing {missing}, unexpected {extra}); "
            "was it written by a different model or LoRA setting?"
        )
    return weights


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` looks like a checkpoint folder written by :func:`save_checkpoint`."""
    return path.is_dir() and (path / "manifest.json").is_file() and (path / "trainable.safetensors").is_file()


def load_checkpoint(
    path: Path, *, module: torch.nn.Module, optimizer: Any, scheduler: Any, accelerator: Any
) -> dict:
    """Restore everything save_checkpoint wrote; returns the trainer state (step, source position)."""
    verify_checkpoint(path)
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size") not in (None, accelerator.num_processes):
        raise CheckpointError(
            f"{path} was written by {state['world_size']} processes; resume with the same number "
            f"(now {accelerator.num_processes}) so the data order and RNG streams continue exactly"
        )
    sharded, stage = is_sharded(module), zero.stage_of(optimizer)
    if state.get("sharding") != ("fsdp2" if sharded else f"zero{stage}" if stage else None):
        written = f"with train.sharding={state['sharding']}" if state.get("sharding") else "without sharding"
        raise CheckpointError(f"{path} was written {written}; resume it with the same train.sharding (its optimizer "
                              "state is laid out for that)")
    if stage:
        weights = _checked_weights(path, module)
        if stage != 3:  # ZeRO-2 holds whole weights; ZeRO-3's partitions come back with the optimizer state
            _copy_weights(weights, module)
        optim_file = path / f"optimizer_{accelerator.process_index}.pt"
        zero.load_optimizer_state(optimizer, torch.load(optim_file, map_location="cpu", weights_only=False))
    elif sharded:
        load_states(module, optimizer, _checked_weights(path, module), torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    else:
        optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        load_trainable(path, module)
        optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    _set_rng_state(torch.load(rng_file, weights_only=False))
    source_file = path / f"source_state_{accelerator.process_index}.pt"
    state["source"] = torch.load(source_file, weights_only=False)
    algorithm_file = path / f"algorithm_state_{accelerator.process_index}.pt"
    state["algorithm"] = torch.load(algorithm_file, weights_only=False) if algorithm_file.is_file() else {}
    return state
