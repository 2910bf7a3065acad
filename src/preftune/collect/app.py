"""The collection web app: Starlette (ASGI) served by uvicorn.

    GET  /login?token=T      an annotator's invite link: sets the session cookie (HttpOnly, SameSite=Strict)
    GET  /guidelines         the project's guidelines (Markdown, raw HTML shown as text)
    GET  /                   the labelling page
    GET  /api/next           the item to label next {key, mode, prompt, completions: [{id, text}], progress}
    POST /api/label          {"item", "ranking" | "labels" | "skip": true | "both_bad": true, "comment", "submission", "revise"}
    POST /api/undo           {"item"?}: take back one's latest (or that item's) answer
    GET  /api/history        one's own answers that count
    GET  /admin?token=A      the admin page (progress, agreement, most-disagreed items); /api/admin/status as JSON

Every route but /login needs the session cookie (401 without); every POST needs the page's CSRF
token in ``X-CSRF-Token`` and, when the browser sends one, a same-origin ``Origin``. Request bodies
are limited (a missing, malformed or negative Content-Length included) and must arrive within
``body_timeout`` seconds. :func:`serve` runs it under uvicorn (``preftune collect serve`` and
``preftune label``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import socket
from typing import Any, Callable

import uvicorn
from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from preftune.collect import pages
from preftune.collect.project import status as project_status
from preftune.collect.settings import LOOPBACK
from preftune.collect.store import Store, StoreError, hash_token
from preftune.config import ConfigError
from preftune.data.records import DataError
from preftune.data.validate import Where, check_ranking

SESSION, ADMIN = "preftune_session", "preftune_admin"
log = logging.getLogger("preftune.collect")


class BodyGuard:
    """ASGI middleware: read the whole body first, within limits of size and time."""

    def __init__(self, app, max_body: int, timeout: float):
        self.app, self.max_body, self.timeout = app, max_body, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.strip().isdigit():
            return await _plain(send, 400, "Content-Length must be a non-negative integer")
        if length is not None and int(length) > self.max_body:
            return await _plain(send, 413, f"request body over the limit of {self.max_body} bytes")
        body, more = b"", True
        while more:
            try:
                msg = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                return await _plain(send, 408, "request body not received in time")
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return await _plain(send, 413, f"request body over the limit of {self.max_body} bytes")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _plain(send, status: int, text: str) -> None:
    body = json.dumps({"error": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Routes:
    """The handlers, sharing the store and the project's settings."""

    def __init__(self, store: Store, title: str, on_change: Callable[[], None] | None = None, shuffle: bool = True, seed: int = 0):
        self.store, self.title, self.on_change = store, title, on_change
        self.shuffle, self.seed = shuffle, seed
        self.meta = store.get_meta()
        self.secret = self.meta["csrf_secret"].encode()
        self.mode, self.overlap = self.meta["mode"], int(self.meta["overlap"])

    def csrf_for(self, annotator: dict) -> str:
        return hmac.new(self.secret, annotator["token_hash"].encode(), hashlib.sha256).hexdigest()

    async def who(self, request: Request) -> dict:
        annotator = await run_in_threadpool(self.store.authenticate, request.cookies.get(SESSION))
        if annotator is None:
            raise HTTPException(401, "not logged in: open your invite link (preftune collect invite)")
        return annotator

    def is_admin(self, request: Request) -> bool:
        token = request.cookies.get(ADMIN) or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return bool(token) and hmac.compare_digest(hash_token(token), self.meta.get("admin_hash", ""))

    async def body_of(self, request: Request, annotator: dict) -> dict:
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
            raise HTTPException(403, f"cross-origin request from {origin[:100]} refused")
        if not hmac.compare_digest(request.headers.get("x-csrf-token", ""), self.csrf_for(annotator)):
            raise HTTPException(403, "missing or wrong X-CSRF-Token (reload the page)")
        raw = await request.body()
        try:
            data = json.loads(raw.decode("utf-8")) if raw else {}
        except UnicodeDecodeError:
            raise HTTPException(400, "request body is not UTF-8") from None
        except json.JSONDecodeError as err:
            raise HTTPException(400, f"request body is not JSON: {err}") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "expected a JSON object")
        return data

    async def changed(self) -> None:
        """After a label or an undo is committed, before the reply (``preftune label`` rewrites its labels file)."""
        if self.on_change is not None:
            await run_in_threadpool(self.on_change)

    def progress(self, annotator: dict) -> dict:
        return self.store.progress(annotator["id"], self.overlap)

    def shown(self, annotator: dict, item: dict | None) -> dict:
        out: dict[str, Any] = {"progress": self.progress(annotator), "mode": self.mode}
        if item is None:
            return {**out, "item": None}
        order = list(range(item["k"]))
        if self.shuffle:  # per annotator: position hints at nothing
            random.Random(f"{self.seed}:{annotator['id']}:{item['id']}" if self.seed else f"{annotator['id']}:{item['id']}").shuffle(order)
        return {**out, "item": item["id"], "key": item["id"], "prompt": _text(item["prompt"]),
                "submission": f"{item['id']}-{random.getrandbits(64):x}",
                "completions": [{"id": i, "text": _text(item["completions"][i])} for i in order]}

    async def login(self, request: Request):
        token = request.query_params.get("token")
        annotator = await run_in_threadpool(self.store.authenticate, token)
        if annotator is None:
            return HTMLResponse(pages.message("Not logged in", "This login link is not valid. Ask for a new one."), 401)
        response = HTMLResponse(pages.logged_in("/guidelines", annotator["name"]))
        response.set_cookie(SESSION, token, httponly=True, samesite="strict", max_age=90 * 86400)
        return response

    async def guidelines(self, request: Request):
        annotator = await self.who(request)
        return HTMLResponse(pages.guidelines(self.meta.get("guidelines", ""), annotator["name"]))

    async def index(self, request: Request):
        annotator = await self.who(request)
        return HTMLResponse(pages.labelling(self.title, self.csrf_for(annotator)), headers={"Cache-Control": "no-store"})

    async def next_item(self, request: Request):
        annotator = await self.who(request)
        item = await run_in_threadpool(self.store.next_item, annotator["id"], self.overlap)
        return JSONResponse(await run_in_threadpool(self.shown, annotator, item), headers={"Cache-Control": "no-store"})

    async def label(self, request: Request):
        annotator = await self.who(request)
        data = await self.body_of(request, annotator)
        kind, answer = await run_in_threadpool(_answer, self.store, self.mode, data)
        comment, submission = data.get("comment"), data.get("submission")
        if comment is not None and (not isinstance(comment, str) or len(comment) > 2000):
            raise HTTPException(400, "comment: expected text of at most 2000 characters")
        if submission is not None and (not isinstance(submission, str) or len(submission) > 64):
            raise HTTPException(400, "submission: expected an id of at most 64 characters")
        label_id = await run_in_threadpool(lambda: self.store.submit(annotator["id"], data.get("item"), kind, answer, comment=comment,
                                                                submission=submission, revise=data.get("revise") is True))
        await self.changed()
        return JSONResponse({"saved": label_id, "item": data["item"], "kind": kind})

    async def undo(self, request: Request):
        annotator = await self.who(request)
        data = await self.body_of(request, annotator)
        target = data.get("item")
        if target is not None and not isinstance(target, str):
            raise HTTPException(400, "item: expected an item id")
        undone = await run_in_threadpool(self.store.undo, annotator["id"], target)
        if undone is None:
            raise HTTPException(409, "nothing of yours to undo" + (f" for item {target}" if target else ""))
        await self.changed()
        return JSONResponse({"undone": undone})

    async def history(self, request: Request):
        annotator = await self.who(request)
        rows = await run_in_threadpool(self.store.current, annotator["id"])
        items = await run_in_threadpool(self.store.items)
        return JSONResponse({"labels": [{"item": r["item_id"], "kind": r["kind"], "answer": r["answer"], "comment": r["comment"],
                                         "prompt": _text(items[r["item_id"]]["prompt"])[:80]} for r in rows]})

    async def admin_page(self, request: Request):
        token = request.query_params.get("token")
        if token is not None:
            if not hmac.compare_digest(hash_token(token), self.meta.get("admin_hash", "")):
                return HTMLResponse(pages.message("Not allowed", "This admin link is not valid."), 401)
            response = HTMLResponse(pages.logged_in("/admin", "admin"))
            response.set_cookie(ADMIN, token, httponly=True, samesite="strict")
            return response
        if not self.is_admin(request):
            raise HTTPException(401, "admin only: open the admin link printed by `preftune collect create`")
        return HTMLResponse(pages.admin(await run_in_threadpool(project_status, self.store)))

    async def admin_status(self, request: Request):
        if not self.is_admin(request):
            raise HTTPException(401, "admin only: send the admin token (Authorization: Bearer TOKEN)")
        return JSONResponse(await run_in_threadpool(project_status, self.store))

    async def http_error(self, request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    async def store_error(self, request: Request, exc: StoreError):
        return _error(exc.status, str(exc))

    async def db_error(self, request: Request, exc: OperationalError):  # e.g. SQLite busy past its timeout
        log.warning("database error on %s: %s", request.url.path, exc.orig)
        return _error(503, "the database is busy or unreachable; nothing was stored, send it again")


def make_app(store: Store, *, max_body: int = 64 * 1024, body_timeout: float = 20.0, allowed_hosts: list[str] | None = None,
             title: str = "preftune collect", on_change: Callable[[], None] | None = None, shuffle: bool = True,
             seed: int = 0) -> Starlette:
    r = Routes(store, title, on_change, shuffle, seed)
    routes = [Route("/login", r.login), Route("/guidelines", r.guidelines), Route("/", r.index), Route("/api/next", r.next_item),
              Route("/api/label", r.label, methods=["POST"]), Route("/api/undo", r.undo, methods=["POST"]),
              Route("/api/history", r.history), Route("/admin", r.admin_page), Route("/api/admin/status", r.admin_status)]
    middleware = [Middleware(BodyGuard, max_body=max_body, timeout=body_timeout)]
    if allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: r.http_error, StoreError: r.store_error,
                                                                                OperationalError: r.db_error})


