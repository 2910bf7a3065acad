"""The collection web app over HTTP on 127.0.0.1: auth, CSRF, bad requests, the defects of the old
one-person page, and the 'done when' of the team workflow (3 annotators, overlap 3 -> DPO trains)."""

import json
import socket

import httpx
import pytest

from preftune.data.loaders import load_records
from tests.collect_helpers import ThreadServer, login, make_project, rank_next
from tests.conftest import cli


@pytest.fixture
def app(tmp_path):
    project, tokens, admin = make_project(tmp_path)
    server = ThreadServer(project)
    yield server, tokens, admin, project
    server.stop()


def test_no_token_is_401_everywhere(app):
    server, tokens, admin, _ = app
    anon = httpx.Client(base_url=server.url)
    for path in ("/", "/guidelines", "/api/next", "/api/history", "/admin", "/api/admin/status"):
        assert anon.get(path).status_code == 401, path
    for path in ("/api/label", "/api/undo"):
        r = anon.post(path, json={})
        assert r.status_code == 401 and "invite link" in r.json()["error"]
    assert anon.get("/login", params={"token": "x" * 32}).status_code == 401
    alice = login(server.url, tokens["alice"])  # an annotator is not an admin
    assert alice.get("/api/admin/status").status_code == 401
    status = httpx.get(server.url + "/api/admin/status", headers={"Authorization": f"Bearer {admin}"})
    assert status.status_code == 200 and status.json()["items"] == 4


def test_login_cookie_is_strict_and_guidelines_are_safe(app):
    server, tokens, _, _ = app
    client = httpx.Client(base_url=server.url)
    r = client.get("/login", params={"token": tokens["alice"]})
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    g = client.get("/guidelines").text
    assert "<strong>kinder</strong>" in g and "<script>alert" not in g and "&lt;script&gt;alert(1)&lt;/script&gt;" in g


def test_a_cannot_act_as_b(app):
    server, tokens, _, _ = app
    alice, bob = login(server.url, tokens["alice"]), login(server.url, tokens["bob"])
    item = alice.get("/api/next").json()
    # bob has not been given alice's open item yet; with overlap 3 he gets the same one, but his own copy
    stolen = httpx.post(server.url + "/api/label", json={"item": item["item"], "ranking": [[0], [1]]},
                        headers={"X-CSRF-Token": alice.headers["X-CSRF-Token"]}, cookies={"preftune_session": tokens["bob"]})
    assert stolen.status_code == 403  # alice's CSRF token does not go with bob's session
    assert alice.post("/api/label", json={"item": item["item"], "ranking": [[0], [1]]}).status_code == 200
    assert bob.post("/api/undo", json={}).status_code == 409  # bob cannot undo alice's label
    assert bob.get("/api/history").json()["labels"] == [] and len(alice.get("/api/history").json()["labels"]) == 1


