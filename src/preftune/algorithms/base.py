"""The algorithm contract: how one batch becomes (loss, metrics), and what the algorithm needs.

An algorithm is an ``nn.Module`` that owns the policy (and any heads or reference it needs), so
that the loop can hand the whole thing to Accelerate (DDP/FSDP see every trainable parameter and
every forward goes through the wrapper). The loop never branches on an algorithm's name: whatever
differs between algorithms is declared in ``needs`` or implemented in one of the methods below.

Loss normalisation (see the batch glossary in the README): ``forward`` returns the *sum* of the
per-unit losses of its micro-batch, where a unit is a token or a row (``needs.loss_unit``). The loop
divides by the number of units in the whole global batch (all micro-batches, all processes), so
``micro_batch_size x grad_accum_steps x world_size`` can be split any way without changing results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from preftune.config import ConfigError
from preftune.data.collate import collate_completions, collate_pairs
from preftune.data.loaders import load_records
from preftune.data.source import OfflineSource
from preftune.data.tokenize import tokenize_pairs, tokenize_sft
from preftune.models import loading  # loading.load_model: looked up at call time, so tests can stand in for it
from preftune.models.loading import save_model

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""metric name -> (sum over the micro-batch, count). The loop reports sum / count over the global batch."""


@dataclass(frozen=True)
class Needs:
    data_kind: Literal["sft", "pairs", "rankings", "unpaired", "prompts"]
    """Record kind the algorithm trains on (see preftune.data.records)."""
    loss_unit: Literal["token", "row"]
    """What the loss is averaged over across the global batch."""
    reference_model: bool = False
    """Whether a frozen reference policy is needed (LoRA runs use the adapter-disabled base)."""
    length_averaged: bool = False
    """Whether the loss uses per-token averages of log-probs instead of sums (IPO, SimPO, ORPO)."""


