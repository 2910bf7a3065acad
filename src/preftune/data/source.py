"""Batch sources for the loop (an offline source walks a tokenized dataset in global batches), and
the seeded held-out split of a dataset.

The interface every source has (the online rollout source too): ``steps_per_epoch``,
``next_step() -> list of this process's collated micro-batches``, ``epochs_done()``,
``pop_metrics() -> {name: (sum, count)}``, ``observe(step metrics)``, ``last_step_rows()`` (the rows of
the step just drawn, for the non-finite guard's report), ``state_dict()`` / ``load_state_dict()`` (saved per process).

Every process sees the same seeded permutation of the data; global step ``s`` of an epoch takes rows
``perm[s*G:(s+1)*G]`` (G = global batch), sorted by length when ``group_by_length`` is on, and
process ``r`` takes its contiguous share of ``micro_batch_size * grad_accum_steps`` rows of it. The
global batch is therefore the same set of rows however it is split across micro-batches and
processes, which is what makes 1x8 accumulation equal 8x1 and 2 processes equal 1.

A source's position is two integers (epoch, step in epoch), saved in every checkpoint.
"""

from __future__ import annotations

import random
from typing import Callable

import torch


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded (train, eval) split; the same rows go to eval on every process and every resume."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(fraction * len(examples))))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


class OfflineSource:
    def __init__(
        self,
        examples: list[dict],
        collate: Callable[[list[dict]], dict],
        *,
        micro_batch_size: int,
        grad_accum_steps: int,
        world_size: int,
        rank: int,
        seed: int,
        length_of: Callable[[dict], int] | None = None,
    ):
        self.examples = examples
        self.collate = collate
        self.micro = micro_batch_size
        self.accum = grad_accum_steps
        self.world = world_size
        self.rank = rank
        self.seed = seed
        self.length_of = length_of
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = len(examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(examples)} rows, fewer than one global batch of {self.global_batch} "
                f"(micro_batch_size {micro_batch_size} x grad_accum_steps {grad_accum_steps} x world_size "
                f"{world_size}); lower the batch settings or add data"
            )
        self.epoch = 0
        self.step_in_epoch = 0
        self._perm: list[int] | None = None
        self._last: list[int] = []

    def _permutation(self) -> list[int]:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self.examples), generator=g).tolist()
        return self._perm

    def global_indices(self) -> list[int]:
        """Row indices of the current global batch, in micro-batch order."""
        start = self.step_in_epoch * self.global_batch
        idx = self._permutation()[start : start + self.global_batch]
        if self.length_of is not None:
            idx = sorted(idx, key=lambda i: (self.length_of(self.examples[i]), i))
        return idx

    def next_step(self) -> list[dict]:
        """The micro-batches (collated) of this process for the next optimizer step."""
        idx = self.global_indices()
        per_rank = self.micro * self.accum
        if self.length_of is not None:
            # Interleave ranks over length-sorted rows so every process gets a similar token load.
            mine = [idx[j] for j in range(len(idx)) if (j // self.micro) % self.world == self.rank]
        else:
            mine = idx[self.rank * per_rank : (self.rank + 1) * per_rank]
        batches = [self.collate([self.examples[i] for i in mine[k : k + self.micro]]) for k in range(0, per_rank, self.micro)]
        self._last = mine
        self._advance()
        return batches

    def last_step_rows(self) -> list[dict]:
        """This process's examples of the step just drawn, with their micro-batch and dataset index."""
        return [{"micro_batch": k // self.micro, "row": i, **self.examples[i]} for k, i in enumerate(self._last)]

    def _advance(self) -> None:
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self._perm = None

    def epochs_done(self) -> float:
        return self.epoch + self.step_in_epoch / self.steps_per_epoch

    def observe(self, metrics: dict) -> None:
        """The step's globally reduced metrics (an online source may act on them)."""

    def pop_metrics(self) -> dict:
        """Metrics of the source itself (name -> (sum, count)); an offline source has none."""
        return {}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self._perm = None
