"""Collecting preferences: samples -> labels (web UI or judge) -> training data."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from preftune.collect.shortcut import LabelConfig
from preftune.config import ConfigError, from_dict
from preftune.data.loaders import load_records, rankings_to_pairs
from preftune.data.records import DataError
from preftune.label.items import load_items
from preftune.label.session import LabelError, LabelSession, ranking_from_scores
from preftune.label.store import LabelStore
from tests.collect_helpers import login
from tests.conftest import ROOT, cli, write_jsonl

JUDGE = f"{ROOT / 'tests' / 'rl_reward.py'}:low_ids"


def flat_samples(path, prompts=3, k=3):
    """`preftune generate num_samples=k` output: prompt-major flat rows."""
    rows = [{"prompt": f"Review {p}:", "completion": f" sample {p}.{s} " + "good " * s, "sample": s}
            for p in range(prompts) for s in range(k)]
    return write_jsonl(path, rows)


def test_items_from_flat_and_grouped_rows(tmp_path):
    items = load_items(str(flat_samples(tmp_path / "s.jsonl", prompts=3, k=3)))
    assert [len(it.completions) for it in items] == [3, 3, 3]
    assert items[1].rows == [4, 5, 6] and items[1].prompt == "Review 1:"
    assert len({it.key for it in items}) == 3
    grouped = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "completions": ["a", "b"]}])
    (item,) = load_items(str(grouped))
    assert item.completions == ["a", "b"] and item.rows == [1]


@pytest.mark.parametrize("rows, row, field, words", [
    ([{"prompt": "p", "completion": "a"}, {"prompt": "q", "completion": "b"}], 1, "completions", "1 completion(s)"),
    ([{"prompt": "p", "completions": "a b"}], 1, "completions", "expected a list"),
    ([{"prompt": "p", "completions": ["a", ""]}], 1, "completions", "completion 1: empty"),
    ([{"prompt": "p", "completion": "a"}, {"prompt": "p", "text": "b"}], 2, "completions", "missing field"),
    ([{"completion": "a"}], 1, "prompt", "missing field"),
])  # fmt: skip
def test_bad_samples_name_file_row_and_field(tmp_path, rows, row, field, words):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_items(str(path))
    message = str(err.value)
    assert str(path) in message and f"row {row}" in message and f"field '{field}'" in message and words in message


def test_ranking_from_scores_ties():
    assert ranking_from_scores([0.1, 0.9, 0.5]) == [[1], [2], [0]]
    assert ranking_from_scores([0.5, 0.5, 0.1]) == [[0, 1], [2]]
    assert ranking_from_scores([0.30, 0.35, 0.0], tie_tolerance=0.06) == [[1, 0], [2]]


def session_for(tmp_path, mode="rank", prompts=3, k=3):
    items = load_items(str(flat_samples(tmp_path / "s.jsonl", prompts, k)), min_completions=2 if mode == "rank" else 1)
    return LabelSession(items, LabelStore(tmp_path / "labels.jsonl"), mode=mode, annotator="ann")


def test_labels_are_training_data_and_resume(tmp_path):
    s = session_for(tmp_path)
    first = s.next_item()
    assert sorted(c["id"] for c in first["completions"]) == [0, 1, 2] and first["done"] == 0 and first["total"] == 3
    s.rank(first["key"], [2, [0, 1]])
    second = s.next_item()
    s.skip(second["key"])
    # a new session on the same files resumes after what is on disk
    s2 = session_for(tmp_path)
    assert s2.progress() == {"done": 2, "total": 3} and s2.next_item()["prompt"] == "Review 2:"
    records = load_records(str(tmp_path / "labels.jsonl"), "rankings")
    assert len(records) == 1 and records[0].ranking == [[2], [0, 1]] and records[0].prompt == "Review 0:"
    pairs = rankings_to_pairs(records)
    assert {(p.chosen, p.rejected) for p in pairs} == {(records[0].completions[2], records[0].completions[i]) for i in (0, 1)}
    skipped = [json.loads(x) for x in (tmp_path / "labels.jsonl.skipped.jsonl").read_text().splitlines()]
    assert [r["item"] for r in skipped] == [second["key"]]


def test_bad_labels_are_refused_and_undo(tmp_path):
    s = session_for(tmp_path)
    key = s.next_item()["key"]
    for ranking, words in (([0, 1], "does not place completion\\(s\\) 2"), ([0, 1, 1, 2], "more than once"),
                           ([0, 1, 7], "names completion 7"), ("0,1,2", "expected a non-empty list")):
        with pytest.raises(LabelError, match=words):
            s.rank(key, ranking)
    with pytest.raises(LabelError, match="unknown item"):
        s.rank("nope", [0, 1, 2])
    with pytest.raises(LabelError, match="not thumbs|not rankings"):
        s.thumbs(key, [True, False, True])
    s.rank(key, [0, 1, 2])
    with pytest.raises(LabelError, match="already labelled"):
        s.rank(key, [2, 1, 0])
    assert s.undo() == key and s.next_item()["key"] == key  # back, and the file no longer has it
    assert not (tmp_path / "labels.jsonl").read_text().strip()
    assert s.undo() is None
    assert s.rank(key, [[0, 1, 2]]) == [[0, 1, 2]]  # all tied is a label too: a ranking of one group, no pairs
    (record,) = load_records(str(tmp_path / "labels.jsonl"), "rankings")
    assert record.ranking == [[0, 1, 2]] and rankings_to_pairs([record]) == []


def test_a_write_cut_short_is_set_aside_and_a_corrupt_line_is_an_error(tmp_path):
    s = session_for(tmp_path)
    s.rank(s.next_item()["key"], [0, 1, 2])
    path = tmp_path / "labels.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"item": "abc", "ranki')  # a crash mid-write
    s2 = session_for(tmp_path)
    assert s2.progress()["done"] == 1
    assert (tmp_path / "labels.jsonl.partial").read_bytes() == b'{"item": "abc", "ranki'
    assert path.read_text().endswith("}\n")
    path.write_text(path.read_text() + "not json\n" + path.read_text())
    with pytest.raises(DataError, match="row 2"):
        session_for(tmp_path)


def test_judge_thumbs_mode_writes_kto_rows(tmp_path):
    s = session_for(tmp_path, mode="thumbs", prompts=2, k=2)
    from preftune.rewards.spec import resolve_reward

    counts = s.judge(resolve_reward(JUDGE), threshold=0.3, progress=False)
    assert counts == {"labelled": 2, "skipped_all_tied": 0}
    records = load_records(str(tmp_path / "labels.jsonl"), "unpaired")
    rows = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(records) == 4 and [r.label for r in records] == [row["label"] for row in rows]
    assert all(r["label"] == (r["scores"][i % 2] > 0.3) for i, r in enumerate(rows))


def label_subprocess(*args):
    """`preftune label ARGS port=0` in a subprocess: (process, base url, logged-in client)."""
    proc = subprocess.Popen([sys.executable, "-m", "preftune", "label", *args, "port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"preftune label did not start: {proc.stderr.read()}")
    link = re.search(r"open (http://\S+) ", line).group(1)
    base, token = link.split("/login?token=")
    return proc, base, login(base, token)


def file_rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_web_ui_ties_undo_kill_and_restart(tmp_path):
    """Every acknowledged label is in the file before the reply (a SIGKILL loses none); a tie of two is
    a label; undo works on the last item and after a restart."""
    samples = flat_samples(tmp_path / "s.jsonl", prompts=3, k=2)
    out = tmp_path / "labels.jsonl"
    proc, base, client = label_subprocess(f"input={samples}", f"output={out}")
    try:
        assert httpx.get(base + "/").status_code == 401  # the page needs the printed link
        page = client.get("/")
        assert page.status_code == 200 and "preftune label: s.jsonl" in page.text and "textContent" in page.text
        item = client.get("/api/next").json()
        assert item["mode"] == "rank" and len(item["completions"]) == 2 and item["progress"]["items"] == 3
        tie = client.post("/api/label", json={"item": item["item"], "ranking": [[0, 1]]})  # a tie between the two
        assert tie.status_code == 200
        (row,) = file_rows(out)
        assert row["ranking"] == [[0, 1]] and row["item"] == item["item"] and row["annotator"] == "local" and "labelled_at" in row
        second = client.get("/api/next").json()
        assert client.post("/api/label", json={"item": second["item"], "ranking": [[1], [0]]}).status_code == 200
        assert client.post("/api/undo", json={}).json() == {"undone": second["item"]}
        assert [r["item"] for r in file_rows(out)] == [item["item"]]  # the undone label left the file too
        assert client.get("/api/next").json()["item"] == second["item"]
        assert client.post("/api/label", json={"item": second["item"], "ranking": [[1], [0]]}).status_code == 200
        last = client.get("/api/next").json()
        assert client.post("/api/label", json={"item": last["item"], "skip": True}).status_code == 200
        assert client.get("/api/next").json()["item"] is None  # all done, and the server is still up:
        assert client.post("/api/undo", json={}).json() == {"undone": last["item"]}  # undo on the last item
        assert client.post("/api/label", json={"item": last["item"], "skip": True}).status_code == 200
        assert [r["item"] for r in file_rows(Path(str(out) + ".skipped.jsonl"))] == [last["item"]]
    finally:
        proc.kill()  # SIGKILL: no chance to write anything more
        proc.wait()
    records = load_records(str(out), "rankings")
    assert [r.ranking for r in records] == [[[0, 1]], [[1], [0]]]
    assert len(rankings_to_pairs(records)) == 1  # the tie gives no pair, the ranking one
    proc, base, client = label_subprocess(f"input={samples}", f"output={out}")  # a restart
    try:
        assert client.get("/api/next").json()["item"] is None
        assert client.post("/api/undo", json={}).json() == {"undone": last["item"]}  # undo survives the restart
        assert client.get("/api/next").json()["item"] == last["item"]
        assert not file_rows(Path(str(out) + ".skipped.jsonl"))
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and f"labels in {out}: 2 of 3 items done" in stdout


def test_labels_of_an_earlier_version_are_imported_and_kept(tmp_path):
    """A labels file written before the web UI had a database (or by judge=) is taken over: its labels
    count, nothing is asked again, rows of other items stay as they are."""
    from preftune.collect.local import LocalLabels

    s = session_for(tmp_path, prompts=3, k=3)
    s.rank(s.next_item()["key"], [2, [0, 1]], scores=[0.1, 0.1, 0.9])  # e.g. a judge's row
    s.skip(s.next_item()["key"])
    out = tmp_path / "labels.jsonl"
    other = {"prompt": "elsewhere", "completions": ["a", "b"], "ranking": [[1], [0]], "item": "0123456789abcdef"}
    out.write_text(out.read_text() + json.dumps(other))  # a hand-added row, without a final newline
    before = file_rows(out)
    local = LocalLabels(str(tmp_path / "s.jsonl"), out)
    try:
        assert local.imported == 2 and local.progress() == {"done": 2, "total": 3}
        assert local.store.next_item(local.store.annotator_id("local"), 1)["prompt"] == "Review 2:"
        after = file_rows(out)
        assert after == [other, before[0]]  # the same rows, the scores kept
        assert local.store.current()[0]["answer"] == [[2], [0, 1]] and local.store.annotators()[local.store.current()[0]["annotator_id"]] == "ann"
        assert [r["item"] for r in file_rows(Path(str(out) + ".skipped.jsonl"))] == [s.history[1]]
    finally:
        local.close()
    again = LocalLabels(str(tmp_path / "s.jsonl"), out)  # reopened: nothing imported twice
    try:
        assert again.imported == 0 and again.progress()["done"] == 2 and file_rows(out) == after
    finally:
        again.close()


def test_output_must_differ_from_input(tmp_path):
    from preftune.collect.shortcut import label

    samples = flat_samples(tmp_path / "s.jsonl")
    cfg = from_dict(LabelConfig, {"input": str(samples), "output": str(samples)}, "label")
    with pytest.raises(ConfigError, match="must differ"):
        label(cfg)


def test_cli_judge_then_train_dpo_on_the_labels(tmp_path):
    samples = flat_samples(tmp_path / "s.jsonl", prompts=6, k=3)
    out = tmp_path / "labels.jsonl"
    proc = cli("label", f"input={samples}", f"output={out}", f"judge={JUDGE}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"labels in {out}: 6 of 6 items done, labelled: 6" in proc.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(r["annotator"] == f"judge:{JUDGE}" and len(r["scores"]) == 3 for r in rows)
    # the scores decide the order: best first
    for r in rows:
        flat = [i for group in r["ranking"] for i in group]
        assert [r["scores"][i] for i in flat] == sorted(r["scores"], reverse=True)
    proc = cli("train", str(ROOT / "configs" / "dpo.yaml"), "model.name=tiny-random-llama", f"data.path={out}",
               f"output_dir={tmp_path / 'dpo'}", "train.max_steps=2", "train.progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1 and abs(metrics[0]["loss"] - 0.6931) < 1e-3  # policy = reference at step 1
    # the same command again finds nothing left to do and keeps the labels
    proc = cli("label", f"input={samples}", f"output={out}", f"judge={JUDGE}")
    assert proc.returncode == 0 and out.read_text().count("\n") == 6
