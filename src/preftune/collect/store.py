"""The collection store: SQLAlchemy Core over SQLite (WAL, the embedded default) or PostgreSQL.

Tables (each prefixed ``collect_``, so a shared PostgreSQL database is no problem): ``meta`` (mode, overlap, guidelines, the admin token's hash, the CSRF secret), ``items``
(prompt + K completions, id = a hash of both), ``annotators`` (name + the SHA-256 of their login
token; the token itself is never stored), ``assignments`` (which item was handed to whom) and
``labels``, which is append-only: a changed answer or an undo is a new row and the latest row of an
(item, annotator) counts. Every write commits before the call returns, so an HTTP 2xx means the
label is on disk.

Several server processes may share one database: handing out an item (check the counts, then
insert the assignment) and answering one run in a transaction that holds a database-level lock
(:meth:`Store.exclusive`: SQLite's one writer taken up front with ``BEGIN IMMEDIATE``, a PostgreSQL
transaction-level advisory lock), so no item goes beyond ``overlap`` or to one annotator twice; the
assignments' primary key (item, annotator) backs the second rule.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError, OperationalError

md = MetaData()
meta_t = Table("collect_meta", md, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))
items_t = Table(
    "collect_items", md,
    Column("id", String(32), primary_key=True),
    Column("position", Integer, nullable=False, index=True),
    Column("prompt", Text, nullable=False),  # JSON: text or a list of messages
    Column("completions", Text, nullable=False),  # JSON list
    Column("k", Integer, nullable=False),
    Column("gold", Text),  # JSON ranking of a gold item (known answer), else NULL
)
annotators_t = Table(
    "collect_annotators", md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
)
assignments_t = Table(
    "collect_assignments", md,
    Column("item_id", String(32), ForeignKey("collect_items.id"), primary_key=True),
    Column("annotator_id", Integer, ForeignKey("collect_annotators.id"), primary_key=True),
    Column("assigned_at", Float, nullable=False),
)
labels_t = Table(
    "collect_labels", md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("item_id", String(32), ForeignKey("collect_items.id"), nullable=False, index=True),
    Column("annotator_id", Integer, ForeignKey("collect_annotators.id"), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # rank | thumbs | both_bad | skip | undo
    Column("answer", Text),  # JSON: ranking (original indices) or thumbs list
    Column("comment", Text),
    Column("submission", String(64)),  # the client's id for this submission: a resend is refused
    Column("created_at", Float, nullable=False),
    UniqueConstraint("annotator_id", "submission", name="one_submission"),
)
ANSWERS = ("rank", "thumbs", "both_bad")  # kinds that are an answer (skip and undo are not)
LEASE_S = 1800.0  # an item handed out and not answered for this long is offered to someone else
LOCK_ASSIGN, LOCK_ANSWER = 0x70726601, 0x70726602  # PostgreSQL advisory lock namespaces (any int4, unique to preftune)


class StoreError(ValueError):
    """A request the store refuses; ``status`` is the HTTP status the web app answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def db_url(project: str | Path, db: str | None = None) -> str:
    """The database of a project folder: ``db`` if given, else what ``create`` recorded, else SQLite in the folder."""
    if db:
        return db
    conf = Path(project) / "collect.json"
    if conf.is_file():
        return json.loads(conf.read_text(encoding="utf-8"))["db"]
    return f"sqlite:///{(Path(project) / 'collect.db').resolve()}"


def _engine(url: str):
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _):  # WAL: readers never block the writer; FULL: a commit survives power loss
        dbapi_conn.isolation_level = None  # the driver's own BEGIN comes only before a write; ours come below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # a transaction from its first read; IMMEDIATE takes the write lock at once (Store.exclusive)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    return engine


