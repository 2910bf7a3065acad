"""The one interface every reward source implements: texts in, floats out.

A reward source is any callable ``source(prompts, completions) -> Sequence[float]`` (one score per
(prompt, completion) row, higher = better). Prompts and completions are preftune's record values:
text, or lists of ``{"role", "content"}`` messages. Trained reward models (``RewardModel``), Python
functions (``FunctionReward``) and, later, LLM judges all fit, so RL, best-of-n and evaluation code
never ask which kind they were given.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RewardSource(Protocol):
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any]) -> Sequence[float]:
        """Score each (prompt, completion) row; returns one float per row."""
        ...


class FunctionReward:
    """A Python function as a reward source, e.g. a gold scorer: ``FunctionReward("my_pkg.scorers:sentiment")``.

    ``spec`` is ``"module:function"`` (an importable module), ``"path/to/file.py:function"``, or a
    callable. The function is called TRL-style, ``fn(prompts=[...], completions=[...])``, and must
    return one real number per row; so ``def fn(prompts, completions)`` and TRL reward functions
    ``def fn(completions, **kwargs)`` both work.
    """

    def __init__(self, spec: str | Callable[..., Sequence[float]], *, allow_nonfinite: bool = False):
        """``allow_nonfinite``: pass NaN/inf scores through instead of raising (the training loop's
        non-finite guard then stops or skips the step, naming the prompt and completion)."""
        self.name = spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
        self.allow_nonfinite = allow_nonfinite
        self.fn = resolve_function(spec) if isinstance(spec, str) else spec
        if not callable(self.fn):
            raise ValueError(f"reward function {self.name!r} is not callable")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        out = self.fn(prompts=prompts, completions=completions)
        try:
            values = list(out)
        except TypeError:
            raise ValueError(f"reward function {self.name!r} returned {type(out).__name__}, expected a list of numbers") from None
        if len(values) != len(prompts):
            raise ValueError(f"reward function {self.name!r} returned {len(values)} scores for {len(prompts)} rows")
        scores = []
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
                raise ValueError(f"reward function {self.name!r}, row {i}: expected a number, got {type(v).__name__} {v!r}")
            f = float(v)
            if not math.isfinite(f) and not self.allow_nonfinite:
                raise ValueError(f"reward function {self.name!r}, row {i}: score is {f}")
            scores.append(f)
        return scores

    def __repr__(self) -> str:
        return f"FunctionReward({self.name!r})"


def resolve_function(spec: str) -> Callable:
    """``"module:function"`` or ``"file.py:function"`` -> the function (a clear ValueError otherwise)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: file {str(path)!r} does not exist")
        mod_id = f"preftune_reward_fn_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_id, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_id] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}")
    return fn
