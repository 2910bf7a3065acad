"""The collection store: task distribution with overlap, append-only labels, undo, export formats."""

import json

import pytest

from preftune.collect.export import export
from preftune.collect.project import CollectConfig, create, open_store, status
from preftune.collect.store import StoreError
from preftune.data.loaders import load_records
from preftune.data.records import DataError
from tests.conftest import write_jsonl


def samples(path, n=4, k=3, gold=None):
    rows = [{"prompt": f"Q{p}?", "completions": [f"answer {p}.{s}" for s in range(k)]} for p in range(n)]
    if gold is not None:
        rows[0]["gold"] = gold
    return str(write_jsonl(path, rows))


def project(tmp_path, overlap=3, **kw):
    cfg = CollectConfig(samples=samples(tmp_path / "s.jsonl", **kw), overlap=overlap)
    info = create(tmp_path / "p", cfg)
    store = open_store(tmp_path / "p", cfg)
    ids = {name: store.authenticate(store.add_annotator(name))["id"] for name in ("a", "b", "c", "d")}
    return store, ids, info


def test_overlap_fewest_first_and_nobody_twice(tmp_path):
    store, ids, info = project(tmp_path, overlap=2, n=2)
    assert info["added"] == 2 and info["admin_token"]
    seen = {}
    for name in ("a", "b", "c", "d"):
        item = store.next_item(ids[name], overlap=2)
        assert store.next_item(ids[name], overlap=2)["id"] == item["id"]  # the open assignment comes back
        store.submit(ids[name], item["id"], "rank", [[0], [1, 2]])
        seen[name] = item["id"]
    # a, b get different items (fewest answers first), c and d the remaining slots: each item twice
    assert seen["a"] != seen["b"] and sorted(seen.values()).count(seen["a"]) == 2
    for name in ids:  # nobody gets an item twice; both items are full
        nxt = store.next_item(ids[name], overlap=2)
        assert nxt is None or nxt["id"] != seen[name]
    assert all(store.next_item(ids[n], overlap=2) is None for n in ids)


def test_append_only_undo_revise_and_refusals(tmp_path):
    store, ids, _ = project(tmp_path, overlap=1, n=3)
    item = store.next_item(ids["a"], 1)
    store.submit(ids["a"], item["id"], "rank", [[0], [1], [2]], submission="s1")
    with pytest.raises(StoreError) as err:
        store.submit(ids["a"], item["id"], "rank", [[2], [1], [0]])
    assert err.value.status == 409 and "already answered" in str(err.value)
    with pytest.raises(StoreError) as err:
        store.submit(ids["a"], item["id"], "rank", [[2], [1], [0]], submission="s1", revise=True)
    assert err.value.status == 409 and "already received" in str(err.value)
    with pytest.raises(StoreError) as err:  # b was never given this item
        store.submit(ids["b"], item["id"], "rank", [[0], [1], [2]])
    assert err.value.status == 403
    with pytest.raises(StoreError) as err:
        store.submit(ids["a"], "nope", "rank", [[0], [1], [2]])
    assert err.value.status == 404
    store.submit(ids["a"], item["id"], "rank", [[2], [1], [0]], revise=True)
    assert store.undo(ids["a"]) == item["id"]
    assert store.current(ids["a"]) == [] and store.count_rows() == 3  # nothing deleted: 2 answers + 1 undo
    assert store.next_item(ids["a"], 1)["id"] == item["id"]  # back to them after undo
    store.submit(ids["a"], item["id"], "rank", [[1], [0, 2]])
    assert [r["answer"] for r in store.current(ids["a"])] == [[[1], [0, 2]]]


