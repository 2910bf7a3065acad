"""Collecting preferences: samples -> labels (web UI or judge) -> training data."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from preftune.data.loaders import load_records, rankings_to_pairs
from preftune.data.records import DataError
from preftune.label import LabelConfig, build_session
from preftune.label.items import load_items
from preftune.label.server import make_server
from preftune.label.session import LabelError, LabelSession, ranking_from_scores
from preftune.label.store import LabelStore
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
    for ranking, words in (([0, 1], "does not place completion\\(s\\) 2"), ([0, 1, 1, 2], "more than once"), ([[0, 1, 2]], "every completion is tied"),
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
    from preftune.rollout.rewards import resolve_reward

    counts = s.judge(resolve_reward(JUDGE), threshold=0.3, progress=False)
    assert counts == {"labelled": 2, "skipped_all_tied": 0}
    records = load_records(str(tmp_path / "labels.jsonl"), "unpaired")
    rows = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(records) == 4 and [r.label for r in records] == [row["label"] for row in rows]
    assert all(r["label"] == (r["scores"][i % 2] > 0.3) for i, r in enumerate(rows))


def _request(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    return status, raw


def test_web_ui_round_trip(tmp_path):
    s = session_for(tmp_path, prompts=2, k=2)
    server = make_server(s, "127.0.0.1", 0, exit_when_done=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        status, page = _request(base + "/")
        assert status == 200 and b"<html" in page and b"/api/label" in page
        status, raw = _request(base + "/api/next")
        item = json.loads(raw)
        assert status == 200 and item["mode"] == "rank" and len(item["completions"]) == 2
        status, raw = _request(base + "/api/label", {"key": item["key"], "ranking": [[0, 1]]})
        assert status == 400 and "tied" in json.loads(raw)["error"]
        status, raw = _request(base + "/api/label", {"key": item["key"], "ranking": [[1], [0]]})
        nxt = json.loads(raw)
        assert status == 200 and nxt["done"] == 1 and nxt["key"] != item["key"] and nxt["can_undo"]
        status, raw = _request(base + "/api/undo", {})
        assert status == 200 and json.loads(raw)["key"] == item["key"]
        _request(base + "/api/label", {"key": item["key"], "ranking": [[1], [0]]})
        status, raw = _request(base + "/api/label", {"key": nxt["key"], "skip": True})
        assert status == 200 and json.loads(raw)["finished"] is True
        thread.join(timeout=10)
        assert not thread.is_alive()  # exit_when_done
    finally:
        server.shutdown() if thread.is_alive() else None
        server.server_close()
    (record,) = load_records(str(tmp_path / "labels.jsonl"), "rankings")
    assert record.ranking == [[1], [0]]


def test_output_must_differ_from_input(tmp_path):
    from preftune.config import ConfigError, from_dict

    samples = flat_samples(tmp_path / "s.jsonl")
    cfg = from_dict(LabelConfig, {"input": str(samples), "output": str(samples)}, "label")
    with pytest.raises(ConfigError, match="must differ"):
        build_session(cfg)


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
