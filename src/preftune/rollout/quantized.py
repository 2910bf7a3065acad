"""The quantized rollout backends (CPU): samples from a dynamically quantized copy of the policy.

``int8``: every ``nn.Linear`` of the copy (attention and MLP projections and the output head) holds
int8 weights, one scale per output channel (symmetric), and quantizes its input per batch on the fly
(``torch.ao.quantization.quantize_dynamic``, the x86/fbgemm int8 GEMM). ``fp16``: the linear layers
hold fp16 weights and compute in fp32 (fbgemm's fp16 GEMM). Embeddings and norms stay fp32. At the
decode shape (a few rows, one token each) a forward is bound by reading the weights, so a quarter
(int8) or half (fp16) of the bytes is what makes it faster. A LoRA policy is quantized from its merged
weights (base + B·A·α/r).

Measured on SmolLM2-135M (``benchmarks/decode_speed.py``, README): int8's per-tensor 8-bit
activations cannot hold the model's activation outliers (the MLP down projection's input above all),
so its log-probs are far from the policy's (KL(π_int8‖π) ~0.5 nats per token); fp16's KL is ~3e-6.
On a model without such outliers (the tiny test model) int8's KL is ~5e-6.

``sync(policy)`` (before every rollout) re-quantizes the current weights into the same copy, in place:
the copy is built once, each refresh costs one pass over the weights. The samples are a seeded
function of the quantized weights, and their log-probs are the quantized model's, not the policy's:
the algorithm recomputes the old policy's with the training forward and corrects the gradient with
truncated importance sampling (``tis_cap``), logging the mismatch (``tis/ratio``, ``tis/kl``).

torchao's ``Int8DynamicActivationInt8WeightConfig`` was measured too (torchao 0.18, torch 2.13 CPU,
eager): ~10x slower than fp32 at the rollout's decode shape, so the torch.ao kernels are used.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from preftune.models.loading import _merged_copy
from preftune.models.lora import is_peft_model, quiet_peft_deprecations, unwrap
from preftune.rollout.backends import SamplingSettings, sample

__all__ = ["QUANTIZED", "QuantizedBackend", "quantize_copy", "refresh_copy"]

QUANTIZED = {"int8": torch.qint8, "fp16": torch.float16}
"""Quantized samplers and the weight dtype of their linear layers."""


def _qconfig(dtype: torch.dtype):
    q = torch.ao.quantization
    return q.per_channel_dynamic_qconfig if dtype == torch.qint8 else q.float16_dynamic_qconfig


@contextmanager
def _quiet() -> Iterator[None]:
    """torch 2.13 marks torch.ao eager quantization deprecated (it still ships and works); keep the log clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(torch\.ao\.quantization|quantize_per_(tensor|channel)).*deprecated")
        yield


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under any wrapper and peft (LoRA layers still in place): module names as in the merged model."""
    inner = unwrap(model)
    return inner.get_base_model() if is_peft_model(inner) else inner


def _linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear, nn.Module | None]]:
    """(module name in the merged model, the fp32 linear layer, its peft LoRA wrapper or None) of every
    linear layer of ``model``."""
    for name, module in _base_model(model).named_modules():
        layer = getattr(module, "base_layer", None)
        if isinstance(layer, nn.Linear) and hasattr(module, "get_delta_weight"):  # a peft LoRA linear
            yield name, layer, module
        elif type(module) is nn.Linear and not name.endswith(".base_layer") and ".lora_" not in name:
            yield name, module, None


def _merged_weight(layer: nn.Linear, lora: nn.Module | None) -> torch.Tensor:
    """The layer's fp32 weight with the active LoRA adapters merged in (base + Δ)."""
    weight = layer.weight.detach().float()
    if lora is not None and not lora.disable_adapters and not lora.merged:
        for adapter in lora.active_adapters:
            if adapter in lora.lora_A:
                weight = weight + lora.get_delta_weight(adapter).float()
    return weight