def test_export_formats_and_status(tmp_path):
    store, ids, _ = project(tmp_path, overlap=3, n=1, gold=None)
    answers = {"a": [[0], [1], [2]], "b": [[1], [0], [2]], "c": [[0], [1], [2]]}
    for name, ranking in answers.items():
        item = store.next_item(ids[name], 3)
        store.submit(ids[name], item["id"], "rank", ranking)
    s = status(store)
    assert s["items_complete"] == 1 and s["agreement"]["pairwise_agreement"] == pytest.approx(7 / 9)
    out = tmp_path / "pairs.jsonl"
    res = export(store, CollectConfig(output=str(out), format="pairs", consensus="majority"))
    pairs = load_records(str(out), "pairs")
    assert res["rows"] == 3 and {(p.chosen, p.rejected) for p in pairs} == {
        ("answer 0.0", "answer 0.1"), ("answer 0.0", "answer 0.2"), ("answer 0.1", "answer 0.2")}
    export(store, CollectConfig(output=str(tmp_path / "r.jsonl"), rows="annotators"))
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted(r["annotator"] for r in rows) == ["a", "b", "c"] and len(load_records(str(tmp_path / "r.jsonl"), "rankings")) == 3
    export(store, CollectConfig(output=str(tmp_path / "u.parquet"), format="unpaired"))
    unpaired = load_records(str(tmp_path / "u.parquet"), "unpaired")
    assert [u.label for u in unpaired] == [True, False, False]  # top group up, by majority
    export(store, CollectConfig(output=str(tmp_path / "ds"), format="rankings"))
    (rec,) = load_records(str(tmp_path / "ds"), "rankings")
    assert rec.ranking == [[0], [1], [2]]
    with pytest.raises(Exception, match="no labels"):
        export(store, CollectConfig(output=str(tmp_path / "x.jsonl"), min_agreement=0.9))


def test_gold_accuracy(tmp_path):
    store, ids, info = project(tmp_path, overlap=1, n=2, gold=[2, 1, 0])
    assert info["gold"] == 1
    gold_id = [i for i, it in store.items().items() if it["gold"]][0]
    for name, ranking in (("a", [[2], [1], [0]]), ("b", [[0], [1], [2]])):
        while (item := store.next_item(ids[name], 1))["id"] != gold_id:  # the gold item goes to everyone
            store.submit(ids[name], item["id"], "skip")
        store.submit(ids[name], gold_id, "rank", ranking)
    assert status(store)["gold_accuracy"] == {"a": 1.0, "b": 0.0}


def test_lone_surrogate_names_row_and_field(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "p", "completions": ["ok"]}\n{"prompt": "q", "completions": ["a", "\\ud800"]}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        create(tmp_path / "p", CollectConfig(samples=str(path), mode="thumbs"))
    assert f"{path}, row 2, field 'completions'" in str(err.value) and "lone surrogate" in str(err.value)


def test_ties_and_both_bad_in_exports(tmp_path):
    store, ids, _ = project(tmp_path, overlap=1, n=2, k=2)
    first = store.next_item(ids["a"], 1)
    store.submit(ids["a"], first["id"], "rank", [[0, 1]])  # a tie: no pair, no thumbs
    second = store.next_item(ids["a"], 1)
    store.submit(ids["a"], second["id"], "both_bad")
    export(store, CollectConfig(output=str(tmp_path / "u.jsonl"), format="unpaired", rows="annotators"))
    rows = [json.loads(x) for x in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert [(r["item"], r["label"]) for r in rows] == [(second["id"], False), (second["id"], False)]
    with pytest.raises(Exception, match="no labels"):  # neither gives a pair
        export(store, CollectConfig(output=str(tmp_path / "p.jsonl"), format="pairs"))
    assert status(store)["agreement"]["pairwise_agreement"] is None  # one annotator per item: nothing to compare
    for rows_kind in ("annotators", "consensus"):  # as rankings, a tie is a row of one group: stored, read back, no pairs
        out = tmp_path / f"r-{rows_kind}.jsonl"
        export(store, CollectConfig(output=str(out), format="rankings", rows=rows_kind))
        records = load_records(str(out), "rankings")
        assert [r.ranking for r in records] == [[[0, 1]], [[0, 1]]]
        raw = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r.get("both_bad", False) for r in raw] == [False, rows_kind == "annotators"]
