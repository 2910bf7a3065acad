"""Tiny randomly initialised models for tests and smoke runs: ``tiny-random-<arch>``.

Every preset shares one shape (hidden 64, 2 layers, 4 heads, 2 KV heads where the architecture has
grouped-query attention, MLP 128, 1024 positions, tied embeddings) and the tokenizer shipped in
``preftune/assets/tiny_tokenizer`` (byte-level BPE, ChatML, pad == eos like SmolLM2). They have
~0.1–0.2M parameters, so a forward+backward takes milliseconds on a CPU, and several
architectures keep code honest about model-specific quirks (GPT-2's learned positions and
``Conv1D`` layers, Qwen2's attention biases). Weights depend only on ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

TINY_PREFIX = "tiny-random-"
HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, POSITIONS = 64, 2, 4, 2, 128, 1024
# Token ids fixed by the shipped tokenizer (same as SmolLM2): <|im_start|>=1, <|im_end|>=2 = eos = pad.
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2


def tiny_tokenizer_dir() -> Path:
    """Folder of the packaged tiny tokenizer (see ``scripts/build_tiny_tokenizer.py``)."""
    return Path(str(resources.files("preftune") / "assets" / "tiny_tokenizer"))


def load_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Load the packaged tiny tokenizer (1024 tokens, ChatML template, pad == eos, no BOS added)."""
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))


def _token_ids(vocab_size: int) -> dict:
    """Config fields shared by every preset: vocabulary and special-token ids."""
    return {"vocab_size": vocab_size, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


def _llama(vocab_size: int) -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=MLP, max_position_embeddings=POSITIONS,
        tie_word_embeddings=True, **_token_ids(vocab_size),
    )  # fmt: skip


def _mistral(vocab_size: int) -> PretrainedConfig:
    # sliding_window=None: full attention, like the other presets (Mistral's default window is 4096).
    return MistralConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=MLP, max_position_embeddings=POSITIONS,
        sliding_window=None, tie_word_embeddings=True, **_token_ids(vocab_size),
    )  # fmt: skip


def _qwen2(vocab_size: int) -> PretrainedConfig:
    return Qwen2Config(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=MLP, max_position_embeddings=POSITIONS,
        use_sliding_window=False, tie_word_embeddings=True, **_token_ids(vocab_size),
    )  # fmt: skip


def _gpt2(vocab_size: int) -> PretrainedConfig:
    # GPT-2 has no grouped-query attention, so all 4 heads carry their own keys and values.
    return GPT2Config(
        n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=MLP, n_positions=POSITIONS,
        tie_word_embeddings=True, **_token_ids(vocab_size),
    )  # fmt: skip


TINY_CONFIGS: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "gpt2": _gpt2,
}
TINY_ARCHS: tuple[str, ...] = tuple(TINY_CONFIGS)
TINY_MODELS: tuple[str, ...] = tuple(TINY_PREFIX + arch for arch in TINY_ARCHS)


def tiny_arch(name: str) -> str | None:
    """``"tiny-random-llama"`` -> ``"llama"``; ``None`` for names that are not tiny presets."""
    return name[len(TINY_PREFIX) :] if name.startswith(TINY_PREFIX) else None


def tiny_config(arch: str, vocab_size: int | None = None) -> PretrainedConfig:
    """The tiny config of ``arch`` (one of :data:`TINY_ARCHS`), sized to the tiny tokenizer."""
    if arch not in TINY_CONFIGS:
        raise KeyError(arch)
    return TINY_CONFIGS[arch](vocab_size or len(load_tiny_tokenizer()))


def build_tiny_model(
    arch: str, *, seed: int = 0, model_class=AutoModelForCausalLM, **config_overrides
) -> PreTrainedModel:
    """Randomly initialise the tiny ``arch`` model as ``model_class`` (fp32, eval mode).

    The RNG is forked so that building a model neither depends on nor disturbs the caller's global
    torch RNG: the same ``seed`` gives the same weights wherever it is called from.
    ``config_overrides`` go onto the config (``num_labels=1`` for a reward model, for example).
    """
    config = tiny_config(arch)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(model_class, "from_config"):  # Auto* classes
            model = model_class.from_config(config, dtype=torch.float32)
        else:  # a concrete class such as LlamaForCausalLM
            model = model_class._from_config(config, dtype=torch.float32)
    # peft records this as a saved adapter's base_model_name_or_path, so load_model(adapter) works.
    model.name_or_path = model.config.name_or_path = TINY_PREFIX + arch
    return model.eval()
