"""Two `preftune collect serve` processes on one database (SQLite, and PostgreSQL when
PREFTUNE_TEST_POSTGRES_URL is set -- a failure, not a skip, under CI=true): every annotator asks both
servers for work at the same moment, again and again, and answers what they get. No item may go
beyond ``overlap`` or to one annotator twice, and every request is answered."""

import asyncio
import random
import signal

import httpx
import pytest

from preftune.collect.project import CollectConfig, open_store
from preftune.collect.store import assignments_t
from tests.collect_helpers import make_project, postgres_url, serve_subprocess
from tests.test_collect_load import _csrf

N_ITEMS, OVERLAP, N_ANNOTATORS = 8, 3, 12


async def _work(urls, tokens):
    """Each annotator: ask both servers for an item at once, answer each item returned, until both say none."""
    failures, answered = [], []

    async def annotator(name, token):
        clients = []
        for url in urls:
            c = httpx.AsyncClient(base_url=url, timeout=60)
            clients.append((c, await _csrf(c, token)))
        try:
            while True:
                replies = await asyncio.gather(*(c.get("/api/next") for c, _ in clients))
                if any(r.status_code != 200 for r in replies):
                    failures.extend([f"{name} next: {r.status_code} {r.text[:200]}" for r in replies if r.status_code != 200])
                    return
                items = {r.json()["item"] for r in replies} - {None}
                if not items:
                    return
                for item in items:
                    c, csrf = random.choice(clients)
                    r = await c.post("/api/label", json={"item": item, "ranking": [[0], [1]]}, headers={"X-CSRF-Token": csrf})
                    if r.status_code == 200:
                        answered.append((item, name))
                    elif r.status_code != 409:  # 409: the same item, answered through the other server just now
                        failures.append(f"{name} label: {r.status_code} {r.text[:200]}")
        finally:
            for c, _ in clients:
                await c.aclose()

    await asyncio.gather(*(annotator(n, t) for n, t in tokens.items()))
    return failures, answered


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_server_processes_never_hand_out_an_item_beyond_overlap(tmp_path, backend):
    db = postgres_url() if backend == "postgresql" else ""
    names = [f"ann{i:02d}" for i in range(N_ANNOTATORS)]
    project, tokens, _ = make_project(tmp_path, names=names, n=N_ITEMS, overlap=OVERLAP, db=db)
    servers = [serve_subprocess(project) for _ in range(2)]
    try:
        failures, answered = asyncio.run(_work([url for _, url in servers], tokens))
    finally:
        for proc, _ in servers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    assert failures == [], failures[:5]
    store = open_store(project, CollectConfig())
    with store.engine.connect() as c:
        handed = [tuple(r) for r in c.execute(assignments_t.select().with_only_columns(assignments_t.c.item_id, assignments_t.c.annotator_id))]
    rows = store.current()
    store.close()
    per_item = {}
    for item, _ in handed:
        per_item[item] = per_item.get(item, 0) + 1
    assert len(set(handed)) == len(handed) and sorted(per_item.values()) == [OVERLAP] * N_ITEMS  # never beyond overlap
    assert len(answered) == len(rows) == N_ITEMS * OVERLAP == len({(r["item_id"], r["annotator_id"]) for r in rows})
