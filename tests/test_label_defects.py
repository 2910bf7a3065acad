"""The one-person `preftune label` page: each defect found when it was tried as a new user would, with
the test that shows it fixed (cross-site POSTs, DNS rebinding, backlog, Content-Length, UTF-8,
newline-less labels files, binding to every interface, keyboard handling)."""

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from preftune.config import ConfigError, from_dict
from preftune.label import LabelConfig
from preftune.label.server import make_server
from preftune.label.store import LabelStore
from tests.test_label import _request, session_for


@pytest.fixture
def served(tmp_path):
    s = session_for(tmp_path, prompts=3, k=2)
    server = make_server(s, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield s, server, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def raw(server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as c:
        c.sendall(request)
        reply = b""
        while chunk := c.recv(4096):  # the server answers HTTP/1.0 and closes
            reply += chunk
        return reply


def test_blind_cross_site_posts_cannot_undo(served, tmp_path):
    s, server, base = served
    item = json.loads(_request(base + "/api/next")[1])
    assert _request(base + "/api/label", {"key": item["key"], "ranking": [[0], [1]]})[0] == 200
    for _ in range(20):  # what any open web page can send without a preflight
        reply = raw(server, b"POST /api/undo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}")
        assert reply.split(b" ")[1] == b"415"
    reply = raw(server, b"POST /api/undo HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    assert reply.split(b" ")[1] == b"403"
    assert len(LabelStore(tmp_path / "labels.jsonl").labels) == 1  # the label survived
    reply = raw(server, b"GET /api/next HTTP/1.1\r\nHost: rebind.evil.example\r\n\r\n")
    assert reply.split(b" ")[1] == b"400"  # a rebinding host name reads nothing


def test_negative_length_and_bad_utf8_are_400(served):
    _, server, _ = served
    reply = raw(server, b"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: -1\r\n\r\n" + b"x" * 1000)
    assert reply.split(b" ")[1] == b"400" and b"non-negative" in reply
    reply = raw(server, b"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\n\"\xff\xfe\"")
    assert reply.split(b" ")[1] == b"400" and b"UTF-8" in reply


def test_many_simultaneous_connections_are_all_answered(served):
    _, server, _ = served
    socks = [socket.create_connection(("127.0.0.1", server.server_port), timeout=30) for _ in range(300)]  # backlog was 5

    def ask(c):
        c.sendall(b"GET /api/next HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return c.recv(64).split(b" ")[1]

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(ask, socks))
    for c in socks:
        c.close()
    assert codes == [b"200"] * 300


def test_a_labels_file_without_final_newline_is_not_glued(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"item": "a", "ranking": [[0], [1]]}', encoding="utf-8")  # hand-edited: no newline
    LabelStore(path).append([{"item": "b"}])
    assert [r["item"] for r in LabelStore(path).labels] == ["a", "b"]


def test_every_interface_is_refused_without_a_login(tmp_path):
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0"):
        from_dict(LabelConfig, {"input": "s.jsonl", "host": "0.0.0.0"}, "label")


def test_keys_in_chromium_enter_after_skip_and_ctrl_s(served):
    from tests.test_collect_browser import browser

    s, server, base = served
    pw, chromium = browser()
    try:
        page = chromium.new_page()
        page.goto(base + "/")
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
        assert s.progress()["done"] == 1
    finally:
        chromium.close()
        pw.stop()


def test_thumbs_in_chromium_land_on_the_right_completion(tmp_path):
    """The page showed shuffled cards but sent thumbs in display order: labels landed on the wrong completion."""
    from preftune.label.items import load_items
    from preftune.label.session import LabelSession
    from tests.conftest import write_jsonl
    from tests.test_collect_browser import browser, thumbs_by_text

    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"P{i}", "completions": ["bad one", "so-so", "good one"]} for i in range(4)])
    s = LabelSession(load_items(str(samples), min_completions=1), LabelStore(tmp_path / "l.jsonl"), mode="thumbs")
    server = make_server(s, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pw, chromium = browser()
    try:
        page = chromium.new_page()
        page.goto(f"http://127.0.0.1:{server.server_port}/")
        for _ in range(4):
            page.wait_for_selector("#card2")
            prompt = page.inner_text(".prompt")
            thumbs_by_text(page, "good one")
            page.wait_for_function("t => !document.querySelector('.prompt') || document.querySelector('.prompt').textContent !== t", arg=prompt)
    finally:
        chromium.close()
        pw.stop()
        server.shutdown()
        server.server_close()
    rows = LabelStore(tmp_path / "l.jsonl").labels
    assert [(r["completion"], r["label"]) for r in rows] == [("bad one", False), ("so-so", False), ("good one", True)] * 4


def test_undo_survives_a_restart_and_works_after_the_last_item(tmp_path):
    s = session_for(tmp_path, prompts=2, k=2)
    for _ in range(2):
        s.rank(s.next_item()["key"], [[1], [0]])
    assert s.next_item() is None
    s2 = session_for(tmp_path, prompts=2, k=2)  # a restart: a new session on the same files
    last = s2.undo()
    assert last is not None and s2.next_item()["key"] == last and s2.progress() == {"done": 1, "total": 2}
    server = make_server(s2, "127.0.0.1", 0)  # what `preftune label` serves: it stays up when all is done
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        done = json.loads(_request(base + "/api/label", {"key": last, "ranking": [[0], [1]]})[1])
        assert done["finished"] is True and done["can_undo"]
        assert json.loads(_request(base + "/api/undo", {})[1])["key"] == last  # undo on the last item
    finally:
        server.shutdown()
        server.server_close()


def test_long_text_layout_and_thumbs_words_in_chromium(tmp_path):
    """A 5,000-character word made the page 47,823 px wide; a long completion put Submit 35,000 px down;
    the thumbs buttons were bare emoji."""
    from preftune.label.items import load_items
    from preftune.label.session import LabelSession
    from tests.conftest import write_jsonl
    from tests.test_collect_browser import LONG, browser

    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "P", "completions": ["x" * 5000, LONG]}])
    s = LabelSession(load_items(str(samples), min_completions=1), LabelStore(tmp_path / "l.jsonl"), mode="thumbs")
    server = make_server(s, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pw, chromium = browser()
    try:
        page = chromium.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"http://127.0.0.1:{server.server_port}/")
        page.wait_for_selector("#card1")
        layout = page.evaluate("""() => ({doc: document.documentElement.scrollWidth, view: innerWidth,
            submit: document.getElementById('submit').getBoundingClientRect().bottom,
            buttons: [...document.querySelectorAll('.choices button')].map(b => b.textContent)})""")
        assert layout["doc"] <= layout["view"] and 0 < layout["submit"] <= 800
        assert [b.split(" ")[1] for b in layout["buttons"]] == ["Good", "Bad", "Good", "Bad"]
    finally:
        chromium.close()
        pw.stop()
        server.shutdown()
        server.server_close()
