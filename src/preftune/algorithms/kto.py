"""KTO: Kahneman-Tversky optimisation on unpaired thumbs-up / thumbs-down data (Ethayarajh et al.
2024; seed 002).

Each row is (prompt, completion, label). The reference point z_ref is the batch estimate of
KL(π_θ‖π_ref), from *mismatched* (prompt, completion) pairs: every example is given, once at
tokenization, the completion of another example with a different prompt (a seeded pairing over the
whole dataset, so the estimate does not depend on how a global batch is split). Before each
optimizer step the loop calls ``before_step`` with all micro-batches of the step: the KL term is
computed there without gradients and summed over every micro-batch and process, so z_ref is the
mean over the GLOBAL batch — accumulation and world size do not change it, and batch size 1 is
well defined (a known failure elsewhere).

Paired data is accepted too: each pair becomes a desirable and an undesirable row.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch

from preftune.algorithms.base import Metrics, Needs
from preftune.algorithms.pairwise import ReferenceConfig, WithReference
from preftune.config import check_range, doc, shared
from preftune.data.collate import collate_completions
from preftune.data.loaders import load_records, pairs_to_unpaired, sniff_kind
from preftune.data.records import DataError
from preftune.losses.kto import kto_loss, kto_recommended_weights
from preftune.models.logprobs import per_token_logps, sequence_logps

log = logging.getLogger("preftune.algorithms")

KL_PREFIX = "kl_"


@dataclass
class KTOConfig(ReferenceConfig):
    beta: float = shared("beta")
    desirable_weight: Optional[float] = doc(
        None, "λ_D, weight of desirable rows. null = the paper's rule for imbalanced data (with undesirable_weight)."
    )
    undesirable_weight: Optional[float] = doc(
        None, "λ_U, weight of undesirable rows. null = the paper's rule: λ_D·n_D / (λ_U·n_U) in [1, 4/3]."
    )

    def validate(self, path: str) -> None:
        check_range(path, self, positive=("beta", "desirable_weight", "undesirable_weight"))


class KTO(WithReference):
    """KTO (Ethayarajh et al. 2024): prospect-theoretic loss on unpaired desirable/undesirable rows."""

    name = "kto"
    Config = KTOConfig
    needs = Needs(data_kind="unpaired", loss_unit="row", reference_model=True)
    reference_keys = ("reference_logps", "reference_kl_logps")
    example_keys = ("prompt_ids", "completion_ids", "kl_completion_ids")

    def __init__(self, config: Any, policy, tokenizer, run):
        super().__init__(config, policy, tokenizer, run)
        self.weights = (config.desirable_weight or 1.0, config.undesirable_weight or 1.0)
        self._step_kl: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- data ------------------------------------------------------------------------------------
    @classmethod
    def load_records(cls, config: Any, source: str, split: str) -> list:
        if sniff_kind(source, split) == "pairs":
            return pairs_to_unpaired(load_records(source, "pairs", split=split))
        records = load_records(source, "unpaired", split=split)
        labels = {r.label for r in records}
        if len(labels) == 1 and len(records) > 1:  # (a single row is refused at tokenization)
            (label,) = labels
            kind, other = ("desirable", "false") if label else ("undesirable", "true")
            raise DataError(f"all {len(records)} rows are labelled {str(label).lower()} ({kind}); KTO weighs desirable "
                            f"against undesirable examples, so add rows with label {other}"
                            + (" (or train SFT on these rows)" if label else ""), source=str(source), field="label")
        return records

    def tokenize(self, records: list, source: str):
        examples, report = super().tokenize(records, source)
        if not examples:
            return examples, report
        if len(examples) == 1:
            raise DataError("KTO needs at least 2 rows: its KL reference point pairs each prompt with another "
                            "row's completion", source=str(source))
        return attach_mismatched(examples, self.run.data.max_length, self.run.train.seed), report

    def prepare_examples(self, examples: list[dict], accelerator) -> list[dict]:
        labels = [bool(e["label"]) for e in examples]
        n_d = sum(labels)
        auto = kto_recommended_weights(n_d, len(labels) - n_d)
        c = self.config
        self.weights = (c.desirable_weight if c.desirable_weight is not None else auto[0],
                        c.undesirable_weight if c.undesirable_weight is not None else auto[1])
        if accelerator.is_main_process:
            log.info("KTO: %d desirable / %d undesirable rows; λ_D=%.3g λ_U=%.3g", n_d, len(labels) - n_d, *self.weights)
        return super().prepare_examples(examples, accelerator)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        main = collate_completions([{k: v for k, v in e.items() if k != "kl_completion_ids"} for e in examples], pad)
        kl = collate_completions([{"prompt_ids": e["prompt_ids"], "completion_ids": e["kl_completion_ids"]} for e in examples], pad)
        main.update({KL_PREFIX + k: kl[k] for k in ("input_ids", "attention_mask", "completion_mask")})
        return main

    # -- loss ------------------------------------------------------------------------------------
    def score_reference(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {"reference_logps": _logps(model, batch), "reference_kl_logps": _logps(model, _kl_view(batch))}

    def before_step(self, micro_batches: list[dict], accelerator) -> None:
        """z_ref over the whole global batch: Σ(log π_θ − log π_ref) of the mismatched pairs, all processes."""
        total = torch.zeros((), device=accelerator.device)
        count = torch.zeros((), device=accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            for batch in micro_batches:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                ref = self.reference_columns(batch)["reference_kl_logps"]
                total += (_logps(self.policy, _kl_view(batch)) - ref).float().sum()
                count += ref.numel()
        packed = accelerator.reduce(torch.stack([total, count]), reduction="sum")
        self._step_kl = (packed[0], packed[1])

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        ref = self.reference_columns(batch)
        policy_logps = sequence_logps(per_token_logps(self.policy, batch), batch["completion_mask"])
        if self.training and self._step_kl is not None:
            kl_policy = kl_ref = ref["reference_kl_logps"]  # unused: the global estimate overrides them
            override = self._step_kl
        else:  # evaluation: the estimate of this batch alone
            with torch.no_grad():
                kl_policy, kl_ref, override = _logps(self.policy, _kl_view(batch)), ref["reference_kl_logps"], None
        d_w, u_w = self.weights
        losses, m = kto_loss(
            policy_logps, ref["reference_logps"], batch["labels"], kl_policy, kl_ref,
            beta=self.config.beta, desirable_weight=d_w, undesirable_weight=u_w, kl_sum_and_count=override,
        )
        ones = torch.ones_like(m["rewards"])
        metrics = {
            "rewards/chosen": (m["chosen_rewards"].sum(), m["chosen_rows"].sum()),
            "rewards/rejected": (m["rejected_rewards"].sum(), m["rejected_rows"].sum()),
            "rewards/mean": (m["rewards"].sum(), ones.sum()),
            "kl": (m["kl"].sum(), ones.sum()),
            "logps/policy": (policy_logps.detach().sum(), ones.sum()),
            "desirable_fraction": (m["chosen_rows"].sum(), ones.sum()),
        }
        return losses.sum(), metrics


def _kl_view(batch: dict) -> dict:
    return {k[len(KL_PREFIX):]: v for k, v in batch.items() if k.startswith(KL_PREFIX)}


def _logps(model, batch: dict) -> torch.Tensor:
    return sequence_logps(per_token_logps(model, batch), batch["completion_mask"])


def attach_mismatched(examples: list[dict], max_length: int, seed: int) -> list[dict]:
    """Give each example the completion of another example with a different prompt (seeded), cut so
    that prompt + mismatched completion fits max_length."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    partner = {}
    n = len(order)
    for pos, i in enumerate(order):
        j = order[(pos + 1) % n]
        for step in range(2, n + 1):  # skip partners with the same prompt (e.g. the other half of a pair)
            if examples[j]["prompt_ids"] != examples[i]["prompt_ids"]:
                break
            j = order[(pos + step) % n]
        partner[i] = j
    out = []
    for i, ex in enumerate(examples):
        room = max(1, max_length - len(ex["prompt_ids"]))
        out.append({**ex, "kl_completion_ids": examples[partner[i]]["completion_ids"][:room]})
    return out
