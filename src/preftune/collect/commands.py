"""``preftune collect ACTION PROJECT [args] [key=value ...]``: the team labelling workflow.

    preftune collect create runs/collect samples.jsonl guidelines=guide.md overlap=3 mode=rank
    preftune collect invite runs/collect alice bob carol      # one login link per annotator
    preftune collect serve runs/collect host=0.0.0.0 port=8765
    preftune collect status runs/collect                      # progress, per-annotator counts, agreement
    preftune collect export runs/collect output=labels.jsonl consensus=borda format=pairs
    preftune collect judge runs/collect judge=llm:smollm2-135m-instruct   # an LLM answers every item too
"""

from __future__ import annotations

import logging
import socket

from preftune.collect.project import create, format_status, login_url, open_store, status
from preftune.collect.settings import LOOPBACK, CollectConfig
from preftune.collect.store import StoreError
from preftune.config import ConfigError, apply_overrides, from_dict

log = logging.getLogger("preftune.collect")


def settings(overrides: list[str]) -> CollectConfig:
    return from_dict(CollectConfig, apply_overrides({}, overrides), "collect")


def run_collect(action: str, project: str, rest: list[str], *, on_ready=None) -> int:
    words = [r for r in rest if "=" not in r]
    cfg = settings([r for r in rest if "=" in r])
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
            s = status(store)
            print(format_status(s))
        elif action == "export":
            from preftune.collect.export import export

            res = export(store, cfg)
            print(f"wrote {res['rows']} {cfg.rows} rows ({res['format']}) to {res['output']}")
        elif action == "judge":
            print(run_judge(store, cfg))
        elif action == "serve":
            serve(store, cfg, on_ready=on_ready)
    finally:
        store.close()
    return 0


def run_judge(store, cfg: CollectConfig) -> str:
    from preftune.collect.judge import LLMJudge, parse_spec

    model = parse_spec(cfg.judge)
    if model is None:
        raise ConfigError(f"collect.judge: expected 'llm' or 'llm:MODEL', got {cfg.judge!r}")
    meta = store.get_meta()
    if meta["mode"] != "rank":
        raise ConfigError("collect.judge: an LLM judge ranks; this project collects thumbs")
    who = store.annotator_id(f"judge:{cfg.judge}", create=True)
    done = {r["item_id"] for r in store.current(who)}
    todo = [it for i, it in store.items().items() if i not in done]
    store.assign(who, [it["id"] for it in todo])
    results = LLMJudge(model, meta.get("guidelines", "")).judge([(it["prompt"], it["completions"]) for it in todo])
    for it, r in zip(todo, results):
        store.submit(who, it["id"], "rank", r["ranking"])
    asked = sum(r["asked"] for r in results)
    consistency = f"{sum(r['consistent'] for r in results) / asked:.3f}" if asked else "n/a"
    return f"judge:{cfg.judge} answered {len(todo)} items; position consistency {consistency} over {asked} pairs"


def serve(store, cfg: CollectConfig, *, on_ready=None) -> None:
    import uvicorn

    from preftune.collect.app import make_app

    loopback = cfg.host in LOOPBACK
    if not loopback and not store.annotators():
        raise ConfigError(f"collect.host: refusing to listen on {cfg.host} with no accounts; invite annotators first "
                          "(`preftune collect invite PROJECT NAME`)")
    allowed = [h for h in LOOPBACK] + ["[::1]"] if loopback else None  # a rebinding host name gets 400
    app = make_app(store, max_body=cfg.max_body_kb * 1024, allowed_hosts=allowed)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as err:
        raise ConfigError(f"collect.port: cannot listen on {cfg.host}:{cfg.port} ({err.strerror}); choose another port") from None
    port = sock.getsockname()[1]
    # keep-alive 75 s (nginx's default): with 5 s, a browser reusing a connection just as the server
    # dropped it lost the POST (seen under load as "server closed the connection" on ~1% of submissions)
    config = uvicorn.Config(app, backlog=4096, log_level="warning", timeout_keep_alive=75, timeout_graceful_shutdown=3)
    print(f"preftune collect: serving http://{cfg.host}:{port}/ (annotators log in by their invite links; "
          f"the admin page is /admin; Ctrl-C stops, every answer is already stored)", flush=True)
    if on_ready is not None:
        on_ready(port)
    uvicorn.Server(config).run(sockets=[sock])
