"""A collection project: its settings, creating it from a samples file, invitations, status.

A project is a folder: ``collect.db`` (SQLite) in it, or a ``postgresql://`` database named in its
``collect.json``. Every command takes the folder; the settings below are key=value arguments.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from preftune.collect import agreement as agr
from preftune.collect.settings import CollectConfig
from preftune.collect.store import Store, StoreError, db_url, hash_token
from preftune.config import ConfigError
from preftune.data.loaders import read_rows
from preftune.data.validate import Where, check_ranking
from preftune.label.items import load_items


def open_store(project: str | Path, cfg: CollectConfig, *, must_exist: bool = True) -> Store:
    url = db_url(project, cfg.db)
    if must_exist and url.startswith("sqlite") and not (Path(project) / "collect.db").is_file():
        raise ConfigError(f"{project}: not a collection project (no collect.db); make one with `preftune collect create {project} SAMPLES`")
    try:
        store = Store(url)
    except StoreError as err:
        raise ConfigError(f"collect.db: {err}") from None
    if must_exist and not store.get_meta().get("mode"):
        raise ConfigError(f"{project}: the database has no project; make one with `preftune collect create`")
    return store


def _gold(source: str, split: str, items) -> dict[str, list]:
    wanted = {it.rows[0]: it for it in items}
    gold = {}
    for row_no, row in read_rows(source, split):
        if row_no in wanted and isinstance(row, dict) and row.get("gold") is not None:
            it = wanted[row_no]
            gold[it.key] = check_ranking(row["gold"], len(it.completions), Where(source, row_no), "gold")
    return gold


def create(project: str | Path, cfg: CollectConfig) -> dict:
    """Make (or extend with new items) the project in ``project`` from ``cfg.samples``."""

    if not cfg.samples:
        raise ConfigError("collect.samples: required (a samples file, e.g. from `preftune generate num_samples=4`)")
    items = load_items(cfg.samples, split=cfg.split, min_completions=2 if cfg.mode == "rank" else 1)[: cfg.max_items]
    gold = _gold(cfg.samples, cfg.split, items)
    guidelines = ""
    if cfg.guidelines:
        try:
            guidelines = Path(cfg.guidelines).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"collect.guidelines: cannot read {cfg.guidelines} ({err})") from None
    Path(project).mkdir(parents=True, exist_ok=True)
    if cfg.db:
        (Path(project) / "collect.json").write_text(json.dumps({"db": cfg.db}), encoding="utf-8")
    store = open_store(project, cfg, must_exist=False)
    old = store.get_meta()
    if old.get("mode") and old["mode"] != cfg.mode:
        raise ConfigError(f"collect.mode: the project in {project} collects {old['mode']}, not {cfg.mode}")
    admin = secrets.token_urlsafe(24) if not old.get("admin_hash") else None

    meta = {"mode": cfg.mode, "overlap": cfg.overlap, "guidelines": guidelines or old.get("guidelines", ""),
            "csrf_secret": old.get("csrf_secret") or secrets.token_hex(32)}
    if admin:
        meta["admin_hash"] = hash_token(admin)
    store.set_meta(**meta)
    added = store.add_items([{"id": it.key, "prompt": it.prompt, "completions": it.completions, "gold": gold.get(it.key)}
                             for it in items])
    total = len(store.items())
    store.close()
    return {"added": added, "total": total, "gold": len(gold), "admin_token": admin}


def login_url(cfg: CollectConfig, token: str, path: str = "/login") -> str:
    base = cfg.base_url.rstrip("/") if cfg.base_url else f"http://{cfg.host}:{cfg.port}"
    return f"{base}{path}?token={token}"


def labels_by_item(store: Store) -> dict[str, dict[str, list]]:
    """item -> annotator name -> the ranking that counts (thumbs: ups tied above downs; both bad: a tie)."""
    names = store.annotators()
    items = store.items()
    out: dict[str, dict[str, list]] = {}
    for r in store.current():
        ranking = as_ranking(r, items[r["item_id"]]["k"])
        if ranking is not None:
            out.setdefault(r["item_id"], {})[names[r["annotator_id"]]] = ranking
    return out


def as_ranking(row: dict, k: int) -> list | None:
    if row["kind"] == "rank":
        return row["answer"]
    if row["kind"] == "both_bad":
        return [list(range(k))]
    if row["kind"] == "thumbs":
        up = [i for i, v in enumerate(row["answer"]) if v]
        down = [i for i, v in enumerate(row["answer"]) if not v]
        return [g for g in (up, down) if g]
    return None


def gold_accuracy(store: Store) -> dict[str, float | None]:
    """annotator -> share of their pairwise judgements on gold items equal to the gold ranking."""
    items = store.items()
    names = store.annotators()
    agree: dict[str, int] = {}
    total: dict[str, int] = {}
    for r in store.current():
        gold = items[r["item_id"]]["gold"]
        ranking = as_ranking(r, items[r["item_id"]]["k"])
        if gold is None or ranking is None:
            continue
        who = names[r["annotator_id"]]
        truth = agr.pair_signs(gold)
        for pair, s in agr.pair_signs(ranking).items():
            total[who] = total.get(who, 0) + 1
            agree[who] = agree.get(who, 0) + (s == truth[pair])
    return {a: agree[a] / total[a] for a in total}


def status(store: Store) -> dict:
    """Progress, per-annotator counts and agreement (``collect status`` and the admin page)."""
    meta = store.get_meta()
    items = store.items()
    names = store.annotators()
    current = store.current()
    answers: dict[str, int] = {}
    per_annotator = {n: {"answered": 0, "skipped": 0} for n in names.values()}
    for r in current:
        key = "skipped" if r["kind"] == "skip" else "answered"
        per_annotator[names[r["annotator_id"]]][key] += 1
        if key == "answered":
            answers[r["item_id"]] = answers.get(r["item_id"], 0) + 1
    labels = labels_by_item(store)
    summary = agr.summary(labels)
    disagreed = sorted(summary.pop("per_item").items(), key=lambda kv: kv[1])[:10]
    return {
        "mode": meta.get("mode"), "overlap": meta.get("overlap"), "items": len(items),
        "items_complete": sum(answers.get(i, 0) >= meta.get("overlap", 1) for i in items),
        "answers": sum(answers.values()), "label_rows": store.count_rows(), "annotators": per_annotator,
        "agreement": summary, "gold_accuracy": gold_accuracy(store),
        "most_disagreed": [{"item": i, "agreement": a, "prompt": _short(items[i]["prompt"])} for i, a in disagreed if a < 1],
    }


def _short(prompt) -> str:
    text = prompt if isinstance(prompt, str) else " / ".join(m.get("content", "") for m in prompt)
    return text[:80] + ("..." if len(text) > 80 else "")


def format_status(s: dict) -> str:
    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    a = s["agreement"]
    lines = [f"{s['items']} items ({s['mode']}, overlap {s['overlap']}): {s['items_complete']} complete, {s['answers']} answers",
             "annotators:"]
    for name, c in s["annotators"].items():
        vs = a["annotator_vs_others"].get(name)
        gold = s["gold_accuracy"].get(name)
        lines.append(f"  {name}: {c['answered']} answered, {c['skipped']} skipped, agreement with the others {num(vs)}"
                     + (f", gold accuracy {num(gold)}" if gold is not None else ""))
    lines.append(f"agreement: pairwise {num(a['pairwise_agreement'])}, Fleiss' kappa {num(a['fleiss_kappa'])}, "
                 f"Krippendorff's alpha (ordinal) {num(a['krippendorff_alpha_ordinal'])}")
    for d in s["most_disagreed"][:5]:
        lines.append(f"  most disagreed: {d['item']} ({num(d['agreement'])}) {d['prompt']}")
    return "\n".join(lines)
