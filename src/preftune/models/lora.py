"""LoRA adapters, gradient checkpointing, and the "reference model for free" trick.

With LoRA the frozen base weights *are* the reference policy of DPO/RLHF: disabling the adapter
(:func:`reference_context`) gives pi_ref's log-probs without a second copy of the model in memory.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (Hu et al. 2021); ``apply_lora(model, **asdict(settings))`` uses them."""

    r: int = 16
    """Rank of the update ``B @ A``; 8-64 is typical, higher = more capacity and memory."""
    alpha: int = 32
    """Scale: the update is multiplied by ``alpha / r`` (2.0 by default, as in QLoRA/TRL examples)."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: list[str] | str = field(default="all-linear")
    """Module names to adapt, or ``"all-linear"`` (every linear layer except the output head)."""


def apply_lora(
    model: PreTrainedModel,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | str = "all-linear",
) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only adapter (and, for classifiers, head) params train.

    The task type follows the model: a sequence classifier (reward model) gets ``SEQ_CLS``, which
    also keeps its freshly initialised score head trainable; everything else ``CAUSAL_LM``.
    The adapter's B matrix starts at zero, so the wrapped model initially equals ``model``.
    """
    is_classifier = "SequenceClassification" in type(model).__name__
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if is_classifier else TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        # GPT-2 stores its linear layers as transposed Conv1D; peft would flip this itself, with a warning.
        fan_in_fan_out=getattr(model.config, "model_type", None) == "gpt2",
    )
    with quiet_peft_deprecations():
        return get_peft_model(model, config)


@contextlib.contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """Hide the FutureWarning peft 0.21 triggers by reading transformers' deprecated
    ``is_gradient_checkpointing`` when wrapping a model: users cannot act on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass (less memory, ~30% more compute); peft or not.

    Non-reentrant checkpointing is used: it handles inputs that do not require grad and kwargs.
    ``enable_input_require_grads`` is still called when the input embeddings are frozen (LoRA),
    as TRL does, so that switching to reentrant checkpointing never silently yields no gradients.
    """
    base = unwrap(model)
    base = base.get_base_model() if isinstance(base, PeftModel) else base
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    embeddings = base.get_input_embeddings()
    if not any(p.requires_grad for p in embeddings.parameters()):
        base.enable_input_require_grads()


@contextlib.contextmanager
def reference_context(model) -> Iterator:
    """Inside this block ``model`` computes the reference policy pi_ref.

    For a peft model the adapters are disabled, so the frozen base model is the reference (no
    second copy in memory). For any other model this is a no-op: full fine-tuning needs a separate
    frozen reference model, which the algorithm holds itself. Wrap calls in ``torch.no_grad()``
    yourself; this context only switches adapters. Works through DDP-style ``.module`` wrappers.

    Example::

        with torch.no_grad(), reference_context(policy):
            reference_logps = sequence_logps(policy, batch)
    """
    inner = unwrap(model)
    if isinstance(inner, PeftModel):
        with inner.disable_adapter():
            yield model
    else:
        yield model


def is_peft_model(model) -> bool:
    """True when ``model`` (possibly DDP-wrapped) carries peft adapters."""
    return isinstance(unwrap(model), PeftModel)


def unwrap(model):
    """Strip DDP/``accelerate`` wrappers (``.module``) to reach the transformers/peft model."""
    while hasattr(model, "module") and not isinstance(model, (PreTrainedModel, PeftModel)):
        model = model.module
    return model
