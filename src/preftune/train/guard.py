"""The loop's watchman: a step whose loss, gradient norm, rewards or advantages are not finite is
never applied, and a run that has stopped learning says so.

``train.nonfinite: stop`` (default) ends the run at the first bad step with one line naming the step,
the metric and what to try, after writing the step's rows to ``OUTPUT_DIR/nonfinite-step-N.jsonl``;
no checkpoint is written after it, so the last good one survives and ``--resume`` works from it.
``skip`` drops the update (the data of that step is consumed) and stops after
``train.nonfinite_max_skips`` bad steps in a row. The verdict is agreed across processes.

Dead-run warnings (once each, in the log and in metrics.jsonl as ``{"step", "warning"}`` lines): a
gradient norm of exactly 0, a loss stuck at the algorithm's chance level (ln |V| for SFT: the model
predicts the uniform distribution) or rewards equal within every group, for
``train.dead_run_steps`` steps in a row.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import gather_object

from preftune.rollout.health import NONFINITE_METRICS, ZERO_VARIANCE_METRIC
from preftune.train.metrics import json_safe

log = logging.getLogger("preftune.train")


class NonFiniteError(RuntimeError):
    """A training step produced NaN/inf; the run was stopped before the bad update was applied."""


def bad_metrics(sums: dict, grad_norm: float) -> list[str]:
    """Names of the step's non-finite quantities (this process's view of globally reduced values)."""
    bad = [name for name in ("loss",) if not math.isfinite(sums.get(name, 0.0))]
    if not math.isfinite(grad_norm):
        bad.append("grad_norm")
    bad += [name for name in NONFINITE_METRICS if sums.get(name, 0.0) > 0]
    return bad


def agree(flag: bool, accelerator: Any) -> bool:
    """True on every process when any process says True (a collective: all processes call it)."""
    t = torch.tensor(1.0 if flag else 0.0, device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum") > 0)


class StepGuard:
    def __init__(self, t: Any, output_dir: str | Path, *, chance_loss: float | None, log_warning: Callable[[dict], None]):
        self.policy = t.nonfinite
        self.max_skips = t.nonfinite_max_skips
        self.dead_steps = t.dead_run_steps
        self.output_dir = Path(output_dir)
        self.chance_loss = chance_loss
        self.log_warning = log_warning
        self.consecutive_bad = 0
        self.skipped = 0
        self.streaks = {"zero_grad": 0, "chance_loss": 0, "equal_rewards": 0}
        self.warned: set[str] = set()
        self.stop: NonFiniteError | None = None
        self.last_checkpoint: str | None = None
        """Name of the newest checkpoint on disk (the loop keeps it current), for the stop message."""

    def check(self, step: int, sums: dict, grad_norm: float, accelerator: Any, describe_rows: Callable[[], list[dict]]) -> bool:
        """Whether step ``step`` may be applied. Collective. When the run must end, ``self.stop`` is set to
        the NonFiniteError the loop raises once it has logged the step."""
        bad = bad_metrics(sums, grad_norm)
        if not agree(bool(bad), accelerator):
            self.consecutive_bad = 0
            self._watch_dead(step, sums, grad_norm, accelerator.is_main_process)
            return True
        self.consecutive_bad += 1
        self.skipped += 1
        path, rows = self._write_rows(step, bad, sums, grad_norm, describe_rows(), accelerator)
        what = ", ".join(f"{name}={_show(sums, name, grad_norm)}" for name in bad) or "a value on another process"
        what += _first_bad_reward(rows)
        if self.policy == "skip" and self.consecutive_bad < self.max_skips:
            log.warning("step %d: non-finite %s; update skipped (%d in a row, train.nonfinite=skip); rows in %s",
                        step, what, self.consecutive_bad, path)
            return False
        if self.policy == "skip":
            head = f"{self.consecutive_bad} steps in a row (train.nonfinite_max_skips) were non-finite, the last at step {step}: {what}"
        else:
            head = f"step {step}: non-finite {what}; the update was not applied and the run stopped"
        self.stop = NonFiniteError(
            f"{head}. Rows of the step in {path}. Try a lower train.learning_rate, train.max_grad_norm (clipping), "
            f"model.dtype=fp32, or check the data / reward; then --resume continues from the last checkpoint "
            f"({self.last_checkpoint or 'none written yet'}; an earlier update may already have damaged it: "
            "train.resume_from=OLDER_CHECKPOINT)"
        )
        return False

    def _write_rows(self, step: int, bad: list[str], sums: dict, grad_norm: float, rows: list[dict], accelerator: Any) -> tuple[Path, list[dict]]:
        path = self.output_dir / f"nonfinite-step-{step}.jsonl"
        tagged = [{"rank": accelerator.process_index, **row} for row in rows]
        every = gather_object(tagged) if accelerator.num_processes > 1 else tagged
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            head = {"step": step, "nonfinite": bad, "loss": sums.get("loss"), "grad_norm": grad_norm}
            with open(path, "w", encoding="utf-8") as f:
                for row in [head, *every]:
                    f.write(json.dumps(json_safe(row), ensure_ascii=False) + "\n")
        return path, every

    # -- dead runs -------------------------------------------------------------------------------
    def _watch_dead(self, step: int, sums: dict, grad_norm: float, main: bool) -> None:
        loss = sums.get("loss", float("nan"))
        seen = {
            "zero_grad": grad_norm == 0.0,
            # Tight: a freshly initialised random model starts ~1e-4 above ln |V| and must not trip it.
            "chance_loss": self.chance_loss is not None and abs(loss - self.chance_loss) < 1e-5 * max(1.0, self.chance_loss),
            "equal_rewards": sums.get(ZERO_VARIANCE_METRIC, 0.0) >= 1.0,
        }
        if ZERO_VARIANCE_METRIC not in sums:
            del seen["equal_rewards"]  # a replayed rollout: no new rewards this step
        for name, hit in seen.items():
            self.streaks[name] = self.streaks[name] + 1 if hit else 0
            if self.dead_steps and self.streaks[name] >= self.dead_steps and name not in self.warned:
                self.warned.add(name)
                text = self._dead_text(name)
                if main:
                    log.warning("step %d: %s", step, text)
                self.log_warning({"step": step, "warning": text})

    def _dead_text(self, name: str) -> str:
        n = self.dead_steps
        if name == "zero_grad":
            return (f"the gradient norm has been exactly 0 for {n} steps: nothing is learning (frozen weights, a dead "
                    "model after a too-high learning rate, or a loss that does not depend on the parameters)")
        if name == "chance_loss":
            return (f"the loss has been at chance level ({self.chance_loss:.4f} = ln |V|, a uniform prediction) for {n} "
                    "steps: the model has collapsed (often a too-high learning rate); lower train.learning_rate")
        return (f"every group's rewards have been equal for {n} steps: group-relative advantages are all 0, so there "
                "is no learning signal (a constant reward, or too few samples_per_prompt)")


def _show(sums: dict, name: str, grad_norm: float) -> str:
    value = grad_norm if name == "grad_norm" else sums.get(name)
    if name in NONFINITE_METRICS:
        return f"{value:.3g} of the rows"
    return str(value)


def _first_bad_reward(rows: list[dict]) -> str:
    """' (first: reward nan for prompt '...', completion '...')' when a rollout row's reward is not finite."""
    for row in rows:
        score = row.get("reward_score")
        if isinstance(score, float) and not math.isfinite(score):
            return f" (first: reward {score} for prompt {_clip(row.get('prompt'))}, completion {_clip(row.get('completion'))})"
    return ""


def _clip(text: Any, limit: int = 80) -> str:
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def step_rows(batches: list[dict], tokenizer: Any) -> list[dict]:
    """JSON-ready rows of a step, from a source's ``last_step_rows()``: token ids kept and decoded
    (``prompt_ids`` -> ``prompt_text``), scalar fields kept, per-token float lists dropped."""
    out = []
    for row in batches:
        clean = {}
        for key, value in row.items():
            if key.endswith("_ids") and isinstance(value, list):
                clean[key] = value
                clean[key[: -len("_ids")] + "_text"] = tokenizer.decode(value)
            elif isinstance(value, (str, int, float, bool, type(None))) or key in ("prompt", "messages"):
                clean[key] = value
        out.append(clean)
    return out
