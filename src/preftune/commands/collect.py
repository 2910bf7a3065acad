"""``preftune collect ACTION PROJECT [args] [key=value ...]``: the team labelling workflow.

    preftune collect create runs/collect samples.jsonl guidelines=guide.md overlap=3 mode=rank
    preftune collect invite runs/collect alice bob carol      # one login link per annotator
    preftune collect serve runs/collect host=0.0.0.0 port=8765
    preftune collect status runs/collect                      # progress, per-annotator counts, agreement
    preftune collect export runs/collect output=labels.jsonl consensus=borda format=pairs
    preftune collect judge runs/collect judge=llm:smollm2-135m-instruct   # an LLM answers every item too
"""

from __future__ import annotations

import argparse

from preftune.collect.project import (
    create,
    format_status,
    login_url,
    open_store,
    status,
)
from preftune.collect.settings import ACTIONS, CollectConfig
from preftune.collect.store import StoreError
from preftune.commands.base import field_help
from preftune.config import ConfigError, apply_overrides, from_dict


def register(sub) -> None:
    k = sub.add_parser("collect", help="Preference collection for a team: a project, invite links, the web app, status, export.",
                       epilog=field_help(CollectConfig, "Settings (key=value):"), formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("action", choices=ACTIONS)
    k.add_argument("project", help="The project folder (holds collect.db, or collect.json naming a PostgreSQL database).")
    k.add_argument("rest", nargs="*", help="create: the samples file; invite: annotator names; then key=value settings")
    k.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    action, project, rest = args.action, args.project, list(args.rest)
    words = [r for r in rest if "=" not in r]
    cfg = from_dict(CollectConfig, apply_overrides({}, [r for r in rest if "=" in r]), "collect")
    if action == "create":
        if words:
            cfg.samples = words[0]
        info = create(project, cfg)
        print(f"{project}: {info['added']} new items ({info['total']} in all, {info['gold']} gold), mode {cfg.mode}, overlap {cfg.overlap}")
        if info["admin_token"]:
            print(f"admin page (keep it secret; shown once): {login_url(cfg, info['admin_token'], '/admin')}")
        print(f"next: preftune collect invite {project} NAME ...")
        return 0
    if words and action != "invite":
        raise ConfigError(f"collect {action}: unexpected argument {words[0]!r} (settings are key=value)")
    store = open_store(project, cfg)
    try:
        if action == "invite":
            if not words:
                raise ConfigError("collect invite: name at least one annotator, e.g. `preftune collect invite DIR alice bob`")
            for name in words:
                try:
                    print(f"{name}: {login_url(cfg, store.add_annotator(name))}")
                except StoreError as err:
                    raise ConfigError(f"collect invite: {err}") from None
        elif action == "status":
            print(format_status(status(store)))
        elif action == "export":
            from preftune.collect.export import export

            res = export(store, cfg)
            print(f"wrote {res['rows']} {cfg.rows} rows ({res['format']}) to {res['output']}")
        elif action == "judge":
            from preftune.collect.judge import judge_project

            res = judge_project(store, cfg.judge)
            consistency = "n/a" if res["position_consistency"] is None else f"{res['position_consistency']:.3f}"
            print(f"judge:{cfg.judge} answered {res['answered']} items; position consistency {consistency} over {res['asked']} pairs")
        elif action == "serve":
            from preftune.collect.app import serve

            def ready(port: int) -> None:
                print(f"preftune collect: serving http://{cfg.host}:{port}/ (annotators log in by their invite links; "
                      f"the admin page is /admin; Ctrl-C stops, every answer is already stored)", flush=True)

            serve(store, cfg.host, cfg.port, max_body=cfg.max_body_kb * 1024, on_ready=ready)
    finally:
        store.close()
    return 0
