"""Shared machinery of the reference-based and pairwise preference algorithms (DPO family, KTO).

One concatenated forward scores chosen and rejected completions, in the shared-prompt pair layout
where the model supports it (``pair_layout``; see ``preftune.data.collate.collate_shared_pairs``),
else in padded rows; reference log-probs come from the
batch (precomputed once, see preftune.models.reference), from the adapter-disabled base (LoRA), or
from a frozen copy. A variant only says which loss it uses, whether it wants length-averaged
log-probs and whether it has a reference at all — see algorithms/dpo.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal, Optional

import torch

from preftune.algorithms.base import Algorithm, Metrics, Needs
from preftune.config import ConfigError, doc
from preftune.data.batches import PairBatch
from preftune.data.collate import collate_pairs, collate_shared_pairs
from preftune.data.groups import condition_on_group, group_names
from preftune.data.loaders import load_records, rankings_to_pairs, sniff_kind
from preftune.losses.metrics import row_metrics
from preftune.models import (
    loading,  # loading.load_model: looked up at call time, so tests can stand in for it
    reference as refmod,
)
from preftune.models.logprobs import concatenated_logps, shared_prompt_unsupported
from preftune.models.lora import reference_context
from preftune.models.reference import reference_model

log = logging.getLogger("preftune.algorithms")

REF_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


@dataclass
class ReferenceConfig:
    reference: Optional[str] = doc(
        None,
        "Reference policy π_ref. null = the initial policy (with LoRA: the base with the adapter disabled, "
        "no second copy); or any name model.name accepts.",
    )
    precompute_reference: bool = doc(
        True,
        "Compute reference log-probs once before training and cache them on disk, keyed by a hash of the "
        "reference weights, the tokenized data and the precision; the reference is then not kept in memory.",
    )
    reference_batch_size: int = doc(8, "Rows per forward when precomputing reference log-probs.")


@dataclass
class PairsConfig:
    rankings_to_pairs: Literal["all", "best_vs_rest"] = doc(
        "all", "If the data holds rankings: turn each into all ordered pairs, or best vs each worse one."
    )
    pair_layout: Literal["auto", "shared", "padded"] = doc(
        "auto",
        "How a batch of pairs goes through the model. 'shared': one row per pair, prompt + chosen + "
        "rejected, the prompt computed once (position ids and a 4-D attention mask keep the completions "
        "apart; same log-probs, less compute). 'padded': rows prompt + chosen and prompt + rejected. "
        "'auto': shared where the model supports it (SDPA attention, a verified architecture, no sliding "
        "window shorter than data.max_length), else padded.",
    )
    condition_on_group: bool = doc(
        False,
        "Write each row's 'group' into its prompt (text: a '[preferences of group G] ' prefix; conversations: a "
        "system message), so one policy learns every group's preferences and serves group G when its prompt "
        "says G (group-conditioned DPO). Every row needs a 'group'.",
    )


@dataclass
class PairwiseConfig(ReferenceConfig, PairsConfig):
    pass


@dataclass
class PairLogps:
    """Sequence log-probs of a batch of B preference pairs, the four tensors of the DPO code (each
    Tensor[B]; summed over the completion's tokens, or per token where the algorithm is length-averaged).
    The reference pair is None without a reference model. Iterating gives the four in this order, so
    ``dpo_loss(*logps, beta=...)`` reads like the paper."""

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    reference_chosen_logps: Optional[torch.Tensor] = None
    reference_rejected_logps: Optional[torch.Tensor] = None

    def __iter__(self):
        return iter((self.policy_chosen_logps, self.policy_rejected_logps, self.reference_chosen_logps,
                     self.reference_rejected_logps))

    def per_token(self, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor) -> "PairLogps":
        """Every log-prob divided by its completion's length (tokens, >= 1)."""
        ref = self.reference_chosen_logps is not None
        return PairLogps(self.policy_chosen_logps / chosen_lengths, self.policy_rejected_logps / rejected_lengths,
                         self.reference_chosen_logps / chosen_lengths if ref else None,
                         self.reference_rejected_logps / rejected_lengths if ref else None)


class WithReference(Algorithm):
    """An algorithm that compares the policy with a frozen reference π_ref.

    Subclasses name the reference columns they need (``reference_keys``, per-row floats) and how to
    compute them from a batch with a given model (``score_reference``). Those columns are either
    precomputed once into the examples (``prepare_examples``; the batch then carries them) or
    computed live, from a frozen copy or, under LoRA, from the adapter-disabled policy.
    """

    reference_keys: ClassVar[tuple[str, ...]] = ()
    example_keys: ClassVar[tuple[str, ...]] = ()
    """Tokenized fields that determine the reference columns (hashed into the cache key)."""

    def __init__(self, config: Any, policy, tokenizer, run):
        super().__init__(config, policy, tokenizer, run)
        self.reference_model = None
        if self.needs.reference_model:
            load = partial(self.load_reference, config, run) if config.reference is not None else None
            self.reference_model = reference_model(policy, load=load, copy_policy=not config.precompute_reference,
                                                   what=f"{self.name}.reference")

    @classmethod
    def load_reference(cls, config: Any, run: Any) -> torch.nn.Module:
        """The model named by ``config.reference`` (a causal LM; mdpo loads its image-text model)."""
        return loading.load_model(config.reference, seed=run.train.seed)[0]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference_model is not None:
            self.reference_model.eval()  # never dropout in π_ref
        return self

    def score_reference(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """{reference key: Tensor[B]} computed with `model` (no gradients needed)."""
        raise NotImplementedError

    def reference_setting(self) -> str:
        """Everything besides weights and data that changes the precomputed reference columns (part of
        the cache key): the algorithm, the precision and, where it has one, the batch layout."""
        return f"{self.name}|{self.run.model.dtype}"

    def prepare_examples(self, examples: list[dict], accelerator) -> list[dict]:
        if not (self.needs.reference_model and self.config.precompute_reference):
            return examples

        ref_module = self.reference_model if self.reference_model is not None else self.policy
        key = refmod.cache_key(
            refmod.weights_fingerprint(ref_module),
            refmod.examples_fingerprint(examples, self.example_keys),
            self.reference_setting(),
        )
        columns = refmod.load_cached(key, len(examples))
        if columns is None:

            def compute(rows: list[dict]) -> dict[str, torch.Tensor]:
                batch = {k: v.to(accelerator.device) for k, v in self.collate(rows).items()}
                with accelerator.autocast():
                    cols = self._live_reference(batch)
                return {k: v.float().cpu() for k, v in cols.items()}

            with refmod.eval_mode(ref_module):
                columns = refmod.precompute(
                    examples, compute, batch_size=self.config.reference_batch_size,
                    rank=accelerator.process_index, world_size=accelerator.num_processes,
                    length_of=self.example_length, progress=accelerator.is_main_process,
                )
            if accelerator.is_main_process:
                path = refmod.save_cached(key, columns)
                log.info("reference log-probs of %d rows cached at %s", len(examples), path)
        elif accelerator.is_main_process:
            log.info("reference log-probs reused from %s", refmod.cache_path(key))
        self.reference_model = None  # the cache replaces it: no second model in memory
        return refmod.attach(examples, columns)

    def _live_reference(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            if self.reference_model is not None:
                return self.score_reference(self.reference_model, batch)
            with reference_context(self.policy):
                return self.score_reference(self.policy, batch)

    def reference_columns(self, batch: dict) -> dict[str, torch.Tensor]:
        """The reference columns of this batch: precomputed ones if present, else computed live."""
        if all(k in batch for k in self.reference_keys):
            return {k: batch[k] for k in self.reference_keys}
        return self._live_reference(batch)


class PairwiseAlgorithm(WithReference):
    needs = Needs(data_kind="pairs", loss_unit="row", reference_model=True)
    reference_keys = REF_KEYS
    example_keys = ("prompt_ids", "chosen_ids", "rejected_ids")

    def __init__(self, config: Any, policy, tokenizer, run):
        super().__init__(config, policy, tokenizer, run)
        self.pair_layout = self._choose_layout()

    def _choose_layout(self) -> str:
        """'shared' or 'padded', from ``config.pair_layout`` and what the policy (and a separate
        reference model) support; raises ConfigError when 'shared' is asked of a model without it."""
        if self.config.pair_layout == "padded":
            return "padded"
        models = [self.policy] + ([self.reference_model] if self.reference_model is not None else [])
        reasons = [r for r in (shared_prompt_unsupported(m, self.run.data.max_length) for m in models) if r]
        if not reasons:
            log.info("pair layout: shared (one row per pair, the prompt computed once)")
            return "shared"
        if self.config.pair_layout == "shared":
            raise ConfigError(f"{self.name}.pair_layout: 'shared' is not supported here: {reasons[0]}")
        log.info("pair layout: padded (the shared-prompt layout is not supported: %s)", reasons[0])
        return "padded"

    def reference_setting(self) -> str:
        return f"{super().reference_setting()}|{self.pair_layout}"

    # -- data ------------------------------------------------------------------------------------
    @classmethod
    def load_records(cls, config: Any, source: str, split: str) -> list:
        if sniff_kind(source, split) == "rankings":
            records = rankings_to_pairs(load_records(source, "rankings", split=split), mode=config.rankings_to_pairs)
        else:
            records = load_records(source, "pairs", split=split)
        if getattr(config, "condition_on_group", False):
            group_names(records, str(source))  # every row has a group, and there are at least two
            records = condition_on_group(records, str(source))
        return records

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        collate = collate_shared_pairs if self.pair_layout == "shared" else collate_pairs
        return collate(examples, self.tokenizer.pad_token_id)

    def example_length(self, example: dict) -> int:
        if self.pair_layout == "shared":
            return len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])
        return super().example_length(example)

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["pair_lengths"].shape[0]) if "pair_lengths" in batch else super().count_units(batch)

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if "pair_lengths" in batch:  # shared-prompt pair rows: prompt + chosen + rejected, 4-D attention mask
            return int(batch["pair_lengths"].sum())
        return super().count_tokens(batch)

    # -- loss ------------------------------------------------------------------------------------
    def score_reference(self, model, batch: dict) -> dict[str, torch.Tensor]:
        out = concatenated_logps(model, batch)
        return {REF_KEYS[0]: out["chosen_logps"], REF_KEYS[1]: out["rejected_logps"]}

    def forward(self, batch: PairBatch) -> tuple[torch.Tensor, Metrics]:
        out = concatenated_logps(self.policy, batch)
        n_c, n_r = out["chosen_lengths"].clamp(min=1), out["rejected_lengths"].clamp(min=1)
        logps = PairLogps(out["chosen_logps"], out["rejected_logps"])
        extra: dict[str, torch.Tensor] = {"logps/chosen": logps.policy_chosen_logps.detach(),
                                          "logps/rejected": logps.policy_rejected_logps.detach()}
        if self.needs.reference_model:
            ref = self.reference_columns(batch)
            logps.reference_chosen_logps, logps.reference_rejected_logps = ref[REF_KEYS[0]], ref[REF_KEYS[1]]
            extra["ref_logps/chosen"], extra["ref_logps/rejected"] = ref[REF_KEYS[0]].detach(), ref[REF_KEYS[1]].detach()
        if self.needs.length_averaged:
            logps = logps.per_token(n_c, n_r)
        losses, metrics = self.loss(batch, out, logps)
        extra["lengths/chosen"], extra["lengths/rejected"] = n_c.float(), n_r.float()
        return losses.sum(), row_metrics({**_rename(metrics), **extra})

    def loss(self, batch: PairBatch, out: dict, logps: PairLogps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-row losses [B] and per-row metrics from the pairs' policy (and reference) log-probs.
        ``out``: the forward's other outputs (``chosen_lengths``, ...), ``batch``: the pair batch."""
        raise NotImplementedError


_NAMES = {
    "chosen_rewards": "rewards/chosen",
    "rejected_rewards": "rewards/rejected",
    "margins": "rewards/margins",
    "accuracies": "rewards/accuracies",
    "grad_weights": "grad_weight",
}


def _rename(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_NAMES.get(k, k): v for k, v in metrics.items()}