def test_csrf_cross_origin_and_blind_posts_are_refused(app):
    """The old page: 20 blind cross-origin text/plain POSTs to /api/undo erased every label."""
    server, tokens, _, _ = app
    alice = login(server.url, tokens["alice"])
    item, r = rank_next(alice)
    assert r.status_code == 200
    blind = httpx.Client(base_url=server.url, cookies=alice.cookies)  # the browser sends the cookie, nothing else
    for _ in range(20):
        assert blind.post("/api/undo", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 403
    evil = alice.post("/api/undo", json={}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-origin" in evil.json()["error"]
    assert len(alice.get("/api/history").json()["labels"]) == 1
    rebinding = httpx.get(server.url + "/api/next", headers={"Host": "evil.example"}, cookies=alice.cookies)
    assert rebinding.status_code == 400  # a DNS-rebinding host name gets nothing


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not JSON"),
    (b'{"item": "\xff\xfe"}', 400, "not UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"item": "nope", "ranking": [[0], [1]]}).encode(), 404, "unknown item"),
    (json.dumps({"item": "../../etc/passwd", "ranking": [[0], [1]]}).encode(), 404, "unknown item"),
    (json.dumps({"item": "ITEM", "ranking": [[0], [1], [2]]}).encode(), 422, "ranking"),
    (json.dumps({"item": "ITEM", "ranking": [[0]]}).encode(), 422, "does not place"),
    (json.dumps({"item": "ITEM", "labels": [True, False]}).encode(), 400, "not thumbs"),
    (json.dumps({"item": "ITEM"}).encode(), 400, "expected 'ranking'"),
    (json.dumps({"item": "ITEM", "ranking": [[0], [1]], "comment": 5}).encode(), 400, "comment"),
])  # fmt: skip
def test_bad_requests_get_4xx_with_a_reason(app, body, status, words):
    server, tokens, _, _ = app
    alice = login(server.url, tokens["alice"])
    item = alice.get("/api/next").json()["item"]
    r = alice.post("/api/label", content=body.replace(b"ITEM", item.encode()), headers={"Content-Type": "application/json"})
    assert r.status_code == status and words in r.json()["error"]
    assert alice.get("/api/next").status_code == 200  # still answering


def test_duplicate_submission_and_tie_between_two(app):
    server, tokens, _, _ = app
    alice = login(server.url, tokens["alice"])
    item = alice.get("/api/next").json()
    body = {"item": item["item"], "ranking": [[0, 1]], "submission": item["submission"]}  # a tie of two
    assert alice.post("/api/label", json=body).status_code == 200
    again = alice.post("/api/label", json=body)
    assert again.status_code == 409 and "already" in again.json()["error"]
    revised = alice.post("/api/label", json={**body, "revise": True})
    assert revised.status_code == 409 and "already received" in revised.json()["error"]
    assert alice.get("/api/history").json()["labels"][0]["answer"] == [[0, 1]]


def test_body_limits_and_path_traversal(app):
    server, tokens, _, _ = app
    alice = login(server.url, tokens["alice"])
    big = alice.post("/api/label", content=b"x" * (50 << 20))
    assert big.status_code == 413
    for length in (b"-1", b"abc"):  # the old server read a 200 MB body when told Content-Length: -1
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + length + b"\r\n\r\n" + b"x" * 1000)
            assert s.recv(200).split(b" ")[1] == b"400"
    # No length at all: 1 KiB chunks until just past the 64 KiB limit, and no more, since the server
    # answers and closes at that point and more bytes in flight would turn its close into a reset.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(64 + 1):
            s.sendall(b"400\r\n" + b"x" * 0x400 + b"\r\n")
        assert s.recv(200).split(b" ")[1] == b"413"
    for path in ("/../../etc/passwd", "/static/..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd"):
        r = alice.get(path)
        assert r.status_code == 404 and "root:" not in r.text


def test_undo_survives_a_restart_and_works_after_the_last_item(tmp_path):
    project, tokens, _ = make_project(tmp_path, n=1, overlap=1, names=("alice",))
    server = ThreadServer(project)
    alice = login(server.url, tokens["alice"])
    item, r = rank_next(alice)
    assert r.status_code == 200 and alice.get("/api/next").json()["item"] is None  # the last item is done
    server.stop()
    server = ThreadServer(project)  # a restart
    try:
        alice = login(server.url, tokens["alice"])
        assert alice.post("/api/undo", json={}).json() == {"undone": item["item"]}
        again = alice.get("/api/next").json()
        assert again["item"] == item["item"]
        assert alice.post("/api/label", json={"item": again["item"], "ranking": [[1], [0]]}).status_code == 200
        assert [l["answer"] for l in alice.get("/api/history").json()["labels"]] == [[[1], [0]]]
    finally:
        server.stop()


def test_shuffled_per_annotator_and_hostile_text_is_data(tmp_path):
    texts = {0: ["<script>alert(1)</script>", '<img src=x onerror="alert(2)">', "plain", "\u202egnp.exe", "\u200b\u200b"]}
    project, tokens, _ = make_project(tmp_path, n=1, k=5, texts=texts)
    server = ThreadServer(project)
    try:
        orders = {name: [c["id"] for c in login(server.url, t).get("/api/next").json()["completions"]] for name, t in tokens.items()}
        assert len({tuple(o) for o in orders.values()}) > 1 and all(sorted(o) == list(range(5)) for o in orders.values())
        page = login(server.url, tokens["alice"]).get("/").text
        assert "textContent" in page and "innerHTML" not in page  # item text only ever goes in as text
    finally:
        server.stop()


