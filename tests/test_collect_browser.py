"""The labelling page in headless Chromium (Debian's chromium, driven by Playwright): log in by link,
read the guidelines, rank with the mouse and with the keyboard, skip, undo; the database holds the
result. PREFTUNE_UPDATE_DOCS=1 saves the screenshot as docs/collect-labelling.png. Fails (no skip) when chromium is missing and CI=true."""

import os
import shutil
from pathlib import Path

import pytest

from preftune.collect.project import CollectConfig, create, open_store
from tests.collect_helpers import ThreadServer
from tests.conftest import ROOT, write_jsonl

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
LONG = "\n".join(f"Line {i}: the film was a slow burn, but the ending earned every minute of it." for i in range(300))
HOSTILE = "x" * 5000 + " <script>alert(1)</script> <img src=x onerror=alert(2)> \u202eevil.exe \u200b"


def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    return pw, pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)


def test_label_in_chromium(tmp_path):
    rows = [{"prompt": "Prompt 0: rank these three.", "completions": ["zero", "one", "two"]},
            {"prompt": "Prompt 1: pick one.", "completions": ["p1 first", "p1 second"]},
            {"prompt": "Prompt 2: pick one.", "completions": ["p2 first", "p2 second"]},
            {"prompt": "Prompt 3: write a movie review.", "completions": [LONG, HOSTILE]}]
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    guide = tmp_path / "g.md"
    guide.write_text("# Guidelines\n\nPrefer the **more helpful** answer.\n", encoding="utf-8")
    project = tmp_path / "p"
    create(project, CollectConfig(samples=str(samples), guidelines=str(guide), overlap=3))
    store = open_store(project, CollectConfig())
    token = store.add_annotator("alice")
    store.close()
    server = ThreadServer(project)
    pw, chromium = browser()
    try:
        page = chromium.new_page(viewport={"width": 1280, "height": 800})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{server.url}/login?token={token}")
        page.wait_for_url("**/guidelines")
        assert "Prefer the more helpful answer." in page.inner_text("#guidelines")
        page.click("#start")
        page.wait_for_selector("#card2")

        def shown():  # the item on screen, completion ids in display order
            return page.evaluate("fetch('/api/next').then(r => r.json())")

        def wait_prompt(text):
            page.wait_for_function("t => document.querySelector('.prompt') && document.querySelector('.prompt').textContent.startsWith(t)", arg=text)

        # item 0, mouse: rank the cards showing "one" #1, "zero" #2, "two" #3
        ids = [c["id"] for c in shown()["completions"]]
        want = {1: 1, 0: 2, 2: 3}
        for pos, cid in enumerate(ids):
            page.click(f"#card{pos} button[data-value='{want[cid]}']")
        page.click("#submit")
        wait_prompt("Prompt 1")
        # item 1, keyboard: "1" = A better; Ctrl+S is not a shortcut
        ids1 = [c["id"] for c in shown()["completions"]]
        page.keyboard.press("Control+s")
        page.keyboard.press("1")
        wait_prompt("Prompt 2")
        # item 2: a mouse Skip, then Enter must not skip the next item too
        page.click("#skip")
        wait_prompt("Prompt 3")
        # PREFTUNE_UPDATE_DOCS=1 refreshes the README's screenshot
        shot = ROOT / "docs" / "collect-labelling.png" if os.environ.get("PREFTUNE_UPDATE_DOCS") else tmp_path / "labelling.png"
        page.screenshot(path=str(shot))
        page.keyboard.press("Enter")
        assert page.inner_text("#error") == "Label every completion first."
        # item 3: long text scrolls inside its card, the controls stay on screen, the long word wraps
        layout = page.evaluate("""() => ({doc: document.documentElement.scrollWidth, view: innerWidth,
            submit: document.getElementById('submit').getBoundingClientRect().bottom, marks: document.querySelectorAll('.mark').length,
            scrolls: [...document.querySelectorAll('.text')].map(t => t.scrollHeight > t.clientHeight)})""")
        assert layout["doc"] <= layout["view"] and layout["submit"] <= 800 and layout["marks"] == 2 and layout["scrolls"][0]
        assert "<script>alert(1)</script>" in page.inner_text("#main") and dialogs == []
        # undo (keyboard) brings the skipped item 2 back; "2" = B better
        page.keyboard.press("u")
        wait_prompt("Prompt 2")
        ids2 = [c["id"] for c in shown()["completions"]]
        page.keyboard.press("2")
        wait_prompt("Prompt 3")
        page.click("#tie")
        page.wait_for_selector("text=Nothing left for you to label")
    finally:
        chromium.close()
        pw.stop()
        server.stop()
    store = open_store(project, CollectConfig())
    got = {store.item(r["item_id"])["prompt"][:8]: (r["kind"], r["answer"]) for r in store.current()}
    store.close()
    assert got == {"Prompt 0": ("rank", [[1], [0], [2]]), "Prompt 1": ("rank", [[ids1[0]], [ids1[1]]]),
                   "Prompt 2": ("rank", [[ids2[1]], [ids2[0]]]), "Prompt 3": ("rank", [[0, 1]])}


def thumbs_by_text(page, good_text):
    """Click Good on the card showing ``good_text`` and Bad on every other, then Submit."""
    n = page.locator(".card").count()
    for pos in range(n):
        good = page.inner_text(f"#card{pos} .text") == good_text
        page.click(f"#card{pos} button[data-value='{'true' if good else 'false'}']")
    page.click("#submit")


def thumbs_up_each(page, login_url: str, good_text: str, items: int) -> None:
    """Log in by link, start, and give thumbs up to the completion reading ``good_text`` on ``items`` items."""
    page.goto(login_url)
    page.wait_for_url("**/guidelines")
    page.click("#start")
    for _ in range(items):
        page.wait_for_selector("#card2")
        prompt = page.inner_text(".prompt")
        thumbs_by_text(page, good_text)
        page.wait_for_function("t => !document.querySelector('.prompt') || document.querySelector('.prompt').textContent !== t", arg=prompt)


def test_thumbs_in_chromium_land_on_the_right_completion(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"P{i}", "completions": ["bad one", "so-so", "good one"]} for i in range(3)])
    project = tmp_path / "p"
    create(project, CollectConfig(samples=str(samples), mode="thumbs"))
    store = open_store(project, CollectConfig())
    token = store.add_annotator("alice")
    store.close()
    server = ThreadServer(project)
    pw, chromium = browser()
    try:
        thumbs_up_each(chromium.new_page(), f"{server.url}/login?token={token}", "good one", 3)
    finally:
        chromium.close()
        pw.stop()
        server.stop()
    store = open_store(project, CollectConfig())
    answers = [r["answer"] for r in store.current()]
    store.close()
    assert answers == [[False, False, True]] * 3  # whatever order the cards were shown in
