"""Load and crash safety of the collection server, on 127.0.0.1."""

import asyncio
import os
import re
import signal

import httpx

from preftune.collect.project import CollectConfig, open_store
from tests.collect_helpers import ThreadServer, assign, item_ids, make_project, serve_subprocess


async def _csrf(client, token):
    await client.get("/login", params={"token": token})
    page = await client.get("/")
    return re.search(r'name="csrf" content="([0-9a-f]+)"', page.text).group(1)


async def _fire(url, tokens, items, acked, limit=None, stop_after=None):
    """Every annotator submits a label for every item, all at once; ``acked`` collects the 2xx submission ids."""
    clients = {}
    for name, token in tokens.items():
        c = httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=len(items) + 2))
        clients[name] = (c, await _csrf(c, token))
    failures = []

    async def one(name, item):
        c, csrf = clients[name]
        sub = f"{name}-{item}"
        try:
            r = await c.post("/api/label", json={"item": item, "ranking": [[0], [1]], "submission": sub}, headers={"X-CSRF-Token": csrf})
        except httpx.HTTPError as err:
            failures.append(repr(err))
            return
        if r.status_code == 200:
            acked.add(sub)
        else:
            failures.append(f"{r.status_code} {r.text}")

    await asyncio.gather(*(one(n, i) for n in tokens for i in items))
    for c, _ in clients.values():
        await c.aclose()
    return failures


def test_50_annotators_20_concurrent_submissions_each(tmp_path):
    names = [f"ann{i:02d}" for i in range(50)]
    project, tokens, _ = make_project(tmp_path, names=names, n=20, overlap=50)
    ids = item_ids(project)
    for name in names:
        assign(project, tokens[name], ids)
    server = ThreadServer(project)
    try:
        acked = set()
        failures = asyncio.run(_fire(server.url, tokens, ids, acked))
        assert failures == [] and len(acked) == 1000, failures[:5]
        assert httpx.get(server.url + "/api/next").status_code == 401  # still answering
    finally:
        server.stop()
    store = open_store(project, CollectConfig())
    rows = store.current()
    assert store.count_rows() == 1000 and len(rows) == 1000
    assert {f"{r['submission']}" for r in rows} == acked  # none lost, none duplicated
    store.close()


def test_sigkill_during_load_keeps_every_acknowledged_label(tmp_path):
    names = [f"ann{i:02d}" for i in range(10)]
    project, tokens, _ = make_project(tmp_path, names=names, n=30, overlap=10)
    ids = item_ids(project)
    for name in names:
        assign(project, tokens[name], ids)
    proc, url = serve_subprocess(project)
    acked: set = set()

    async def run():
        async def killer():
            while len(acked) < 60:
                await asyncio.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)

        task = asyncio.create_task(killer())
        failures = await _fire(url, tokens, ids, acked)
        await task
        return failures

    try:
        failures = asyncio.run(run())
    finally:
        proc.kill()
        proc.wait()
    assert failures, "the kill should have cut some submissions off"
    assert 60 <= len(acked) < 300
    proc, url = serve_subprocess(project)  # restart: the server comes back on the same database
    try:
        assert httpx.get(url + "/api/next").status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    store = open_store(project, CollectConfig())
    stored = {r["submission"] for r in store.current()}
    store.close()
    assert acked <= stored  # every 2xx-acknowledged label is there
