"""A run config resolved: ``RunConfig`` with its algorithm's section (``run.algo``) attached.

It reads the algorithm table, so it sits above the algorithms (which import ``preftune.config``).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from preftune.algorithms import ALGORITHMS
from preftune.config import (
    ConfigError,
    RunConfig,
    _public_fields,
    apply_overrides,
    describe,
    from_dict,
    read_yaml,
    run_config_to_dict,
    unknown_key_error,
)

__all__ = ["load_run_config", "run_config_to_dict"]


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config (file and/or overrides) into a validated RunConfig with `algo` attached."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    name = data.get("algorithm", RunConfig.algorithm)
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm: unknown '{name}'. Valid: {', '.join(ALGORITHMS)}")
    algo_cls = ALGORITHMS[name]
    section = data.pop(name, None) or {}
    for other in ALGORITHMS:
        if other != name and other in data:
            hint = ""
            if other in {f.name for f in _public_fields(algo_cls.Config)}:
                hint = f"; '{other}' is a setting of '{name}': write it as {name}.{other} (a '{name}:' section)"
            raise ConfigError(f"section '{other}' given but algorithm is '{name}'{hint}")
    try:
        run = from_dict(RunConfig, data)
    except ConfigError as exc:
        if str(exc).startswith("unknown key '") and "." not in str(exc).split("'")[1]:
            valid = [f.name for f in _public_fields(RunConfig)] + [name]
            key = str(exc).split("'")[1]
            raise _top_level_key_error(key, valid, algo_cls.Config, name) from None
        raise
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a mapping of the algorithm's settings")
    run.algo = from_dict(algo_cls.Config, section, name)
    return run


def _top_level_key_error(key: str, valid: list[str], algo_config: type, name: str) -> ConfigError:
    """An unknown top-level key: suggest a close top-level key, else a close nested one
    ('learnin_rate' -> 'train.learning_rate')."""
    if difflib.get_close_matches(key, valid, n=1):
        return unknown_key_error("", key, valid)
    nested = [k for k, *_ in describe(RunConfig)] + [f"{name}.{k}" for k, *_ in describe(algo_config)]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(nested)}
    hint = "".join(f" Did you mean '{leaves[c]}'?" for c in difflib.get_close_matches(key, list(leaves), n=1))
    return ConfigError(f"unknown key '{key}'.{hint} Valid keys: {', '.join(valid)}")
