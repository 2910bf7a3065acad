"""Annotator/group fields: validation, kept through conversions and tokenization into batches, bad input."""

import logging

import pytest

from preftune.data import DataError, load_records, pairs_to_unpaired, rankings_to_pairs, tokenize_pairs, tokenize_sft
from preftune.data.collate import collate_pairs, collate_shared_pairs
from preftune.data.groups import (check_held_out_groups, condition_on_group, condition_prompt, group_index, group_names,
                                  warn_single_label_annotators)
from preftune.models.tiny import load_tiny_tokenizer
from tests.conftest import write_jsonl


def pair(group="A", annotator="a0", i=0):
    return {"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no", "group": group, "annotator": annotator}


def test_tags_are_validated_and_kept(tmp_path):
    rows = [pair(), pair("B", 7), {"prompt": "Q?", "chosen": " a", "rejected": " b"}]
    recs = load_records(str(write_jsonl(tmp_path / "p.jsonl", rows)), "pairs")
    assert [(r.group, r.annotator) for r in recs] == [("A", "a0"), ("B", "7"), (None, None)]  # ids exported as numbers
    ranking = {"prompt": "Q?", "completions": [" a", " b", " c"], "ranking": [2, 0, 1], "group": "B", "annotator": "x"}
    rank = load_records(str(write_jsonl(tmp_path / "r.jsonl", [ranking])), "rankings")
    assert {(p.group, p.annotator) for p in rankings_to_pairs(rank)} == {("B", "x")}
    unp = pairs_to_unpaired(recs[:1])
    assert [(u.label, u.group, u.annotator) for u in unp] == [(True, "A", "a0"), (False, "A", "a0")]
    single = load_records(str(write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Q", "completion": " a", "label": 1, "group": "A"}])), "unpaired")
    assert single[0].group == "A"


@pytest.mark.parametrize("value, message", [(["A"], "expected a string"), ("  ", "empty string"), (True, "expected a string")])
def test_bad_tag_names_file_row_and_field(tmp_path, value, message):
    path = write_jsonl(tmp_path / "p.jsonl", [pair(), {**pair(), "group": value}])
    with pytest.raises(DataError) as e:
        load_records(str(path), "pairs")
    assert str(e.value).startswith(f"{path}, row 2, field 'group': ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_group_index_rides_into_the_batch(tmp_path):
    tok = load_tiny_tokenizer()
    recs = load_records(str(write_jsonl(tmp_path / "p.jsonl", [pair("B"), pair("A"), pair("B")])), "pairs")
    index = group_index(group_names(recs, "p"))
    assert index == {"A": 0, "B": 1}
    examples, _ = tokenize_pairs(recs, tok, max_length=32, groups=index)
    assert [ex["group"] for ex in examples] == [1, 0, 1]
    for collate in (collate_pairs, collate_shared_pairs):
        assert collate(examples, tok.pad_token_id)["group"].tolist() == [1, 0, 1]
    unpaired = pairs_to_unpaired(recs)
    ex, _ = tokenize_sft(unpaired, tok, max_length=32, groups=index)
    assert [e["group"] for e in ex] == [1, 1, 0, 0, 1, 1]
    with pytest.raises(DataError, match=r"row 1, field 'group': group 'B'; expected one of A"):
        tokenize_pairs(recs, tok, max_length=32, groups={"A": 0}, source="p")


def test_one_group_and_missing_group_are_errors(tmp_path):
    recs = load_records(str(write_jsonl(tmp_path / "p.jsonl", [pair("A"), pair("A", i=1)])), "pairs")
    with pytest.raises(DataError, match=r"p.jsonl, field 'group': the 'group' column has 1 distinct value\(s\) \('A'\)"):
        group_names(recs, str(tmp_path / "p.jsonl"))
    recs = load_records(str(write_jsonl(tmp_path / "q.jsonl", [pair("A"), {"prompt": "Q", "chosen": " a", "rejected": " b"}])), "pairs")
    with pytest.raises(DataError, match=r"q.jsonl, row 2, field 'group': missing field"):
        group_names(recs, str(tmp_path / "q.jsonl"))


def test_held_out_groups(tmp_path, caplog):
    held = load_records(str(write_jsonl(tmp_path / "h.jsonl", [pair("A"), pair("C")])), "pairs")
    with pytest.raises(DataError, match=r"h.jsonl, row 2, field 'group': group 'C' does not occur in the training data"):
        check_held_out_groups(["A", "B"], held, str(tmp_path / "h.jsonl"))
    with caplog.at_level(logging.WARNING, logger="preftune.data"):
        check_held_out_groups(["A", "B"], held[:1], "h.jsonl")
    assert "group(s) 'B' have no held-out rows" in caplog.text


def test_single_label_annotator_warns(tmp_path, caplog):
    recs = load_records(str(write_jsonl(tmp_path / "p.jsonl", [pair(annotator="a0"), pair(annotator="a1", i=1), pair(annotator="a0", i=2)])), "pairs")
    with caplog.at_level(logging.WARNING, logger="preftune.data"):
        assert warn_single_label_annotators(recs, "p.jsonl") == ["a1"]
    assert "p.jsonl, row 2, field 'annotator': 1 annotator(s) gave a single label ('a1')" in caplog.text


def test_condition_prompt_text_and_messages():
    assert condition_prompt("Q?", "B") == "[preferences of group B] Q?"
    user = [{"role": "user", "content": "Q?"}]
    assert condition_prompt(user, "B") == [{"role": "system", "content": "[preferences of group B]"}, *user]
    system = [{"role": "system", "content": "Be brief."}, *user]
    assert condition_prompt(system, "A")[0]["content"] == "[preferences of group A] Be brief."
    recs = load_records("builtin:diverse_pairs", "pairs")
    conditioned = condition_on_group(recs, "builtin:diverse_pairs")
    assert all(c.prompt == f"[preferences of group {r.group}] {r.prompt}" and c.group == r.group for c, r in zip(conditioned, recs))
