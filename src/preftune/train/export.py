"""Turn a training checkpoint into a model folder that transformers (or peft) loads directly.

A checkpoint (``OUTPUT_DIR/checkpoints/step-000123``, see train/checkpoint.py) holds only the trainable
weights, next to the run's resolved ``OUTPUT_DIR/config.yaml``. Exporting rebuilds the policy the
way the run built it (model, LoRA, algorithm), copies the weights in and saves it like the end of
training does (``OUTPUT_DIR/model``): a full model, or a LoRA adapter (merged if the run's
``model.lora.merge_on_save``).

    preftune export runs/rloo/checkpoints/step-000010            # -> runs/rloo/exports/step-000010
    preftune export runs/rloo/checkpoints/step-000010 --output m  # -> m

``resolve_model`` turns a checkpoint folder into its export (once) and leaves any other model name as
it is; every command that takes a model -- ``eval``, ``generate`` -- resolves it first, so it takes a
checkpoint: that is how RL checkpoints become points on an over-optimisation curve. (``load_model``,
below the loop, never runs the trainer: given a checkpoint folder it says to export it.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from preftune.algorithms import ALGORITHMS
from preftune.models.loading import ModelLoadError, save_model
from preftune.run_config import load_run_config
from preftune.train.checkpoint import CheckpointError, is_checkpoint, load_trainable, verify_checkpoint
from preftune.train.loop import build_module

log = logging.getLogger("preftune.export")

# Written into an export folder; names the checkpoint's manifest digest, so a checkpoint replaced by a
# later run under the same name is exported again rather than served stale.
_STAMP = "preftune_export.json"


def default_export_dir(checkpoint: Path) -> Path:
    """``OUTPUT_DIR/checkpoints/step-N`` -> ``OUTPUT_DIR/exports/step-N``."""
    return checkpoint.parent.parent / "exports" / checkpoint.name


def _stamp(checkpoint: Path) -> dict:
    digest = hashlib.sha256((checkpoint / "manifest.json").read_bytes()).hexdigest()
    return {"checkpoint": str(checkpoint.resolve()), "manifest_sha256": digest}


def resolve_model(name: str) -> str:
    """``name`` itself, or for a training checkpoint folder the folder it is exported to (exported
    once, see :func:`export_checkpoint`). Raises ModelLoadError naming the checkpoint's problem."""
    path = Path(name).expanduser()
    if not (path.is_dir() and is_checkpoint(path)):
        return name
    try:
        return str(export_checkpoint(path))
    except CheckpointError as err:
        raise ModelLoadError(str(err)) from None


def export_checkpoint(checkpoint: str | Path, output: str | Path | None = None, *, reuse: bool = True) -> Path:
    """Export ``checkpoint`` to ``output`` (default :func:`default_export_dir`) and return that folder.

    With ``reuse``, an earlier export of the same checkpoint (same manifest) is returned as is.
    Raises CheckpointError for a folder that is not a complete checkpoint of a preftune run.
    """
    checkpoint = Path(checkpoint).expanduser()
    if not is_checkpoint(checkpoint):
        raise CheckpointError(f"{checkpoint}: not a checkpoint folder (expected manifest.json and trainable.safetensors)")
    out = Path(output).expanduser() if output is not None else default_export_dir(checkpoint)
    stamp = _stamp(checkpoint)
    if reuse and (out / _STAMP).is_file():
        try:
            if json.loads((out / _STAMP).read_text()) == stamp:
                return out
        except json.JSONDecodeError:
            pass
    verify_checkpoint(checkpoint)
    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{checkpoint}: the run's config {config} is missing, so the model cannot be rebuilt")
    run = load_run_config(str(config), [])
    reason = ALGORITHMS[run.algorithm].export_unsupported
    if reason:
        raise CheckpointError(f"{checkpoint}: exporting {reason}; use the final model in {checkpoint.parent.parent / 'model'}")
    algo = build_module(run)
    load_trainable(checkpoint, algo)
    save_model(algo.policy, algo.tokenizer, out, merge=run.model.lora.merge_on_save)
    (out / _STAMP).write_text(json.dumps(stamp, indent=2))
    log.info("exported %s to %s", checkpoint, out)
    return out