def _frozen_state(layer: nn.Linear, lora: nn.Module | None) -> tuple | None:
    """None when an optimizer step may change the layer (its weight, bias or adapters require grad);
    else what identifies its fixed value (the tensors, the active adapters and their on/merged flags).

    Parameter version counters cannot tell whether a step touched a layer: fused AdamW (the loop's
    optimizer) updates parameters in place without bumping them, so a trainable layer is always
    re-quantized."""
    tensors = [t for t in [layer.weight, layer.bias] + (list(lora.parameters()) if lora is not None else []) if t is not None]
    if any(t.requires_grad for t in tensors):
        return None
    flags = (lora.disable_adapters, lora.merged, tuple(lora.active_adapters)) if lora is not None else ()
    return tuple(id(t) for t in tensors) + flags


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without wrappers, LoRA adapters merged in."""
    inner = unwrap(model)
    if is_peft_model(inner):
        with quiet_peft_deprecations():
            return _merged_copy(inner)
    return copy.deepcopy(inner)


def quantize_copy(model: nn.Module, dtype: torch.dtype = torch.qint8) -> nn.Module:
    """A dynamically quantized copy of ``model`` (fp32, CPU; LoRA merged) whose linear layers hold
    ``dtype`` (torch.qint8 or torch.float16) weights, in eval mode, no grads."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("the quantized samplers run on CPU (x86 fbgemm kernels); this policy is on "
                         f"{next(model.parameters()).device}")
    plain = _plain_copy(model).float().eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    with _quiet():
        return torch.ao.quantization.quantize_dynamic(
            plain, {nn.Linear: _qconfig(dtype)}, dtype=dtype, inplace=True
        )


def _int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8, as ``per_channel_dynamic_qconfig``'s observer computes it
    (scale = max |w| / 127.5, zero point 0; tested equal), in one pass instead of the observer's three."""
    scale = (weight.abs().amax(1) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    return torch.quantize_per_channel(weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)


@torch.no_grad()
def refresh_copy(quantized: nn.Module, model: nn.Module, versions: dict | None = None) -> int:
    """Re-quantize ``model``'s current weights into ``quantized`` (built by :func:`quantize_copy` from
    the same architecture): linear layers re-quantized, every other parameter copied. ``versions``
    (kept by the caller between refreshes) skips frozen layers already quantized, e.g. the output head
    and the layers without adapters under LoRA. Returns how many linear layers were re-quantized."""
    targets = {name: m for name, m in quantized.named_modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)}
    versions = {} if versions is None else versions
    seen, done = set(), 0
    with _quiet():
        for name, layer, lora in _linear_layers(model):
            if name not in targets:
                raise RuntimeError(f"the quantized sampler has no linear layer {name!r}: the policy's architecture changed")
            seen.add(name)
            key = _frozen_state(layer, lora)
            if key is not None and versions.get(name) == key:
                continue
            bias = None if layer.bias is None else layer.bias.detach().float()
            weight = _merged_weight(layer, lora)
            target = targets[name]  # fp16: set_weight_bias packs the fp32 weight to fp16 itself
            target.set_weight_bias(_int8_weight(weight) if target._packed_params.dtype == torch.qint8 else weight, bias)
            versions[name], done = key, done + 1
    if seen != set(targets):
        raise RuntimeError(f"the policy has no linear layer for the quantized sampler's {sorted(set(targets) - seen)[:3]}")
    source = dict(_plain_parameters(model))
    for name, p in quantized.named_parameters():
        if name not in source:
            raise RuntimeError(f"the policy has no parameter {name!r} for the quantized sampler (modules_to_save is not supported)")
        p.copy_(source[name])
    return done


def _plain_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The non-linear parameters (embeddings, norms) of ``model``, named as in the merged model."""
    for name, p in _base_model(model).named_parameters(remove_duplicate=False):
        if ".lora_" not in name and not name.endswith((".base_layer.weight", ".base_layer.bias")):
            yield name, p.detach()


class QuantizedBackend:
    """Samples from a quantized copy of the policy (``int8`` or ``fp16``), refreshed by ``sync`` (see
    the module docstring)."""

    exact = False

    def __init__(self, tokenizer, name: str = "int8"):
        if name not in QUANTIZED:
            raise ValueError(f"unknown quantized sampler {name!r}; choose one of {', '.join(QUANTIZED)}")
        self.name, self.dtype = name, QUANTIZED[name]
        self.tokenizer, self.model, self._versions = tokenizer, None, {}

    def sync(self, policy) -> None:
        if self.model is None:
            self.model = quantize_copy(policy, self.dtype)
            self._versions = {name: _frozen_state(layer, lora) for name, layer, lora in _linear_layers(policy)}
        else:
            refresh_copy(self.model, policy, self._versions)

    def generate(self, prompt_ids, settings: SamplingSettings, *, seed, return_logps=False, autocast=nullcontext):
        """``autocast`` is ignored: the copy computes in int8 / fp16 weights and fp32, whatever the training precision."""
        if self.model is None:
            raise RuntimeError("sync(policy) before generate")
        return sample(self.model, self.tokenizer, prompt_ids, settings, seed=seed, return_logps=return_logps)
