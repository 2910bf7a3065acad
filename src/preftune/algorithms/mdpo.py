"""mDPO (Wang et al. 2024): preference optimisation conditioned on an image, for vision-language models.

Each row is (image m, prompt x, chosen y_w, rejected y_l); see ``preftune.data.images`` for the data
format and ``preftune.losses.mdpo`` for the loss. One forward scores 3 rows per pair: x + y_w and
x + y_l with the image m, and x + y_w with the corrupted image m' (a crop keeping a small fraction of
m, fixed per example by ``data.images.corruption_box``). With ``copo_weight: 0`` the corrupted rows
are not computed, and with ``anchor_weight: 0`` as well the loss is DPO on image-conditioned pairs.

Reference log-probs (for all three rows) are handled as in DPO (``algorithms/pairwise.py``): computed
once and cached, or live from a frozen copy / the adapter-disabled base under LoRA. Because m' is a
deterministic function of the example, its reference log-probs cache like the others and a resumed
run sees the same corrupted images.

Supported policies: LLaVA-style image-text-to-text models (one ``<image>`` placeholder expanded by
the processor into a fixed number of image tokens; the forward takes ``pixel_values``), such as the
``tiny-random-llava`` preset or a local ``llava-hf`` folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import AutoModelForImageTextToText

from preftune.algorithms.base import Metrics, Needs
from preftune.algorithms.pairwise import REF_KEYS, ReferenceConfig, WithReference
from preftune.config import ConfigError, doc, shared
from preftune.data.collate import collate_completions
from preftune.data.images import IMAGE_PLACEHOLDER, corruption_box, load_image_pairs, open_image
from preftune.data.records import DataError, PairRecord
from preftune.data.tokenize import TruncationReport, tokenize_pairs
from preftune.losses.mdpo import mdpo_loss
from preftune.losses.metrics import row_metrics
from preftune.models import loading  # loading.load_model: looked up at call time, so tests can stand in for it
from preftune.models.vision import image_conditioned_logps, image_token_id, text_tokenizer

log = logging.getLogger("preftune.algorithms")

CORRUPTED_KEY = "reference_corrupted_chosen_logps"
_VERIFIED_TYPES = ("llava",)
_METRIC_NAMES = {
    "chosen_rewards": "rewards/chosen",
    "rejected_rewards": "rewards/rejected",
    "margins": "rewards/margins",
    "accuracies": "rewards/accuracies",
    "grad_weights": "grad_weight",
    "corrupted_rewards": "rewards/corrupted_chosen",
    "copo_margins": "rewards/copo_margins",
    "copo_accuracies": "rewards/copo_accuracies",
    "anchor_margins": "rewards/anchor_margins",
    "dpo_losses": "loss/dpo",
    "copo_losses": "loss/copo",
    "anchor_losses": "loss/anchor",
}


@dataclass
class MDPOConfig(ReferenceConfig):
    beta: float = shared("beta", note="Shared by the three terms (0.1 in the paper).")
    copo_weight: float = doc(
        1.0,
        "λ_c: weight of the conditional preference term (chosen answer with the image vs with the corrupted "
        "image; 1 in the paper). 0 skips the corrupted-image forward.",
    )
    anchor_weight: float = doc(1.0, "λ_a: weight of the anchored preference term (chosen reward above δ; 1 in the paper).")
    anchor_delta: float = doc(0.0, "δ: the anchor the chosen reward β·log π/π_ref is pushed above (0 in the paper).")
    crop_keep_min: float = doc(
        0.01, "Corrupted image: smallest fraction of the image's area kept by the random crop (in (0, 1])."
    )
    crop_keep_max: float = doc(
        0.2,
        "Corrupted image: largest fraction of the area kept (the paper keeps under 20%). Each example's crop is "
        "drawn once from a hash of train.seed, its image and its text, so it never changes between epochs or runs.",
    )

    def validate(self, path: str) -> None:
        if not 0.0 < self.crop_keep_min <= self.crop_keep_max <= 1.0:
            raise ConfigError(
                f"{path}.crop_keep_min / crop_keep_max: need 0 < crop_keep_min <= crop_keep_max <= 1, "
                f"got {self.crop_keep_min} and {self.crop_keep_max}"
            )
        if self.copo_weight < 0 or self.anchor_weight < 0:
            raise ConfigError(f"{path}.copo_weight / anchor_weight: must be >= 0")


class MDPO(WithReference):
    """mDPO (Wang et al. 2024): DPO + conditional (corrupted-image) + anchored preference, for VLMs."""

    name = "mdpo"
    Config = MDPOConfig
    needs = Needs(data_kind="pairs", loss_unit="row", reference_model=True)
    example_keys = ("prompt_ids", "chosen_ids", "rejected_ids", "image_hash", "corrupt_box")

    def __init__(self, config: MDPOConfig, policy, processor, run):
        super().__init__(config, policy, processor, run)  # self.tokenizer = the processor
        self.image_token_id = image_token_id(processor)
        self.rows_per_pair = 3 if config.copo_weight else 2
        self.reference_keys = REF_KEYS + ((CORRUPTED_KEY,) if config.copo_weight else ())
        model_type = getattr(getattr(policy, "config", None), "model_type", None)
        if model_type not in _VERIFIED_TYPES:
            log.warning("mdpo: model type %r is untested (verified: %s)", model_type, ", ".join(_VERIFIED_TYPES))

    # -- model ------------------------------------------------------------------------------------
    @classmethod
    def load_reference(cls, config: Any, run: Any) -> torch.nn.Module:
        return cls.load_policy(config, run, name=config.reference)[0]  # an image-text model, like the policy

    @classmethod
    def load_policy(cls, config: Any, run: Any, name: str | None = None):
        """The policy as an image-text-to-text model, with its processor in place of the tokenizer."""
        return loading.load_model(name or run.model.name, dtype=run.model.dtype, seed=run.train.seed,
                          model_class=AutoModelForImageTextToText)  # fmt: skip

    def reference_setting(self) -> str:
        return f"{super().reference_setting()}|{','.join(self.reference_keys)}"

    # -- data -------------------------------------------------------------------------------------
    @classmethod
    def load_records(cls, config: Any, source: str, split: str) -> list:
        return load_image_pairs(source, split=split)

    def tokenize(self, records: list, source: str):
        """Image pair records -> examples: token ids with the image placeholder expanded to the
        model's image tokens, the image's path and hash, and the crop box of its corrupted copy."""
        d, processor = self.run.data, self.tokenizer
        report, examples, counts = TruncationReport(), [], {}
        for index, rec in enumerate(records):
            row = rec.row if rec.row is not None else index + 1
            if rec.size not in counts:
                counts[rec.size] = self._image_tokens(rec.image)
            n = counts[rec.size]
            max_length = d.max_length - (n - 1)  # the placeholder is one token of the n the image takes
            max_prompt = d.max_prompt_length - (n - 1) if d.max_prompt_length is not None else max_length // 2
            if max_prompt < 1 or max_length <= max_prompt:
                raise DataError(f"the image takes {n} tokens: data.max_length={d.max_length} (and "
                                f"max_prompt_length) must leave room for it and some text", source=source, row=row,
                                field="prompt")  # fmt: skip
            pair = _replace_placeholder(rec.pair, IMAGE_PLACEHOLDER, processor.image_token)
            rows, part = tokenize_pairs(
                [pair], text_tokenizer(processor), max_length=max_length, max_prompt_length=max_prompt,
                truncation=d.truncation, text_as_chat=d.text_as_chat, source=source,
            )  # fmt: skip
            for count in ("total", "truncated_prompts", "truncated_completions", "dropped"):
                setattr(report, count, getattr(report, count) + getattr(part, count))
            if not rows:
                continue
            example = rows[0]
            example["prompt_ids"] = self._expand_image(example["prompt_ids"], n, source, row)
            seed = f"{self.run.train.seed}|{rec.image_hash}|{example['prompt_ids']}|{example['chosen_ids']}"
            box = corruption_box(*rec.size, key=seed, keep_min=self.config.crop_keep_min, keep_max=self.config.crop_keep_max)
            examples.append({**example, "image": rec.image, "image_hash": rec.image_hash, "corrupt_box": list(box)})
        return examples, report

    def _image_tokens(self, image_path: str) -> int:
        """How many image tokens the processor expands one placeholder into for this image."""
        processor = self.tokenizer
        ids = processor(text=[processor.image_token], images=[open_image(image_path)], return_tensors="pt")["input_ids"]
        return int((ids == self.image_token_id).sum())

    def _expand_image(self, prompt_ids: list[int], n: int, source: str, row: int) -> list[int]:
        at = [i for i, t in enumerate(prompt_ids) if t == self.image_token_id]
        if len(at) != 1:
            raise DataError(f"the prompt holds {len(at)} image tokens after tokenization and truncation, expected "
                            f"1 (a left-truncated prompt loses the image: raise data.max_length or "
                            f"max_prompt_length)", source=source, row=row, field="prompt")  # fmt: skip
        k = at[0]
        return prompt_ids[:k] + [self.image_token_id] * n + prompt_ids[k + 1 :]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """B examples -> rows [x+y_w | m] * B, [x+y_l | m] * B (and [x+y_w | m'] * B with CoPO), their
        ``pixel_values`` in the same order, and the precomputed reference columns when present."""
        chosen = [{"prompt_ids": ex["prompt_ids"], "completion_ids": ex["chosen_ids"]} for ex in examples]
        rejected = [{"prompt_ids": ex["prompt_ids"], "completion_ids": ex["rejected_ids"]} for ex in examples]
        corrupted = chosen if self.rows_per_pair == 3 else []
        batch = collate_completions(chosen + rejected + corrupted, text_tokenizer(self.tokenizer).pad_token_id)
        images = [open_image(ex["image"]) for ex in examples]
        crops = [img.crop(tuple(ex["corrupt_box"])) for img, ex in zip(images, examples)] if corrupted else []
        pixels = self.tokenizer.image_processor(images=images + crops, return_tensors="pt")["pixel_values"]
        b = len(examples)
        batch["pixel_values"] = torch.cat([pixels[:b], pixels[:b], pixels[b:]])
        for key in self.reference_keys:
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        return batch

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // self.rows_per_pair

    # -- loss -------------------------------------------------------------------------------------
    def _split(self, logps: torch.Tensor) -> list[torch.Tensor]:
        """[rows_per_pair * B] -> chosen, rejected(, corrupted chosen), each [B]."""
        return list(logps.chunk(self.rows_per_pair))

    def score_reference(self, model, batch: dict) -> dict[str, torch.Tensor]:
        logps, _ = image_conditioned_logps(model, batch)
        return dict(zip(self.reference_keys, self._split(logps)))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        logps, lengths = image_conditioned_logps(self.policy, batch)
        policy = self._split(logps) + [None] * (3 - self.rows_per_pair)
        ref = self.reference_columns(batch)
        reference = [ref[k] for k in self.reference_keys] + [None] * (3 - self.rows_per_pair)
        c = self.config
        losses, metrics = mdpo_loss(*policy, *reference, beta=c.beta, copo_weight=c.copo_weight,
                                    anchor_weight=c.anchor_weight, delta=c.anchor_delta)  # fmt: skip
        per_row = {_METRIC_NAMES.get(k, k): v for k, v in metrics.items()}
        names = ("chosen", "rejected", "corrupted_chosen")
        for name, p, r in zip(names, policy, reference):
            if p is not None:
                per_row[f"logps/{name}"], per_row[f"ref_logps/{name}"] = p.detach(), r.detach()
        n_chosen, n_rejected = self._split(lengths)[:2]
        per_row["lengths/chosen"], per_row["lengths/rejected"] = n_chosen.float(), n_rejected.float()
        return losses.sum(), row_metrics(per_row)


def _replace_placeholder(pair: PairRecord, placeholder: str, token: str) -> PairRecord:
    """The record's generic ``<image>`` placeholder -> the processor's own image token."""
    if placeholder == token:
        return pair
    if isinstance(pair.prompt, str):
        return replace(pair, prompt=pair.prompt.replace(placeholder, token))
    return replace(pair, prompt=[{**m, "content": m["content"].replace(placeholder, token)} for m in pair.prompt])
