"""Models: loading (packaged defaults, tiny presets, GGUF, HF folders/hub ids), saving, LoRA, cache.

``load_model(name)`` -> ``(model, tokenizer)``; ``save_model(model, tokenizer, out_dir)``;
``apply_lora`` / ``reference_context`` for adapter training with the base model as pi_ref.
"""

from .cache import atomic_dir, cache_dir
from .loading import (
    DEFAULT_MODEL,
    DTYPES,
    PACKAGED_MODELS,
    ModelLoadError,
    convert_gguf,
    load_model,
    normalise_model,
    normalise_tokenizer,
    save_model,
)
from .lora import LoraSettings, apply_lora, enable_gradient_checkpointing, is_peft_model, reference_context, unwrap
from .tiny import TINY_ARCHS, TINY_MODELS, build_tiny_model, load_tiny_tokenizer, tiny_tokenizer_dir

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "PACKAGED_MODELS",
    "TINY_ARCHS",
    "TINY_MODELS",
    "LoraSettings",
    "ModelLoadError",
    "apply_lora",
    "atomic_dir",
    "build_tiny_model",
    "cache_dir",
    "convert_gguf",
    "enable_gradient_checkpointing",
    "is_peft_model",
    "load_model",
    "load_tiny_tokenizer",
    "normalise_model",
    "normalise_tokenizer",
    "reference_context",
    "save_model",
    "tiny_tokenizer_dir",
    "unwrap",
]
