"""The one-person `preftune label` page: each defect found when it was tried as a new user would, with
the test that shows it fixed (cross-site POSTs, DNS rebinding, backlog, Content-Length, UTF-8,
newline-less labels files, binding to every interface, keyboard handling, layout). The page is now
the collection app over a one-annotator project (preftune.collect.local)."""

import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from preftune.collect.local import LocalLabels
from preftune.collect.shortcut import LabelConfig
from preftune.config import ConfigError, from_dict
from preftune.label.store import LabelStore
from tests.collect_helpers import ThreadServer, login
from tests.conftest import write_jsonl
from tests.test_label import file_rows, flat_samples


@contextmanager
def label_server(tmp_path, samples, mode="rank"):
    """What `preftune label` serves, in a thread: (LocalLabels, server, logged-in client)."""
    local = LocalLabels(str(samples), tmp_path / "labels.jsonl", mode=mode)
    server = ThreadServer(local.project, on_change=local.write, title="preftune label")
    try:
        yield local, server, login(server.url, local.token)
    finally:
        server.stop()
        local.close()


@pytest.fixture
def served(tmp_path):
    with label_server(tmp_path, flat_samples(tmp_path / "s.jsonl", prompts=3, k=2)) as running:
        yield running


def raw(server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
        c.sendall(request)
        return c.recv(4096)


def test_blind_cross_site_posts_cannot_undo(served, tmp_path):
    local, server, client = served
    item = client.get("/api/next").json()
    assert client.post("/api/label", json={"item": item["item"], "ranking": [[0], [1]]}).status_code == 200
    cookie = f"Cookie: preftune_session={local.token}\r\n".encode()
    for _ in range(20):  # what any open web page can send without a preflight: the cookie goes along, the CSRF token cannot
        reply = raw(server, b"POST /api/undo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + cookie + b"Content-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}")
        assert reply.split(b" ")[1] == b"403"
    evil = client.post("/api/undo", json={}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403
    assert len(file_rows(tmp_path / "labels.jsonl")) == 1  # the label survived
    reply = raw(server, b"GET /api/next HTTP/1.1\r\nHost: rebind.evil.example\r\n" + cookie + b"\r\n")
    assert reply.split(b" ")[1] == b"400"  # a rebinding host name reads nothing


def test_negative_length_and_bad_utf8_are_400(served):
    local, server, client = served
    reply = raw(server, b"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: -1\r\n\r\n" + b"x" * 1000)
    assert reply.split(b" ")[1] == b"400"  # the HTTP parser refuses it; the old server read a 200 MB body
    r = client.post("/api/label", content=b'"\xff\xfe"', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]


def test_many_simultaneous_connections_are_all_answered(served):
    local, server, _ = served
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(300)]  # the old backlog was 5

    def ask(c):
        c.sendall(f"GET /api/next HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: preftune_session={local.token}\r\nConnection: close\r\n\r\n".encode())
        return c.recv(64).split(b" ")[1]

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(ask, socks))
    for c in socks:
        c.close()
    assert codes == [b"200"] * 300


def test_a_labels_file_without_final_newline_is_not_glued(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"item": "a", "ranking": [[0], [1]]}', encoding="utf-8")  # hand-edited: no newline
    LabelStore(path).append([{"item": "b"}])  # what judge= appends
    assert [r["item"] for r in LabelStore(path).labels] == ["a", "b"]
    samples = flat_samples(tmp_path / "s.jsonl", prompts=1, k=2)
    with label_server(tmp_path, samples) as (_, _, client):  # the web UI rewrites the file whole, keeping both
        item = client.get("/api/next").json()
        assert client.post("/api/label", json={"item": item["item"], "ranking": [[1], [0]]}).status_code == 200
    assert [r["item"] for r in LabelStore(path).labels] == ["a", "b", item["item"]]


def test_every_interface_is_refused_for_the_one_person_page(tmp_path):
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0"):
        from_dict(LabelConfig, {"input": "s.jsonl", "host": "0.0.0.0"}, "label")


def test_keys_in_chromium_enter_after_skip_and_ctrl_s(served, tmp_path):
    from tests.test_collect_browser import browser

    local, server, _ = served
    pw, chromium = browser()
    try:
        page = chromium.new_page()
        page.goto(f"{server.url}/login?token={local.token}")  # the link `preftune label` prints
        page.wait_for_url("**/guidelines")
        page.click("#start")
        page.wait_for_selector("#card1")
        first = page.inner_text(".prompt")
        page.keyboard.press("Control+s")  # not a skip
        page.wait_for_timeout(300)
        assert page.inner_text(".prompt") == first
        page.click("#skip")  # a mouse skip ...
        page.wait_for_function("t => document.querySelector('.prompt').textContent !== t", arg=first)
        second = page.inner_text(".prompt")
        page.keyboard.press("Enter")  # ... then Enter: must not skip the next item too
        page.wait_for_timeout(300)
        assert page.inner_text(".prompt") == second and page.inner_text("#error") == "Label every completion first."
        page.keyboard.press("t")  # a tie between the two
        page.wait_for_function("t => document.querySelector('.prompt').textContent !== t", arg=second)
    finally:
        chromium.close()
        pw.stop()
    assert local.progress()["done"] == 2
    assert [r["ranking"] for r in file_rows(tmp_path / "labels.jsonl")] == [[[0, 1]]]
    assert len(file_rows(tmp_path / "labels.jsonl.skipped.jsonl")) == 1


def test_thumbs_in_chromium_land_on_the_right_completion(tmp_path):
    """The page showed shuffled cards but sent thumbs in display order: labels landed on the wrong completion."""
    from tests.test_collect_browser import browser, thumbs_up_each

    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"P{i}", "completions": ["bad one", "so-so", "good one"]} for i in range(4)])
    with label_server(tmp_path, samples, mode="thumbs") as (local, server, _):
        pw, chromium = browser()
        try:
            thumbs_up_each(chromium.new_page(), f"{server.url}/login?token={local.token}", "good one", 4)
        finally:
            chromium.close()
            pw.stop()
    rows = file_rows(tmp_path / "labels.jsonl")  # KTO rows, as before
    assert [(r["completion"], r["label"]) for r in rows] == [("bad one", False), ("so-so", False), ("good one", True)] * 4


def test_long_text_layout_and_thumbs_words_in_chromium(tmp_path):
    """A 5,000-character word made the page 47,823 px wide; a long completion put Submit 35,000 px down;
    the thumbs buttons were bare emoji; markup in a completion is shown as text."""
    from tests.test_collect_browser import LONG, browser

    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "P", "completions": ["x" * 5000 + " <img src=x onerror=alert(1)>", LONG]}])
    with label_server(tmp_path, samples, mode="thumbs") as (local, server, _):
        pw, chromium = browser()
        try:
            page = chromium.new_page(viewport={"width": 1280, "height": 800})
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"{server.url}/login?token={local.token}")
            page.wait_for_url("**/guidelines")
            page.click("#start")
            page.wait_for_selector("#card1")
            layout = page.evaluate("""() => ({doc: document.documentElement.scrollWidth, view: innerWidth,
                submit: document.getElementById('submit').getBoundingClientRect().bottom,
                buttons: [...document.querySelectorAll('.choices button')].map(b => b.textContent)})""")
            assert layout["doc"] <= layout["view"] and 0 < layout["submit"] <= 800
            assert [b.split(" ")[1] for b in layout["buttons"]] == ["Good", "Bad", "Good", "Bad"]
            assert "<img src=x onerror=alert(1)>" in page.inner_text("#main") and dialogs == []
        finally:
            chromium.close()
            pw.stop()