def preftune(capsys, *args):
    """`preftune ARGS` in this process (the CLI's own entry point): (exit code, stdout, stderr)."""
    from preftune.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_serve_refuses_other_interfaces_without_accounts(tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n")
    assert preftune(capsys, "collect", "create", str(tmp_path / "p"), str(samples))[0] == 0
    code, _, err = preftune(capsys, "collect", "serve", str(tmp_path / "p"), "host=0.0.0.0", "port=0")
    assert code == 2 and "refusing to listen on 0.0.0.0 with no accounts" in err
    code, _, err = preftune(capsys, "collect", "status", str(tmp_path / "nothing"))
    assert code == 2 and "not a collection project" in err


def test_team_of_three_overlap_three_trains_dpo(tmp_path, capsys):
    """Done when: 3 annotators x overlap 3 -> consensus pairs -> `preftune train configs/dpo.yaml` on them."""
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": f"Say hi {i}", "completions": [f"hello friend {i}", f"go away {i}"]}) + "\n"
                               for i in range(3)))
    project = tmp_path / "team"
    code, out, err = preftune(capsys, "collect", "create", str(project), str(samples), "overlap=3")
    assert code == 0 and "3 new items" in out and "/admin?token=" in out, err
    code, out, _ = preftune(capsys, "collect", "invite", str(project), "alice", "bob", "carol")
    links = dict(line.split(": ", 1) for line in out.splitlines())
    assert set(links) == {"alice", "bob", "carol"} and all("/login?token=" in v for v in links.values())
    server = ThreadServer(project)
    try:
        for name, link in links.items():
            client = login(server.url, link.split("token=")[1])
            while (item := client.get("/api/next").json())["item"] is not None:
                by_text = {c["text"]: c["id"] for c in item["completions"]}
                kind = next(t for t in by_text if t.startswith("hello"))
                unkind = next(t for t in by_text if t.startswith("go away"))
                first, second = (by_text[kind], by_text[unkind]) if name != "carol" or "0" not in kind else (by_text[unkind], by_text[kind])
                assert client.post("/api/label", json={"item": item["item"], "ranking": [[first], [second]]}).status_code == 200
    finally:
        server.stop()
    _, status, _ = preftune(capsys, "collect", "status", str(project))
    assert "3 items (rank, overlap 3): 3 complete, 9 answers" in status and "Krippendorff" in status
    assert "pairwise 0.778" in status  # carol disagrees on one of 3 items: 1 - 2/9
    pairs = tmp_path / "pairs.jsonl"
    assert preftune(capsys, "collect", "export", str(project), f"output={pairs}", "format=pairs", "consensus=majority")[0] == 0
    records = load_records(str(pairs), "pairs")
    assert len(records) == 3 and all(r.chosen.startswith("hello") for r in records)
    train = cli("train", "configs/dpo.yaml", f"data.path={pairs}", "model.name=tiny-random-llama", f"output_dir={tmp_path / 'run'}",
                "train.max_steps=2", "train.micro_batch_size=1", "train.grad_accum_steps=1")
    assert train.returncode == 0, train.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_stalled_body_times_out(tmp_path):
    project, tokens, _ = make_project(tmp_path, names=("alice",))
    server = ThreadServer(project, body_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n0123456789")
            assert s.recv(200).split(b" ")[1] == b"408"
    finally:
        server.stop()


def test_thumbs_project_exports_kto_rows_and_admin_page(tmp_path):
    project, tokens, admin = make_project(tmp_path, names=("alice", "bob"), n=2, k=2, overlap=2, mode="thumbs")
    server = ThreadServer(project)
    try:
        for name in ("alice", "bob"):
            client = login(server.url, tokens[name])
            while (item := client.get("/api/next").json())["item"] is not None:
                assert client.post("/api/label", json={"item": item["item"], "ranking": [[0], [1]]}).status_code == 400
                labels = [True, False]  # in the item's own order: completion 0 is good
                assert client.post("/api/label", json={"item": item["item"], "labels": labels}).status_code == 200
        page = httpx.Client(base_url=server.url)
        assert page.get("/admin", params={"token": admin}).status_code == 200
        html = page.get("/admin").text
        assert '<b id="complete">2</b> complete' in html and "pairwise 1.000" in html
    finally:
        server.stop()
    from preftune.collect.export import export
    from preftune.collect.project import CollectConfig, open_store

    store = open_store(project, CollectConfig())
    export(store, CollectConfig(output=str(tmp_path / "kto.jsonl")))
    store.close()
    rows = load_records(str(tmp_path / "kto.jsonl"), "unpaired")
    assert [(r.completion.endswith(".0"), r.label) for r in rows] == [(True, True), (False, False)] * 2


def test_a_busy_database_is_503_not_500(app, monkeypatch):
    from sqlalchemy.exc import OperationalError

    server, tokens, _, _ = app
    alice = login(server.url, tokens["alice"])
    item = alice.get("/api/next").json()

    def busy(*args, **kwargs):
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(server.store, "submit", busy)
    r = alice.post("/api/label", json={"item": item["item"], "ranking": [[0], [1]]})
    assert r.status_code == 503 and "send it again" in r.json()["error"]