def serve(store: Store, host: str, port: int, *, max_body: int = 64 * 1024, on_ready: Callable[[int], None] | None = None,
          **app_options: Any) -> None:
    """Serve the app (``app_options``: of :func:`make_app`) on ``host:port`` (0 = a free port, passed
    to ``on_ready``) until Ctrl-C / SIGTERM.
    On a loopback address the ``Host`` header must name it (a DNS-rebinding page gets 400); any other
    address is refused while the project has no accounts."""

    loopback = host in LOOPBACK
    if not loopback and not store.annotators():
        raise ConfigError(f"collect.host: refusing to listen on {host} with no accounts; invite annotators first "
                          "(`preftune collect invite PROJECT NAME`)")
    allowed = list(LOOPBACK) + ["[::1]"] if loopback else None
    app = make_app(store, max_body=max_body, allowed_hosts=allowed, **app_options)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise ConfigError(f"port: cannot listen on {host}:{port} ({err.strerror}); choose another port") from None
    # keep-alive 75 s (nginx's default): with 5 s, a browser reusing a connection just as the server
    # dropped it lost the POST (seen under load as "server closed the connection" on ~1% of submissions)
    config = uvicorn.Config(app, backlog=4096, log_level="warning", timeout_keep_alive=75, timeout_graceful_shutdown=3)
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops gracefully on Ctrl-C, then raises it again
        pass


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(f"[{m['role']}] {m['content']}" for m in value)


def _answer(store: Store, mode: str, data: dict) -> tuple[str, Any]:
    """(kind, answer) of a label request, checked against its item; StoreError with the reason."""
    item = store.item(data.get("item"))
    k = item["k"]
    if data.get("skip") is True:
        return "skip", None
    if data.get("both_bad") is True:
        return "both_bad", None
    if "ranking" in data:
        if mode != "rank":
            raise StoreError("this project collects thumbs up/down ('labels'), not rankings", 400)
        try:
            return "rank", [sorted(g) for g in check_ranking(data["ranking"], k, Where("request", None))]
        except DataError as err:
            raise StoreError(f"ranking: {err.message}", 422) from None
    if "labels" in data:
        labels = data["labels"]
        if mode != "thumbs":
            raise StoreError("this project collects rankings, not thumbs up/down", 400)
        if not isinstance(labels, list) or len(labels) != k or not all(isinstance(v, bool) for v in labels):
            raise StoreError(f"labels: expected {k} true/false values, one per completion", 422)
        return "thumbs", labels
    raise StoreError("expected 'ranking', 'labels', 'skip': true or 'both_bad': true", 400)
