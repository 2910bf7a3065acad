"""One overall progress line for a study, above the per-stage bars:

    study: stage 3 of 9 · train dpo-beta0.2 · elapsed 04:12 · ETA ~08:30

Each stage comes with an estimate of its cost (seconds on the machine the estimates were measured
on); the ETA is the estimated cost of what is left, scaled by how fast the finished stages ran
against their estimates (:func:`eta_seconds`). Stages finished in an earlier, resumed run count as
done and do not enter the speed.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

__all__ = ["StudyProgress", "eta_seconds", "format_duration"]


def eta_seconds(estimates: Sequence[float], actual: Sequence[float | None], current: int, current_elapsed: float) -> float:
    """Seconds left: the estimates of stage ``current`` (less what it has run) and of every later
    stage, × (time the finished stages took / their estimates); ``actual[i]`` is None for stages
    that did not run here (done earlier). With nothing measured yet the speed factor is 1."""
    ran = [(e, a) for e, a in zip(estimates[:current], actual[:current]) if a is not None and e > 0]
    speed = sum(a for _, a in ran) / sum(e for e, _ in ran) if ran else 1.0
    left = 0.0
    if current < len(estimates):
        left = max(estimates[current] * speed - current_elapsed, 0.0) + sum(estimates[current + 1 :]) * speed
    return left


def format_duration(seconds: float) -> str:
    seconds = round(max(seconds, 0.0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class StudyProgress:
    """The overall line of a study: ``begin(name)`` / ``end()`` around each stage (in the planned
    order; ``stages`` gives their count and estimated seconds), ``skip(name)`` for a stage already done. A tqdm bar at position 0, so the stages' own
    bars (opened while it is) appear below it; on a terminal it refreshes every second."""

    def __init__(self, stages: Sequence[tuple[str, float]], *, enabled: bool = True, label: str = "overall"):
        self.names = [n for n, _ in stages]
        self.estimates = [max(float(e), 0.0) for _, e in stages]
        self.actual: list[float | None] = [None] * len(stages)
        self.label = label
        self.current = 0
        self._t0 = self._stage_t0 = time.perf_counter()
        self._bar = None
        self._stop = threading.Event()
        if enabled:
            self._bar = tqdm(total=len(stages), position=0, bar_format="{desc}", leave=True, file=sys.stderr)
            self._refresh()
            if sys.stderr.isatty():
                threading.Thread(target=self._tick, daemon=True).start()

    def line(self) -> str:
        n = len(self.names)
        if self.current >= n:
            return f"{self.label}: all {n} stages done · elapsed {format_duration(time.perf_counter() - self._t0)}"
        now = time.perf_counter()
        eta = eta_seconds(self.estimates, self.actual, self.current, now - self._stage_t0)
        return (f"{self.label}: stage {self.current + 1} of {n} · {self.names[self.current]} · elapsed "
                f"{format_duration(now - self._t0)} · ETA ~{format_duration(eta)}")

    def begin(self, name: str) -> None:
        """The next stage starts; ``name`` is what the line shows (stages are counted in order)."""
        if self.current < len(self.names):
            self.names[self.current] = name
        else:  # more stages than planned: the count grows
            self.names.append(name)
            self.estimates.append(0.0)
            self.actual.append(None)
        self._stage_t0 = time.perf_counter()
        self._refresh()

    def end(self) -> None:
        """The current stage is done."""
        if self.current < len(self.names):
            self.actual[self.current] = time.perf_counter() - self._stage_t0
        self._next()

    def skip(self, name: str) -> None:
        """The next stage was done in an earlier run: it counts as done, its time does not enter the ETA."""
        self.begin(name)
        self._next()

    def _next(self) -> None:
        self.current += 1
        self._stage_t0 = time.perf_counter()
        self._refresh()

    def close(self) -> None:
        self._stop.set()
        if self._bar is not None:
            self.current = len(self.names)
            self._refresh()
            self._bar.close()
            self._bar = None

    def _refresh(self) -> None:
        bar = self._bar  # read once: close() may clear it while the ticking thread refreshes
        if bar is not None:
            bar.set_description_str(self.line(), refresh=True)

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._refresh()
