"""What ``preftune label`` does, as library functions: its settings (:class:`LabelConfig`), a judge
labelling a samples file (:func:`judge`), or one person in the collection web app on this machine
(:func:`serve`, over the one-annotator project of :mod:`preftune.collect.local`). The command
(``preftune.commands.label``) and pipelines (``preftune.pipeline``) both call :func:`label`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from preftune.collect import app
from preftune.collect.judge import label_session, parse_spec
from preftune.collect.local import LocalLabels
from preftune.collect.settings import LOOPBACK
from preftune.config import ConfigError, doc, shared
from preftune.label.items import load_items
from preftune.label.session import LabelSession
from preftune.label.store import LabelStore
from preftune.rewards.spec import resolve_reward

log = logging.getLogger("preftune.label")


@dataclass
class LabelConfig:
    input: str = doc(
        "",
        "Samples to label: rows {prompt, completions: [...]}, or flat rows {prompt, completion} (e.g. `preftune "
        "generate num_samples=K` output; consecutive rows with the same prompt form one item). Any data file type.",
    )
    split: str = shared("split")
    output: str = doc(
        "labels.jsonl",
        "Labels file (JSONL), written as each label is given; an existing file is resumed, never lost. rank mode writes "
        "rankings rows (DPO family, reward models; a tie of all completions is a ranking of one group), thumbs mode "
        "unpaired rows (KTO); skipped items go to OUTPUT.skipped.jsonl.",
    )
    mode: Literal["rank", "thumbs"] = shared("mode")
    project: str = doc("", "Web UI: the collection project (SQLite) that holds the labels; '' = OUTPUT.collect next to the "
                           "labels file. `preftune collect status` and `export` work on it.")
    judge: Optional[str] = doc(
        None,
        "Label automatically instead of in the browser: 'vader', 'module:function' / 'file.py:function' (texts in, "
        "floats out), or trained reward model(s) (run directory; comma-separated = ensemble). Its scores are kept "
        "in each row. 'llm' / 'llm:MODEL': an LLM asked which of two completions is better, in both orders "
        "(see preftune.collect.judge). null = a person labels in the web UI.",
    )
    guidelines: str = shared("guidelines", note="Web UI and judge=llm.")
    tie_tolerance: float = shared("tie_tolerance")
    threshold: float = shared("threshold")
    annotator: str = doc("", "Name stored with every label (who labelled it; '' = 'local' in the web UI, 'judge:SPEC' for a judge).")
    shuffle: bool = doc(True, "Web UI: show each item's completions in a random (per-item, seeded) order, so position gives nothing away.")
    seed: int = doc(0, "Seed of that order.")
    host: str = doc("127.0.0.1", "Address the web UI listens on: a loopback address only, as it is for one person (for a team, "
                                 "with accounts: `preftune collect`).")
    port: int = doc(8765, "Port of the web UI (0 = any free port).")
    max_items: Optional[int] = doc(None, "Label only the first N items of the input. null = all.")

    def validate(self, path: str) -> None:
        if not self.input:
            raise ConfigError(f"{path}.input: required (a samples file, e.g. from `preftune generate num_samples=4`)")
        if not self.output:
            raise ConfigError(f"{path}.output: required")
        if self.tie_tolerance < 0:
            raise ConfigError(f"{path}.tie_tolerance: must be >= 0, got {self.tie_tolerance}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{path}.port: must be between 0 and 65535, got {self.port}")
        if self.judge is None and self.host not in LOOPBACK:
            raise ConfigError(f"{path}.host: refusing to listen on {self.host}: this page is for one person on this machine; "
                              "keep 127.0.0.1 (or use `preftune collect`, which has accounts)")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError(f"{path}.max_items: must be >= 1 or null, got {self.max_items}")


def label(cfg: LabelConfig, *, on_ready=None) -> dict:
    """Label ``cfg.input`` into ``cfg.output`` (judge, or the web UI until Ctrl-C); returns
    ``{"output", "done", "total", ...}``. ``on_ready(url)``: the web UI listens at ``url`` (a login link)."""
    if Path(cfg.output).resolve() == Path(cfg.input).resolve():
        raise ConfigError("label.output: must differ from label.input (labels are written to it)")
    if cfg.judge:
        return judge(cfg)
    return serve(cfg, on_ready=on_ready)


def build_session(cfg: LabelConfig):
    """The judge's LabelSession: the input's items and the labels file."""

    items = load_items(cfg.input, split=cfg.split, min_completions=2 if cfg.mode == "rank" else 1)
    annotator = cfg.annotator or f"judge:{cfg.judge}"
    return LabelSession(items[: cfg.max_items], LabelStore(cfg.output), mode=cfg.mode, annotator=annotator,
                        shuffle=cfg.shuffle, seed=cfg.seed)


def judge(cfg: LabelConfig) -> dict:
    session = build_session(cfg)
    result = {"output": cfg.output}
    if parse_spec(cfg.judge) is not None:
        guide = Path(cfg.guidelines).read_text(encoding="utf-8") if cfg.guidelines else ""
        result.update(label_session(session, parse_spec(cfg.judge), guide))
        return {**result, **session.progress()}
    try:
        reward = resolve_reward(cfg.judge)
    except ValueError as err:
        raise ConfigError(f"label.judge: {err}") from None
    result.update(session.judge(reward, tie_tolerance=cfg.tie_tolerance, threshold=cfg.threshold))
    return {**result, **session.progress()}


def serve(cfg: LabelConfig, *, on_ready=None) -> dict:
    """The web UI: a one-annotator collection project, served on ``cfg.host`` with a printed login link."""

    local = LocalLabels(cfg.input, cfg.output, project=cfg.project, mode=cfg.mode, split=cfg.split, max_items=cfg.max_items,
                        guidelines=cfg.guidelines, annotator=cfg.annotator)
    try:
        if local.imported:
            log.info("imported %d labels from %s into %s", local.imported, cfg.output, local.project)
        progress = local.progress()
        if progress["done"] == progress["total"]:  # still served: the last label can be undone
            log.info("all %d items of %s are already labelled in %s (undo still works; Ctrl-C stops)", progress["total"], cfg.input, cfg.output)

        def ready(port: int) -> None:
            if on_ready is not None:
                host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
                on_ready(f"http://{host}:{port}/login?token={local.token}")

        app.serve(local.store, cfg.host, cfg.port, on_ready=ready, on_change=local.write, title=f"preftune label: {Path(cfg.input).name}",
                  shuffle=cfg.shuffle, seed=cfg.seed)
        local.write()
        log.info("stopped; every label given so far is in %s", cfg.output)
        return {"output": cfg.output, **local.progress()}
    finally:
        local.close()