class Store:
    def __init__(self, url: str):
        self.url = url
        self.engine = _engine(url)
        self._assign = threading.Lock()  # handing out items is check-then-insert: one at a time
        try:
            md.create_all(self.engine)
        except OperationalError as err:
            raise StoreError(f"cannot open the database {url.split('@')[-1]}: {err.orig}") from None

    @contextmanager
    def exclusive(self, namespace: int, key: int = 0):
        """A write transaction holding the database-wide lock (namespace, key) until it commits, so a
        check-then-insert is atomic across server processes: SQLite ``BEGIN IMMEDIATE`` (the one
        writer; other processes wait up to busy_timeout), PostgreSQL ``pg_advisory_xact_lock``."""
        with self.engine.connect() as c:
            c.execution_options(immediate=True)
            with c.begin():
                if c.dialect.name == "postgresql":
                    c.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"), {"ns": namespace, "key": key})
                yield c

    # -- project -----------------------------------------------------------------------------------
    def get_meta(self) -> dict:
        with self.engine.connect() as c:
            return {k: json.loads(v) for k, v in c.execute(select(meta_t.c.key, meta_t.c.value))}

    def set_meta(self, **values: Any) -> None:
        with self.engine.begin() as c:
            for key, value in values.items():
                c.execute(meta_t.delete().where(meta_t.c.key == key))
                c.execute(insert(meta_t).values(key=key, value=json.dumps(value, ensure_ascii=False)))

    def add_items(self, items: list[dict]) -> int:
        """``items``: {id, prompt, completions, gold}; ids already present are kept as they are. Returns the number added."""
        with self.engine.begin() as c:
            have = set(c.execute(select(items_t.c.id)).scalars())
            start = c.execute(select(func.coalesce(func.max(items_t.c.position), -1))).scalar() + 1
            new = [it for it in items if it["id"] not in have]
            for pos, it in enumerate(new, start=start):
                c.execute(insert(items_t).values(
                    id=it["id"], position=pos, prompt=json.dumps(it["prompt"], ensure_ascii=False),
                    completions=json.dumps(it["completions"], ensure_ascii=False), k=len(it["completions"]),
                    gold=None if it.get("gold") is None else json.dumps(it["gold"])))
        return len(new)

    def items(self) -> dict[str, dict]:
        with self.engine.connect() as c:
            rows = c.execute(select(items_t).order_by(items_t.c.position)).mappings().all()
        return {r["id"]: _item(r) for r in rows}

    def item(self, item_id: Any) -> dict:
        if not isinstance(item_id, str) or len(item_id) > 32:
            raise StoreError(f"unknown item {str(item_id)[:40]!r}", 404)
        with self.engine.connect() as c:
            row = c.execute(select(items_t).where(items_t.c.id == item_id)).mappings().first()
        if row is None:
            raise StoreError(f"unknown item {item_id!r}", 404)
        return _item(row)

    # -- annotators --------------------------------------------------------------------------------
    def add_annotator(self, name: str) -> str:
        """A new annotator; returns their login token (shown once, stored only as a hash)."""
        token = secrets.token_urlsafe(24)
        try:
            with self.engine.begin() as c:
                c.execute(insert(annotators_t).values(name=name, token_hash=hash_token(token), created_at=time.time()))
        except IntegrityError:
            raise StoreError(f"annotator {name!r} already exists") from None
        return token

    def login_token(self, name: str) -> str:
        """A new login token for annotator ``name`` (made if new); their earlier token stops working."""
        if self.annotator_id(name) is None:
            return self.add_annotator(name)
        token = secrets.token_urlsafe(24)
        with self.engine.begin() as c:
            c.execute(annotators_t.update().where(annotators_t.c.name == name).values(token_hash=hash_token(token)))
        return token

    def annotators(self) -> dict[int, str]:
        with self.engine.connect() as c:
            return dict(c.execute(select(annotators_t.c.id, annotators_t.c.name).order_by(annotators_t.c.id)).all())

    def authenticate(self, token: Any) -> dict | None:
        """The annotator whose token this is, or None; the stored hash is compared in constant time."""
        if not isinstance(token, str) or not 10 <= len(token) <= 200:
            return None
        digest = hash_token(token)
        with self.engine.connect() as c:
            row = c.execute(select(annotators_t).where(annotators_t.c.token_hash == digest)).mappings().first()
        if row is None or not hmac.compare_digest(row["token_hash"], digest):
            return None
        return {"id": row["id"], "name": row["name"], "token_hash": row["token_hash"]}

    # -- labels ------------------------------------------------------------------------------------
    def _states(self, c, annotator_id: int | None = None) -> dict[tuple[str, int], dict]:
        """(item, annotator) -> the latest label row (any kind)."""
        latest = select(func.max(labels_t.c.id)).group_by(labels_t.c.item_id, labels_t.c.annotator_id)
        if annotator_id is not None:
            latest = latest.where(labels_t.c.annotator_id == annotator_id)
        rows = c.execute(select(labels_t).where(labels_t.c.id.in_(latest.scalar_subquery()))).mappings().all()
        return {(r["item_id"], r["annotator_id"]): dict(r) for r in rows}

    def next_item(self, annotator_id: int, overlap: int) -> dict | None:
        """The item this annotator should label next (handed out to them), or None: their open
        assignment if any, else the unlabelled-by-them item with the fewest answers so far whose
        answers + open assignments are below ``overlap`` (gold items go to everyone)."""
        with self._assign, self.exclusive(LOCK_ASSIGN) as c:
            states = self._states(c)
            now = time.time()
            assigned = c.execute(select(assignments_t)).mappings().all()
            mine_done = {i for (i, a), r in states.items() if a == annotator_id and r["kind"] != "undo"}
            for r in sorted((r for r in assigned if r["annotator_id"] == annotator_id), key=lambda r: r["assigned_at"]):
                if r["item_id"] not in mine_done:
                    return self.item(r["item_id"])
            answers: dict[str, int] = {}
            for (i, _), r in states.items():
                answers[i] = answers.get(i, 0) + (r["kind"] in ANSWERS)
            held: dict[str, int] = {}
            for r in assigned:
                if (r["item_id"], r["annotator_id"]) not in states and now - r["assigned_at"] < LEASE_S:
                    held[r["item_id"]] = held.get(r["item_id"], 0) + 1
            mine_ever = {r["item_id"] for r in assigned if r["annotator_id"] == annotator_id}
            rows = c.execute(select(items_t.c.id, items_t.c.position, items_t.c.gold)).all()
            free = [(answers.get(i, 0), pos, i) for i, pos, gold in rows
                    if i not in mine_ever and (gold is not None or answers.get(i, 0) + held.get(i, 0) < overlap)]
            if not free:
                return None
            _, _, item_id = min(free)
            c.execute(insert(assignments_t).values(item_id=item_id, annotator_id=annotator_id, assigned_at=now))
        return self.item(item_id)

    def annotator_id(self, name: str, *, create: bool = False) -> int | None:
        """The id of annotator ``name`` (made, without a usable login, when ``create``: e.g. a judge)."""
        with self.engine.connect() as c:
            found = c.execute(select(annotators_t.c.id).where(annotators_t.c.name == name)).scalar()
        if found is None and create:
            self.add_annotator(name)
            return self.annotator_id(name)
        return found

    def assign(self, annotator_id: int, item_ids: list[str]) -> None:
        """Hand ``item_ids`` to an annotator outright (a judge labels every item; overlap is for people)."""
        with self.exclusive(LOCK_ASSIGN) as c:
            have = set(c.execute(select(assignments_t.c.item_id).where(assignments_t.c.annotator_id == annotator_id)).scalars())
            new = [{"item_id": i, "annotator_id": annotator_id, "assigned_at": time.time()} for i in item_ids if i not in have]
            if new:
                c.execute(insert(assignments_t), new)

    def submit(self, annotator_id: int, item_id: Any, kind: str, answer: Any = None, *, comment: str | None = None,
               submission: str | None = None, revise: bool = False) -> int:
        """Append an answer (``kind`` in ANSWERS or 'skip'); refuses unassigned items and a second
        answer unless ``revise``. Committed before it returns the new row's id."""
        item = self.item(item_id)
        with self.exclusive(LOCK_ANSWER, annotator_id) as c:  # one answer at a time per annotator, in any process
            if c.execute(select(assignments_t.c.item_id).where(assignments_t.c.item_id == item["id"],
                                                               assignments_t.c.annotator_id == annotator_id)).first() is None:
                raise StoreError(f"item {item['id']} was not given to you", 403)
            state = self._states(c, annotator_id).get((item["id"], annotator_id))
            if state is not None and state["kind"] != "undo" and not revise:
                raise StoreError(f"item {item['id']} is already answered (undo it, or send revise: true)", 409)
            try:
                result = c.execute(insert(labels_t).values(
                    item_id=item["id"], annotator_id=annotator_id, kind=kind,
                    answer=None if answer is None else json.dumps(answer), comment=comment or None,
                    submission=submission, created_at=time.time()))
            except IntegrityError:
                raise StoreError(f"submission {submission!r} was already received", 409) from None
        return result.inserted_primary_key[0]

    def undo(self, annotator_id: int, item_id: str | None = None) -> str | None:
        """Take back the annotator's latest answer or skip (of ``item_id``, or their most recent one):
        an 'undo' row is appended and the item is theirs to answer again. Returns its id, or None."""
        with self.exclusive(LOCK_ANSWER, annotator_id) as c:
            states = [r for r in self._states(c, annotator_id).values() if r["kind"] != "undo"]
            if item_id is not None:
                states = [r for r in states if r["item_id"] == item_id]
            if not states:
                return None
            last = max(states, key=lambda r: r["id"])
            c.execute(insert(labels_t).values(item_id=last["item_id"], annotator_id=annotator_id, kind="undo",
                                              created_at=time.time()))
        return last["item_id"]

    def current(self, annotator_id: int | None = None) -> list[dict]:
        """The answers that count: the latest row of every (item, annotator) that is an answer or a skip."""
        with self.engine.connect() as c:
            rows = [r for r in self._states(c, annotator_id).values() if r["kind"] != "undo"]
        for r in rows:
            r["answer"] = None if r["answer"] is None else json.loads(r["answer"])
        return sorted(rows, key=lambda r: r["id"])

    def progress(self, annotator_id: int, overlap: int) -> dict:
        """{answered: by this annotator, complete: items with ``overlap`` answers, items}."""
        rows = [r for r in self.current() if r["kind"] in ANSWERS]
        per_item: dict[str, int] = {}
        for r in rows:
            per_item[r["item_id"]] = per_item.get(r["item_id"], 0) + 1
        with self.engine.connect() as c:
            n_items = c.execute(select(func.count()).select_from(items_t)).scalar()
        return {"answered": sum(r["annotator_id"] == annotator_id for r in rows),
                "complete": sum(v >= overlap for v in per_item.values()), "items": n_items}

    def items_with_labels(self) -> set[str]:
        """Items with any label row (an answer, a skip or an undo) by anyone."""
        with self.engine.connect() as c:
            return set(c.execute(select(labels_t.c.item_id).distinct()).scalars())

    def count_rows(self) -> int:
        with self.engine.connect() as c:
            return c.execute(select(func.count()).select_from(labels_t)).scalar()

    def close(self) -> None:
        self.engine.dispose()


def _item(row) -> dict:
    return {"id": row["id"], "position": row["position"], "prompt": json.loads(row["prompt"]),
            "completions": json.loads(row["completions"]), "k": row["k"],
            "gold": None if row["gold"] is None else json.loads(row["gold"])}
