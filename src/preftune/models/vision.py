"""Vision-language policies: the ``tiny-random-llava`` preset, processors, image-conditioned log-probs.

A vision-language model (VLM) here is a Hugging Face image-text-to-text model whose processor turns
one image placeholder token in the text into the model's image tokens and the image into
``pixel_values`` (LLaVA-1.5 style: ``LlavaForConditionalGeneration`` and the same family). For such
a model ``load_model(name, model_class=AutoModelForImageTextToText)`` returns ``(model, processor)``:
the processor (tokenizer + image processor, what transformers and TRL call the processing class)
takes the place of the tokenizer, and saving it with the model gives a folder that
``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained`` reload.

``tiny-random-llava`` is a LLaVA of ~0.2M parameters built offline: a 2-layer CLIP vision tower on
32x32 images in 8x8 patches (16 image tokens), the two-layer projector, and the tiny llama text
model of ``models/tiny.py`` with the shipped tokenizer plus one added ``<image>`` token.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.models.clip import CLIPImageProcessorPil

from .tiny import TINY_PREFIX, load_tiny_tokenizer, tiny_config

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8
VISION_HIDDEN, VISION_LAYERS, VISION_HEADS, VISION_MLP = 32, 2, 2, 64
TINY_VLM_ARCHS: tuple[str, ...] = ("llava",)
TINY_VLMS: tuple[str, ...] = tuple(TINY_PREFIX + arch for arch in TINY_VLM_ARCHS)
# Model types whose forward is lm_head(model(input_ids, pixel_values, ...).last_hidden_state):
# the head then runs on the scored positions only (see image_conditioned_logps).
_BACKBONE_HEAD_TYPES = frozenset({"llava"})


def is_image_text_class(model_class) -> bool:
    """True for ``AutoModelForImageTextToText`` and the concrete classes it maps to."""
    if model_class is AutoModelForImageTextToText:
        return True
    name = getattr(model_class, "__name__", "")
    return name in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())


def text_tokenizer(processing_class):
    """The tokenizer inside a processor, or the tokenizer itself."""
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


def tiny_vlm_processor() -> LlavaProcessor:
    """The processor of ``tiny-random-llava``: the tiny tokenizer + ``<image>`` and a 32x32 CLIP
    image processor (resize the shortest edge to 32, centre-crop, CLIP normalisation)."""
    tokenizer = load_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    # The PIL backend: the default one needs torchvision, which preftune does not depend on.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    # "default" drops the vision tower's CLS token, so one image = (32 / 8)^2 = 16 image tokens.
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
    )  # fmt: skip


def tiny_vlm_config(arch: str, processor: LlavaProcessor) -> LlavaConfig:
    if arch not in TINY_VLM_ARCHS:
        raise KeyError(arch)
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=VISION_MLP, num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        projection_dim=VISION_HIDDEN,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision,
        text_config=tiny_config("llama", vocab_size=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_vlm(arch: str, *, seed: int = 0, **config_overrides) -> tuple[PreTrainedModel, LlavaProcessor]:
    """Randomly initialise ``tiny-random-<arch>`` (fp32, eval mode) with its processor.

    Like ``build_tiny_model``: the weights depend only on ``seed`` and the caller's RNG is untouched.
    """
    processor = tiny_vlm_processor()
    config = tiny_vlm_config(arch, processor)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.name_or_path = model.config.name_or_path = TINY_PREFIX + arch
    return model.eval(), processor


def image_token_id(processor) -> int:
    """Id of the processor's image placeholder token (``<image>`` for LLaVA)."""
    token = getattr(processor, "image_token", None)
    if token is None:
        raise ValueError(f"{type(processor).__name__} has no image token; not a LLaVA-style processor")
    return text_tokenizer(processor).convert_tokens_to_ids(token)


def _backbone_and_head(model):
    """(multimodal backbone, output head) when the head can run on scored positions only, else None."""
    inner = model
    if hasattr(inner, "peft_config") and hasattr(inner, "get_base_model"):
        active = getattr(inner, "active_peft_config", None)
        if active is not None and getattr(active, "is_prompt_learning", False):
            return None  # virtual tokens live in the peft wrapper's forward
        inner = inner.get_base_model()  # LoRA layers are injected in place: calling inside applies them
    if getattr(inner.config, "model_type", None) not in _BACKBONE_HEAD_TYPES:
        return None
    backbone, head = getattr(inner, "model", None), inner.get_output_embeddings()
    return (backbone, head) if backbone is not None and head is not None else None


def image_conditioned_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the completion tokens of each row, each row conditioned on its image.

    Args:
        model: an image-text-to-text model (optionally peft-wrapped).
        batch: ``input_ids`` [R, T] with the image tokens already expanded, ``attention_mask``
            [R, T], ``completion_mask`` [R, T] (True on scored tokens, never at position 0) and
            ``pixel_values`` [R, C, H, W] (row r's image).
    Returns:
        (logps fp32 [R], lengths [R] = scored tokens per row). Differentiable w.r.t. the model.

    For known types the backbone runs alone and the output head + log-softmax only at the N scored
    positions (as ``models.logprobs`` does for text): [N, V] logits instead of [R, T, V].
    """
    input_ids = batch["input_ids"]
    mask = batch["completion_mask"].bool().clone()
    mask[:, 0] = False  # nothing precedes position 0
    rows, cols = mask.nonzero(as_tuple=True)
    inputs = dict(input_ids=input_ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                  use_cache=False)  # fmt: skip
    parts = _backbone_and_head(model)
    if parts is None:
        logits = model(**inputs).logits[rows, cols - 1]
    else:
        backbone, head = parts
        logits = head(backbone(**inputs).last_hidden_state[rows, cols - 1])
    logits = logits.float()  # under autocast the head ran in bf16; the softmax never does
    token_logps = logits.gather(-1, input_ids[rows, cols][:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    logps = token_logps.new_zeros(input_ids.shape[0]).index_add(0, rows, token_logps)
    return logps, mask.sum(dim=1)
