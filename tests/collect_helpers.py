"""Shared by the collect tests: a project on disk and its web app on 127.0.0.1 (in a thread or a subprocess)."""

import os
import re
import subprocess
import sys
import threading
import time

import httpx

from preftune.collect.project import CollectConfig, create, open_store
from tests.conftest import write_jsonl


def postgres_url() -> str:
    """PREFTUNE_TEST_POSTGRES_URL with an empty schema; skipped without one, but a failure under CI=true
    (.ci/run starts the server with scripts/ci_postgres.sh)."""
    import pytest

    from preftune.collect.store import Store, md

    url = os.environ.get("PREFTUNE_TEST_POSTGRES_URL", "")
    if not url:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but PREFTUNE_TEST_POSTGRES_URL is not set: .ci/run must start PostgreSQL (scripts/ci_postgres.sh)")
        pytest.skip("PREFTUNE_TEST_POSTGRES_URL not set (export PREFTUNE_TEST_POSTGRES_URL=$(bash scripts/ci_postgres.sh))")
    store = Store(url)
    md.drop_all(store.engine)  # a clean schema for every test
    store.close()
    return url


def make_project(tmp_path, names=("alice", "bob", "carol"), n=4, k=2, overlap=3, mode="rank", texts=None, db=""):
    rows = [{"prompt": f"Prompt {p}: say something kind.", "completions": (texts or {}).get(p, [f"completion {p}.{s}" for s in range(k)])}
            for p in range(n)]
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    guide = tmp_path / "guide.md"
    guide.write_text("# Be kind\n\nPrefer the **kinder** answer. <script>alert(1)</script>\n", encoding="utf-8")
    project = tmp_path / "proj"
    cfg = CollectConfig(samples=str(samples), guidelines=str(guide), overlap=overlap, mode=mode, db=db)
    info = create(project, cfg)
    store = open_store(project, cfg)
    tokens = {name: store.add_annotator(name) for name in names}
    store.close()
    return project, tokens, info["admin_token"]


class ThreadServer:
    """The app under uvicorn in a thread of this process, on a free port."""

    def __init__(self, project, db="", body_timeout=20.0, **app_options):
        import uvicorn

        from preftune.collect.app import make_app

        self.store = open_store(project, CollectConfig(db=db))
        app = make_app(self.store, allowed_hosts=["127.0.0.1", "localhost"], body_timeout=body_timeout, **app_options)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", backlog=4096, timeout_keep_alive=75))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


def serve_subprocess(project, port=0):
    """`preftune collect serve` in a subprocess; returns (process, base url)."""
    code = f"from preftune.cli import main; main(['collect', 'serve', {str(project)!r}, 'port={port}'])"
    proc = subprocess.Popen([sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"server did not start: {proc.stderr.read()}")
    return proc, re.search(r"serving (http://\S+)/ ", line).group(1)


def login(url, token) -> httpx.Client:
    """A logged-in client with the page's CSRF token in its default headers."""
    client = httpx.Client(base_url=url, timeout=30)
    r = client.get("/login", params={"token": token})
    assert r.status_code == 200, r.text
    page = client.get("/")
    client.headers["X-CSRF-Token"] = re.search(r'name="csrf" content="([0-9a-f]+)"', page.text).group(1)
    return client


def rank_next(client, first_wins=True):
    item = client.get("/api/next").json()
    ranking = [[0], [1]] if first_wins else [[1], [0]]
    r = client.post("/api/label", json={"item": item["item"], "ranking": ranking, "submission": item["submission"]})
    return item, r


def assign(project, annotator_token, item_ids, db=""):
    """Hand ``item_ids`` to an annotator at once (the app hands out one at a time), for load tests."""
    store = open_store(project, CollectConfig(db=db))
    store.assign(store.authenticate(annotator_token)["id"], item_ids)
    store.close()


def item_ids(project, db=""):
    store = open_store(project, CollectConfig(db=db))
    ids = list(store.items())
    store.close()
    return ids
