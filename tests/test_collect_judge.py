"""The LLM judge: the position-swap rule and the K-wise Borda are pure and hand-checked; the judge
itself runs end to end on a tiny random model through `preftune label` and `preftune collect judge`."""

import json

import pytest

from preftune.collect.judge import agreement_with_gold, combine, parse_spec, ranking_from_pairs
from preftune.collect.project import CollectConfig, open_store
from tests.collect_helpers import make_project
from tests.conftest import write_jsonl


def test_position_swap_rule():
    assert combine(2.0, -1.0) == (0, True)  # A first: A; B first: the second shown (A) -> a wins, consistent
    assert combine(-0.5, 3.0) == (1, True)  # b wins both ways
    assert combine(1.0, 1.0) == (None, False)  # "the first one" both times: a position, not a completion -> tie
    assert combine(0.0, -1.0) == (None, False)


def test_kwise_borda_from_pairs():
    # 0 beats 1 and 2, 1 and 2 tie: scores 2, 0.5, 0.5
    assert ranking_from_pairs(3, {(0, 1): 0, (0, 2): 0, (1, 2): None}) == [[0], [1, 2]]
    assert ranking_from_pairs(2, {(0, 1): None}) == [[0, 1]]


def test_agreement_with_gold():
    margins = {(0, 1): (2.0, -1.0), (0, 2): (3.0, 1.0), (1, 2): (-1.0, 0.5)}
    results = [{"asked": 3, "consistent": 2, "pairs": {(0, 1): 0, (0, 2): None, (1, 2): 1}, "margins": margins}]
    # gold 0 > 2 > 1: (0,1) judge 0 ok; (0,2) judge tie; (1,2) judge 2 ok -> 2 of 2 decided; ties as half: 2.5 / 3
    out = agreement_with_gold(results, [[0.9, 0.1, 0.5]])
    assert out["position_consistency"] == pytest.approx(2 / 3) and out["agreement_when_decided"] == 1.0
    assert out["agreement_ties_as_half"] == pytest.approx(2.5 / 3) and out["decided"] == 2
    # mean margins m_ab - m_ba: 3 (0 wins, ok), 2 (0 wins, ok), -1.5 (2 wins, ok); first shown won 4 of 6 (2, 3; 1, 0.5 > 0)
    assert out["agreement_balanced_margin"] == 1.0 and out["first_position_rate"] == pytest.approx(4 / 6)
    assert agreement_with_gold(results, [[0.9, 0.1, 0.5]], tolerance=0.5)["gold_pairs"] == 1  # only (0,1) differs by > 0.5


def test_parse_spec():
    assert parse_spec("llm") == "smollm2-135m-instruct" and parse_spec("llm:tiny-random-llama") == "tiny-random-llama"
    assert parse_spec("vader") is None


def test_label_and_collect_with_a_tiny_llm_judge(tmp_path, capsys):
    from preftune.cli import main

    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"Review {i}:", "completions": ["great film", "dull", "fine"]} for i in range(2)])
    out = tmp_path / "labels.jsonl"
    assert main(["label", f"input={samples}", f"output={out}", "judge=llm:tiny-random-llama"]) == 0
    printed = capsys.readouterr().out
    assert "2 of 2 items done" in printed and "position consistency" in printed
    # a random model mostly prefers a position, so its items may all be ties (skipped); every item got one or the other
    files = [out, tmp_path / "labels.jsonl.skipped.jsonl"]
    rows = [json.loads(x) for f in files if f.exists() for x in f.read_text().splitlines()]
    assert len(rows) == 2 and all(r["annotator"] == "judge:llm:tiny-random-llama" for r in rows)
    assert all(r["judge_pairs"] == 3 for r in rows if "ranking" in r)
    project, tokens, _ = make_project(tmp_path, n=2, k=3)
    assert main(["collect", "judge", str(project), "judge=llm:tiny-random-llama"]) == 0
    assert "answered 2 items" in capsys.readouterr().out
    store = open_store(project, CollectConfig())
    assert len(store.current(store.annotator_id("judge:llm:tiny-random-llama"))) == 2
    store.close()
    assert main(["collect", "status", str(project)]) == 0
    assert "judge:llm:tiny-random-llama: 2 answered" in capsys.readouterr().out
