"""The online batch source: each rollout samples completions from the current policy, scores them
and hands the loop the same kind of micro-batches an offline dataset would, plus advantages.

Per process and rollout: ``rows = micro_batch_size x grad_accum_steps x minibatches`` completion rows
(after the algorithm's selection, e.g. best-of-n keeps k of m), from ``rows / rows_per_prompt``
prompts. A rollout is replayed for ``epochs`` x ``minibatches`` optimizer steps (PPO's several epochs
over one rollout are this replay, not a second loop). Prompts are taken in a seeded order over the
whole prompt set, every process its own share; sampling is seeded by (seed, rollout, process), and
the buffer of the current rollout is part of the source state, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import random

import torch

from preftune.data.batches import PTX_PREFIX


class RolloutSource:
    def __init__(self, algo, prompts: list[dict], accelerator, *, rows_per_prompt: int, minibatches: int, epochs: int):
        t = algo.run.train
        self.algo = algo
        self.prompts = prompts
        self.accelerator = accelerator
        self.micro, self.accum = t.micro_batch_size, t.grad_accum_steps
        self.rows_per_step = self.micro * self.accum  # per process
        self.minibatches, self.epochs = minibatches, epochs
        rows = self.rows_per_step * minibatches
        if rows % rows_per_prompt:
            raise ValueError(
                f"micro_batch_size x grad_accum_steps x minibatches = {rows} rows per process must be a multiple "
                f"of the {rows_per_prompt} rows each prompt yields"
            )
        self.prompts_per_rank = rows // rows_per_prompt
        self.world, self.rank, self.seed = accelerator.num_processes, accelerator.process_index, t.seed
        per_rollout = self.prompts_per_rank * self.world
        if len(prompts) < per_rollout:
            raise ValueError(f"{len(prompts)} prompts, fewer than the {per_rollout} one rollout needs; lower the batch settings")
        self.rollouts_per_epoch = len(prompts) // per_rollout
        self.steps_per_rollout = minibatches * epochs
        self.steps_per_epoch = self.rollouts_per_epoch * self.steps_per_rollout
        self.rollout_index = 0  # rollouts started so far
        self.buffer: list[dict] | None = None
        self.plan: list[list[int]] = []
        self.position = 0
        self._last: list[int] = []
        self._metrics: dict = {}
        self.companion = None
        """An optional offline source whose micro-batches ride along under 'ptx_' keys (PPO-ptx)."""

    # -- the source interface --------------------------------------------------------------------
    def next_step(self) -> list[dict]:
        if self.buffer is None or self.position >= len(self.plan):
            self._new_rollout()
        self._last = self.plan[self.position]
        rows = [self.buffer[i] for i in self._last]
        self.position += 1
        batches = [self.algo.collate(rows[k : k + self.micro]) for k in range(0, len(rows), self.micro)]
        if self.companion is not None:
            for batch, extra in zip(batches, self.companion.next_step()):
                batch.update({PTX_PREFIX + k: v for k, v in extra.items()})
        return batches

    def last_step_rows(self) -> list[dict]:
        """Rollout rows of the step just drawn (with their micro-batch), and any row of the rollout whose
        reward is not finite (the non-finite guard names it)."""
        rows = [{"micro_batch": k // self.micro, "row": i, **self.buffer[i]} for k, i in enumerate(self._last)]
        taken = set(self._last)
        for i, row in enumerate(self.buffer or []):
            score = row.get("reward_score", 0.0)
            if i not in taken and not math.isfinite(score):
                rows.append({"micro_batch": None, "row": i, **row})
        return rows

    def observe(self, metrics: dict) -> None:
        """Globally reduced metrics of the step just taken: PPO stops replaying a rollout early when
        its approximate KL passes the target (the same decision on every process)."""
        if self.algo.stop_replay(metrics):
            self.position = len(self.plan)

    def epochs_done(self) -> float:
        done = (self.rollout_index - 1) * self.steps_per_rollout + self.position if self.buffer is not None else 0
        return done / self.steps_per_epoch

    def pop_metrics(self) -> dict:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def state_dict(self) -> dict:
        return {
            "rollout_index": self.rollout_index, "buffer": self.buffer, "plan": self.plan,
            "position": self.position, "algorithm": self.algo.online_state_dict(),
            "companion": self.companion.state_dict() if self.companion is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rollout_index, self.buffer = state["rollout_index"], state["buffer"]
        self.plan, self.position = state["plan"], state["position"]
        self.algo.load_online_state_dict(state["algorithm"])
        if self.companion is not None:
            self.companion.load_state_dict(state["companion"])

    # -- rollouts --------------------------------------------------------------------------------
    def _prompt_indices(self, rollout: int) -> list[int]:
        epoch, k = divmod(rollout, self.rollouts_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.prompts), generator=g).tolist()
        start = (k * self.world + self.rank) * self.prompts_per_rank
        return perm[start : start + self.prompts_per_rank]

    def _new_rollout(self) -> None:
        prompts = [self.prompts[i] for i in self._prompt_indices(self.rollout_index)]
        seed = hash((self.seed, self.rollout_index, self.rank)) % (2**31)
        self.buffer, self._metrics = self.algo.make_rollout(prompts, seed=seed, accelerator=self.accelerator, rollout=self.rollout_index)
        rng = random.Random(seed)
        self.plan = []
        for _ in range(self.epochs):
            order = list(range(len(self.buffer)))
            rng.shuffle(order)
            self.plan += [order[m * self.rows_per_step : (m + 1) * self.rows_per_step] for m in range(self.minibatches)]
        self.position = 0
        self.rollout_index += 1


def pad_token_fields(examples: list[dict], batch: dict, keys: tuple[str, ...]) -> dict:
    """Place per-completion-token lists (old log-probs, advantages, ...) at their positions in a
    right-padded [B, T] batch: completion token j of row i sits at len(prompt_ids_i) + j."""
    b, t = batch["input_ids"].shape
    for key in keys:
        out = torch.zeros((b, t), dtype=torch.float32)
        for i, ex in enumerate(examples):
            values = ex[key]
            start = len(ex["prompt_ids"])
            out[i, start : start + len(values)] = torch.tensor(values, dtype=torch.float32)
        batch[key] = out
    return batch