class Algorithm(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type]
    needs: ClassVar[Needs]
    export_unsupported: ClassVar[str] = ""
    """Why a checkpoint of this algorithm cannot become a model folder (``preftune export``); "" = it can."""
    online: ClassVar[bool] = False
    """Whether the batches are rollouts of the current policy (an online source) rather than a dataset;
    read by the study and the tests instead of a hand-kept list."""

    def __init__(self, config: Any, policy: nn.Module, tokenizer: Any, run: Any):
        super().__init__()
        self.config = config
        self.policy = policy
        self.tokenizer = tokenizer
        self.run = run

    # -- model ----------------------------------------------------------------------------------
    @classmethod
    def load_policy(cls, config: Any, run: Any) -> tuple[nn.Module, Any]:
        """Load the trained model and its tokenizer, before LoRA is applied (a causal LM by default;
        a reward model loads a one-label sequence classifier)."""
        return loading.load_model(run.model.name, dtype=run.model.dtype, seed=run.train.seed)

    @classmethod
    def member_runs(cls, run: Any) -> list:
        """The independent runs one config asks for, each trained by the loop in turn (e.g. the
        members of a reward-model ensemble; see preftune/train/ensemble.py). Default: the run itself."""
        return [run]

    @classmethod
    def is_trained(cls, output_dir: Path) -> bool:
        """Whether a member run in ``output_dir`` has saved its final model (skipped on resume)."""
        return (output_dir / "model").is_dir()

    # -- data -----------------------------------------------------------------------------------
    @classmethod
    def load_records(cls, config: Any, source: str, split: str) -> list:
        """Read and validate the training records (of kind ``needs.data_kind``), before any model loads."""
        return load_records(source, cls.needs.data_kind, split=split)

    def prepare_examples(self, examples: list[dict], accelerator: Any) -> list[dict]:
        """Work over the whole tokenized dataset before training (e.g. precomputing reference
        log-probs). Called once on every process, after the model is on its device."""
        return examples

    def make_source(self, examples: list[dict], accelerator: Any):
        """The batch source the loop draws optimizer steps from (offline: the tokenized dataset)."""
        return self.offline_source(examples, self.collate, accelerator, source=self.run.data.path, rows="training rows",
                                   seed=self.run.train.seed,
                                   length_of=self.example_length if self.run.data.group_by_length else None)

    def offline_source(self, examples: list[dict], collate, accelerator: Any, *, source: str, rows: str, seed: int,
                       length_of=None) -> OfflineSource:
        """An OfflineSource of ``examples`` batched by the run's settings; fewer rows than one global batch
        is a ConfigError naming ``source`` (the file) and the settings."""
        t = self.run.train
        batch = t.micro_batch_size * t.grad_accum_steps * accelerator.num_processes
        if len(examples) < batch:
            raise ConfigError(
                f"{source}: {len(examples)} {rows} for {self.run.output_dir}, fewer than one global batch of "
                f"{batch} (train.micro_batch_size {t.micro_batch_size} x train.grad_accum_steps {t.grad_accum_steps} x "
                f"{accelerator.num_processes} processes); lower train.micro_batch_size or add data")
        return OfflineSource(examples, collate, micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
                             world_size=accelerator.num_processes, rank=accelerator.process_index, seed=seed, length_of=length_of)

    def tokenize(self, records: list, source: str) -> tuple[list[dict], Any]:
        """Records -> tokenized examples (+ a truncation report)."""
        d = self.run.data
        kwargs = dict(
            max_length=d.max_length,
            max_prompt_length=d.max_prompt_length,
            truncation=d.truncation,
            text_as_chat=d.text_as_chat,
            source=source,
            groups=self.group_index(records, source),
        )
        if self.needs.data_kind == "pairs":
            return tokenize_pairs(records, self.tokenizer, **kwargs)
        return tokenize_sft(records, self.tokenizer, **kwargs)

    def group_index(self, records: list, source: str) -> dict[str, int] | None:
        """Group name -> index for algorithms that read each row's annotator group (``"group"`` in the
        batch, see preftune.data.groups); None (the default) leaves groups out of the batch."""
        return None

    def example_length(self, example: dict) -> int:
        """Tokens an example occupies in a batch (used to group rows of similar length)."""
        n = len(example["prompt_ids"])
        if "chosen_ids" in example:
            return n + max(len(example["chosen_ids"]), len(example["rejected_ids"]))
        return n + len(example["completion_ids"])

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        if self.needs.data_kind == "pairs":
            return collate_pairs(examples, pad)
        return collate_completions(examples, pad)

    # -- loss -----------------------------------------------------------------------------------
    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens a micro-batch holds (the throughput the loop logs): real tokens of the attention mask."""
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel())

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        """Units (tokens or rows) in a micro-batch that its summed loss covers."""
        if self.needs.loss_unit == "token":
            return int(batch["completion_mask"].sum())
        n = batch["input_ids"].shape[0] if "seq_lengths" not in batch else batch["seq_lengths"].numel()
        return n // 2 if self.needs.data_kind == "pairs" else n

    def extra_state(self) -> dict:
        """What the algorithm carries from step to step besides trainable weights (saved in every
        checkpoint, per process, so that a resumed run continues exactly). Default: nothing."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` returned."""

    @classmethod
    def first_loss(cls, config: Any) -> float | None:
        """The loss at the first step in closed form, when the algorithm has one that depends on its
        settings alone (e.g. ln 2 for DPO, whose policy starts equal to its reference); tests read it."""
        return None

    def chance_loss(self) -> float | None:
        """The loss of a model that has learnt nothing at all (a uniform prediction), if the algorithm
        has one; a run whose loss sits there for train.dead_run_steps steps gets a warning."""
        return None

    def before_step(self, micro_batches: list[dict], accelerator: Any) -> None:
        """Called with all of this process's micro-batches of a step before any forward: the place
        for statistics over the whole global batch (e.g. KTO's KL reference point). Collective."""

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        """Return (sum of per-unit losses over this micro-batch, metrics)."""
        raise NotImplementedError

    # -- output ---------------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        """Save the trained model so transformers (or peft, for adapters) loads it directly."""
        save_model(self.policy, self.tokenizer, out_dir, merge=self.run.model.lora.merge_on_save)
