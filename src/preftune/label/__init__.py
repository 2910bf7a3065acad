"""Collecting preferences: a person ranks sampled completions in a local web page, or a judge (any
reward: VADER, a Python function, a trained reward model) ranks them; either way the labels land in a
file that ``preftune train`` reads directly.

    preftune generate model=runs/sft/model prompts=prompts.jsonl num_samples=4 output=samples.jsonl
    preftune label input=samples.jsonl output=labels.jsonl              # opens http://127.0.0.1:8765
    preftune label input=samples.jsonl output=labels.jsonl judge=vader   # no human: the judge ranks
    preftune train configs/dpo.yaml data.path=labels.jsonl               # rankings -> pairs -> DPO
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from preftune.config import ConfigError, doc

log = logging.getLogger("preftune.label")

__all__ = ["LabelConfig", "run_label"]


@dataclass
class LabelConfig:
    input: str = doc(
        "",
        "Samples to label: rows {prompt, completions: [...]}, or flat rows {prompt, completion} (e.g. `preftune "
        "generate num_samples=K` output; consecutive rows with the same prompt form one item). Any data file type.",
    )
    split: str = doc("train", "Split to read from a datasets directory or hub name.")
    output: str = doc(
        "labels.jsonl",
        "Labels file (JSONL), appended and fsynced label by label; an existing file is resumed, never overwritten. "
        "rank mode writes rankings rows (DPO family, reward models), thumbs mode unpaired rows (KTO).",
    )
    mode: Literal["rank", "thumbs"] = doc(
        "rank", "rank: order the completions of a prompt best first (ties allowed); thumbs: up or down for each."
    )
    judge: Optional[str] = doc(
        None,
        "Label automatically instead of in the browser: 'vader', 'module:function' / 'file.py:function' (texts in, "
        "floats out), or trained reward model(s) (run directory; comma-separated = ensemble). Its scores are kept "
        "in each row. 'llm' / 'llm:MODEL': an LLM asked which of two completions is better, in both orders "
        "(see preftune.collect.judge). null = a person labels in the web UI.",
    )
    guidelines: str = doc("", "judge=llm: a text/Markdown file with the criterion the LLM judge is given.")
    tie_tolerance: float = doc(0.0, "Judge, rank mode: scores within this of their neighbour are tied; an all-tied item is skipped.")
    threshold: float = doc(0.0, "Judge, thumbs mode: thumbs up when the score is above this.")
    annotator: str = doc("", "Name stored with every label (who labelled it; 'judge:SPEC' for a judge by default).")
    shuffle: bool = doc(True, "Show each item's completions in a random (per-item, seeded) order, so position gives nothing away.")
    seed: int = doc(0, "Seed of that order.")
    host: str = doc("127.0.0.1", "Address the web UI listens on: a loopback address only, as it has no login (for a team, "
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
        if self.judge is None and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(f"{path}.host: refusing to listen on {self.host}: this page has no login; keep 127.0.0.1 "
                              "(or use `preftune collect`, which has accounts)")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError(f"{path}.max_items: must be >= 1 or null, got {self.max_items}")


def build_session(cfg: LabelConfig):
    from preftune.label.items import load_items
    from preftune.label.session import LabelSession
    from preftune.label.store import LabelStore

    if Path(cfg.output).resolve() == Path(cfg.input).resolve():
        raise ConfigError("label.output: must differ from label.input (labels are appended to it)")
    items = load_items(cfg.input, split=cfg.split, min_completions=2 if cfg.mode == "rank" else 1)
    annotator = cfg.annotator or (f"judge:{cfg.judge}" if cfg.judge else "")
    return LabelSession(items[: cfg.max_items], LabelStore(cfg.output), mode=cfg.mode, annotator=annotator,
                        shuffle=cfg.shuffle, seed=cfg.seed)


def run_label(cfg: LabelConfig, *, on_ready=None) -> dict:
    """Label ``cfg.input`` into ``cfg.output`` (judge, or the web UI until every item is labelled or
    Ctrl-C); returns ``{"output", "done", "total", ...}``. ``on_ready(url)`` is called once the web
    UI listens."""
    session = build_session(cfg)
    result = {"output": cfg.output}
    if cfg.judge:
        from preftune.collect.judge import label_session, parse_spec
        from preftune.rollout.rewards import resolve_reward

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
    from preftune.label.server import make_server

    progress = session.progress()
    if progress["done"] == progress["total"]:  # still served: the last label can be undone
        log.info("all %d items of %s are already labelled in %s (undo still works; Ctrl-C stops)", progress["total"], cfg.input, cfg.output)
    try:
        server = make_server(session, cfg.host, cfg.port, title=f"preftune label: {Path(cfg.input).name}", exit_when_done=False)
    except OSError as err:
        raise ConfigError(f"label.port: cannot listen on {cfg.host}:{cfg.port} ({err.strerror}); choose another port") from None
    url = f"http://{cfg.host}:{server.server_port}/"
    if on_ready is not None:
        on_ready(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped; every label given so far is in %s", cfg.output)
    finally:
        server.server_close()
    return {**result, **session.progress()}
