"""Typed run configuration: YAML file + dotted overrides -> nested dataclasses.

Every field is documented exactly once, in its ``doc(...)`` help text; ``preftune train --help``,
``preftune config`` (a fully commented YAML), ``docs/config.md`` and the error messages all read it.
Configs are validated completely before any model loads: unknown keys name the valid ones (with a
"did you mean"), wrong types name the key, the expected type and the field's help.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem found before any work starts."""


def doc(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:
    """A dataclass field carrying its one-and-only help text."""
    meta = {"help": help}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


SHARED_FIELDS: dict[str, tuple[Any, str]] = {
    "split": ("train", "Split to read from a datasets directory or hub name."),
    "max_new_tokens": (64, "Maximum tokens sampled per completion."),
    "temperature": (1.0, "Sampling temperature (0 = greedy where allowed)."),
    "top_p": (1.0, "Nucleus sampling: keep the smallest token set with this much probability (1 = off)."),
    "top_k": (0, "Keep only the k most likely tokens (0 = off)."),
    "text_as_chat": (False, "Wrap plain-text prompts as a user message and apply the chat template."),
    "beta": (0.1, "β: strength of the KL leash to the reference (higher = stay closer)."),
    "mode": ("rank", "rank: order each item's completions best first (ties allowed); thumbs: up or down for each (KTO)."),
    "guidelines": ("", "A Markdown/text file with the labelling criterion: shown to people before the first item "
                       "(as text) and given to the LLM judge."),
    "tie_tolerance": (0.0, "Judge, rank mode: scores within this of their neighbour are tied (an all-tied item is skipped)."),
    "threshold": (0.0, "Judge, thumbs mode: thumbs up when the score is above this."),
}
"""Settings that several configs have, with the same meaning: (default, the one help text)."""


def shared(name: str, default: Any = MISSING, *, note: str = "") -> Any:
    """A field of :data:`SHARED_FIELDS` (its default unless ``default`` is given); ``note`` adds what is
    particular to this config after the shared help text."""
    base_default, help_text = SHARED_FIELDS[name]
    return doc(base_default if default is MISSING else default, f"{help_text} {note}".strip())


# ---------------------------------------------------------------------------------------------
# Sections shared by every algorithm
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    enabled: bool = doc(False, "Train a LoRA adapter (peft) instead of all weights.")
    r: int = doc(16, "LoRA rank.")
    alpha: int = doc(32, "LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = doc(0.05, "Dropout on the LoRA input.")
    target_modules: Union[str, list[str]] = doc(
        "all-linear", "Modules to adapt: 'all-linear' or a list of module names (e.g. [q_proj, v_proj])."
    )
    merge_on_save: bool = doc(
        False, "Save the final model with the adapter merged into full weights instead of the adapter alone."
    )

    def validate(self, path: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{path}.r: must be >= 1, got {self.r}")


@dataclass
class ModelConfig:
    name: str = doc(
        "smollm2-135m-instruct",
        "The policy to train: 'smollm2-135m-instruct' (packaged default, offline), 'tiny-random-<arch>' "
        "(llama, qwen2, gpt2; random init, for tests and smoke runs), a path to a .gguf file, a local "
        "Hugging Face model directory, or a hub id.",
    )
    dtype: Literal["fp32", "bf16"] = doc(
        "fp32",
        "Compute precision. 'bf16' runs the forward/backward under bf16 autocast (CPU or CUDA) while "
        "master weights and optimizer state stay fp32.",
    )
    gradient_checkpointing: bool = doc(False, "Recompute activations in backward to save memory.")
    lora: LoraConfig = doc(factory=LoraConfig, help="LoRA adapter settings.")


@dataclass
class DataConfig:
    path: str = doc(
        "",
        "Training data: a .jsonl/.json/.parquet/.csv file, a directory saved by datasets, "
        "'builtin:NAME' for a dataset shipped with preftune, or a datasets hub name. Required.",
    )
    split: str = shared("split")
    max_rows: Optional[int] = doc(None, "Use only the first N rows (smoke runs). null = all rows.")
    max_length: int = doc(1024, "Maximum tokens of prompt + completion.")
    max_prompt_length: Optional[int] = doc(
        None, "Maximum prompt tokens. null = max_length // 2."
    )
    truncation: Literal["keep_end", "error", "drop"] = doc(
        "keep_end",
        "What to do with rows over the limits: 'keep_end' keeps the end of the prompt and cuts the end "
        "of the completion (the count is reported), 'error' stops naming the row, 'drop' skips the row.",
    )
    text_as_chat: bool = doc(
        False,
        "Wrap plain-text prompts/completions as a user/assistant conversation and apply the model's chat "
        "template (conversational rows always get the template).",
    )
    eval_path: Optional[str] = doc(
        None, "Held-out data in the same format as path (evaluated every train.eval_steps). null = none."
    )
    eval_fraction: float = doc(
        0.0, "Hold out this fraction of the training rows for evaluation (a seeded split), when eval_path is null."
    )
    group_by_length: bool = doc(
        True,
        "Sort the rows of each global batch by length before splitting it into micro-batches: less "
        "padding, identical results (losses are normalised over the global batch).",
    )

    def validate(self, path: str) -> None:
        if not self.path:
            raise ConfigError(f"{path}.path: required (a data file, directory, 'builtin:NAME' or dataset name)")
        if self.max_length < 2:
            raise ConfigError(f"{path}.max_length: must be >= 2, got {self.max_length}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"{path}.eval_fraction: must lie in [0, 1), got {self.eval_fraction}")
        mpl = self.max_prompt_length
        if mpl is not None and not (0 < mpl < self.max_length):
            raise ConfigError(
                f"{path}.max_prompt_length: must be between 1 and max_length - 1 ({self.max_length - 1}), got {mpl}"
            )


@dataclass
class TrainConfig:
    micro_batch_size: int = doc(4, "Rows per forward pass per process (see the batch glossary in the README).")
    grad_accum_steps: int = doc(1, "Micro-batches accumulated per optimizer step.")
    max_steps: Optional[int] = doc(
        None, "Optimizer steps to run. null = num_epochs passes over the data."
    )
    num_epochs: int = doc(1, "Passes over the data when max_steps is null.")
    learning_rate: float = doc(1e-5, "Peak learning rate of AdamW.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay.")
    adam_beta1: float = doc(0.9, "AdamW beta1.")
    adam_beta2: float = doc(0.999, "AdamW beta2.")
    adam_eps: float = doc(1e-8, "AdamW epsilon.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = doc(
        "cosine", "Learning-rate decay after warmup."
    )
    warmup_steps: int = doc(0, "Linear warmup steps from 0 to learning_rate.")
    max_grad_norm: Optional[float] = doc(1.0, "Clip the global gradient norm to this value. null = no clipping.")
    seed: int = doc(0, "Seed for initialisation, data order and sampling.")
    eval_steps: int = doc(
        0, "Evaluate on the held-out data every N steps (0 = only after the last step); needs eval data."
    )
    eval_batch_size: int = doc(8, "Rows per forward pass during evaluation.")
    logging_steps: int = doc(1, "Write a line to metrics.jsonl every N steps.")
    save_steps: int = doc(0, "Write a checkpoint every N steps (0 = only at the end of training).")
    save_total_limit: int = doc(2, "Keep only the last K checkpoints.")
    resume_from: Optional[str] = doc(
        None,
        "Continue a run: 'latest' (newest checkpoint in output_dir) or a checkpoint directory. A missing "
        "or corrupt checkpoint is an error, never a fresh start.",
    )
    overwrite_output_dir: bool = doc(
        False,
        "Allow starting a fresh run in an output_dir that already holds checkpoints (they are deleted).",
    )
    report_to: list[str] = doc(
        factory=list, help="Extra metric trackers: any of [tensorboard, wandb]. metrics.jsonl is always written."
    )
    progress_bar: bool = doc(True, "Show a live progress bar with ETA.")
    sharding: Literal["none", "fsdp2", "zero2", "zero3"] = doc(
        "none",
        "'fsdp2': with several processes, shard weights, gradients and optimizer state over them (torch FSDP2, "
        "per decoder layer; the loop applies it, on CPU/gloo too); checkpoints and model/ stay whole. An Accelerate "
        "launch config with FSDP version 2 implies it. 'zero2' / 'zero3': DeepSpeed ZeRO stage 2 (gradients and "
        "optimizer state sharded) / 3 (weights too), engine built by the loop (needs preftune[deepspeed]); an "
        "Accelerate DeepSpeed launch config implies it. 'none': every process holds the whole model (DDP).",
    )
    nonfinite: Literal["stop", "skip"] = doc(
        "stop",
        "A step whose loss, gradient norm, rewards or advantages are NaN/inf is never applied. 'stop': end the run "
        "there (non-zero exit, the step's rows in OUTPUT_DIR/nonfinite-step-N.jsonl, no checkpoint written after "
        "it, so --resume continues from the last good one); 'skip': drop that update and go on.",
    )
    nonfinite_max_skips: int = doc(3, "With nonfinite=skip: stop after this many non-finite steps in a row.")
    dead_run_steps: int = doc(
        5,
        "Warn (log and metrics.jsonl) when for this many steps in a row the gradient norm is exactly 0, the loss "
        "sits at chance level (ln |V| for SFT) or every group's rewards are equal. 0 = never.",
    )

    def validate(self, path: str) -> None:
        at_least_one = ("micro_batch_size", "grad_accum_steps", "num_epochs", "logging_steps", "save_total_limit", "eval_batch_size")
        for name in at_least_one + ("nonfinite_max_skips",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{path}.max_steps: must be >= 1 or null, got {self.max_steps}")
        check_range(path, self, non_negative=("save_steps", "warmup_steps", "eval_steps", "dead_run_steps"))
        self._validate_optimizer(path)
        bad = [r for r in self.report_to if r not in ("tensorboard", "wandb")]
        if bad:
            raise ConfigError(f"{path}.report_to: unknown tracker(s) {bad}; valid: ['tensorboard', 'wandb']")

    def _validate_optimizer(self, path: str) -> None:
        """Every AdamW setting checked here, so torch never sees a value it would reject mid-run."""
        for name in ("learning_rate", "weight_decay", "adam_eps", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{path}.{name}: must be a finite number, got {value}")
        check_range(path, self, positive=("learning_rate", "adam_eps"), non_negative=("weight_decay",))
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{path}.{name}: must lie in [0, 1), got {getattr(self, name)}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"{path}.max_grad_norm: must be > 0 or null (no clipping), got {self.max_grad_norm}")


@dataclass
class RunConfig:
    """One training run: `preftune train CONFIG.yaml key=value ...`."""

    algorithm: str = doc("sft", "Which algorithm to train (see `preftune algorithms`).")
    output_dir: str = doc("runs/sft", "Where checkpoints, metrics.jsonl, config.yaml and the final model go.")
    model: ModelConfig = doc(factory=ModelConfig, help="The policy model.")
    data: DataConfig = doc(factory=DataConfig, help="Training data and tokenisation.")
    train: TrainConfig = doc(factory=TrainConfig, help="The optimisation loop.")
    # The algorithm's own section (e.g. `sft:`) is attached here under its name by load_run_config.
    algo: Any = field(default=None, metadata={"help": "", "section": True})


# ---------------------------------------------------------------------------------------------
# Generic dict <-> dataclass conversion with validation
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, help_text: str) -> Any:
    """Check `value` against type `tp`; return the converted value or raise ConfigError."""

    def fail() -> typing.NoReturn:
        shown = f"{type(value).__name__} {value!r}"
        hint = f" ({help_text})" if help_text else ""
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {shown}{hint}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, help_text)
            except ConfigError:
                continue
        fail()
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail()
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{path}[{i}]", help_text) for i, v in enumerate(value)]
    return _coerce_scalar(value, tp, path, fail)


def _coerce_scalar(value: Any, tp: Any, path: str, fail: Callable[[], typing.NoReturn]) -> Any:
    """``value`` as the scalar type ``tp`` (bool, int, float, str), or ``fail()``."""
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        # PyYAML reads `1e-5` (no dot) as a string; accept any numeric spelling.
        if isinstance(value, bool):
            fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail()
        fail()
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _public_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("section")]


def check_range(path: str, obj: Any, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """ConfigError unless each field named in ``positive`` is > 0 and each in ``non_negative`` >= 0
    (None = unset, allowed). For settings where a zero or negative value would divide by zero or
    silently invert an objective (β, τ, loss weights)."""
    for names, ok, words in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(obj, name)
            if value is not None and not ok(value):
                raise ConfigError(f"{path}.{name}: must be {words}, got {value}")


def unknown_key_error(path: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    where = f"{path}.{key}" if path else key
    return ConfigError(f"unknown key '{where}'.{hint} Valid keys{' of ' + path if path else ''}: {', '.join(valid)}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, validating keys and types."""
    hints = _field_types(cls)
    fields = {f.name: f for f in _public_fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key_error(path, str(key), list(fields))
        sub = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(value, hints[key], sub, fields[key].metadata.get("help", ""))
    for key, f in fields.items():  # defaulted sections are validated too (e.g. a missing data.path)
        if key not in kwargs and dataclasses.is_dataclass(hints[key]):
            kwargs[key] = from_dict(hints[key], {}, f"{path}.{key}" if path else key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path or cls.__name__)
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Files and overrides
# ---------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.learning_rate=1e-4' -> (['train', 'learning_rate'], 1e-4)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like dotted.key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def run_config_to_dict(run: RunConfig) -> dict:
    data = to_dict(run)
    algo = data.pop("algo")
    data[run.algorithm] = algo if algo is not None else {}
    return data


# ---------------------------------------------------------------------------------------------
# Documentation generated from the field help texts
# ---------------------------------------------------------------------------------------------


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Flatten a config class into (dotted key, type, default, help) rows."""
    rows = []
    hints = _field_types(cls)
    for f in _public_fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
    return rows


def commented_yaml(cls: type, values: Any = None, indent: int = 0) -> str:
    """A YAML text of `values` (or the defaults) with every key's help as a comment above it."""
    values = values if values is not None else cls()
    hints = _field_types(cls)
    pad = " " * indent
    out = []
    for f in _public_fields(cls):
        help_text = f.metadata.get("help", "")
        tp = hints[f.name]
        for line in _wrap(help_text, 96 - indent):
            out.append(f"{pad}# {line}")
        value = getattr(values, f.name)
        if dataclasses.is_dataclass(tp):
            out.append(f"{pad}{f.name}:")
            out.append(commented_yaml(tp, value, indent + 2))
        else:
            dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
            if dumped.startswith("{") and dumped.endswith("}"):
                dumped = dumped[1:-1]
            out.append(f"{pad}{dumped}")
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=max(width, 40)) if text else []
