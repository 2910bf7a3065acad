"""The collection store and app against a real PostgreSQL server (scripts/ci_postgres.sh starts one;
.ci/run exports PREFTUNE_TEST_POSTGRES_URL). In CI a missing URL is a failure, not a skip."""

import asyncio

import pytest

from preftune.collect.project import CollectConfig, open_store, status
from tests.collect_helpers import ThreadServer, assign, item_ids, login, make_project, postgres_url, rank_next
from tests.test_collect_load import _fire


@pytest.fixture
def pg_url():
    return postgres_url()


def test_postgres_team_project_over_http(tmp_path, pg_url):
    names = [f"ann{i}" for i in range(10)]
    project, tokens, _ = make_project(tmp_path, names=names, n=10, overlap=10, db=pg_url)
    assert (project / "collect.json").is_file() and not (project / "collect.db").exists()
    ids = item_ids(project)
    for name in names[1:]:
        assign(project, tokens[name], ids)
    server = ThreadServer(project)  # finds the database through collect.json
    try:
        assert server.store.engine.dialect.name == "postgresql"
        acked = set()
        failures = asyncio.run(_fire(server.url, {n: tokens[n] for n in names[1:]}, ids, acked))
        assert failures == [] and len(acked) == 90
        alice = login(server.url, tokens["ann0"])
        item, r = rank_next(alice)
        assert r.status_code == 200
        assert alice.post("/api/undo", json={}).json() == {"undone": item["item"]}
        item2, r = rank_next(alice, first_wins=False)
        assert r.status_code == 200 and item2["item"] == item["item"]
    finally:
        server.stop()
    store = open_store(project, CollectConfig())
    assert store.count_rows() == 93 and len(store.current()) == 91  # appended, never overwritten
    s = status(store)
    assert s["answers"] == 91 and s["agreement"]["pairwise_agreement"] < 1
    store.close()
