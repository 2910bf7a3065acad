"""Agreement and consensus: every expected number is worked out by hand in the comment above it."""

import math

import pytest

from preftune.collect.agreement import (annotator_vs_others, fleiss_kappa, item_agreement, krippendorff_alpha_ordinal,
                                        mid_ranks, pair_signs, pairwise_agreement, ranking_alpha)
from preftune.collect.consensus import borda, bradley_terry, consensus, majority, majority_pairs, thumbs_majority

A = [[0], [1], [2]]
B = [[1], [0], [2]]
THREE = {"x": {"a": A, "b": B, "c": A}}


def test_pair_signs_and_mid_ranks():
    assert pair_signs([[2], [0, 1]]) == {(0, 1): 0, (0, 2): -1, (1, 2): -1}
    assert mid_ranks([[1], [0, 2]]) == {1: 1.0, 0: 2.5, 2: 2.5}


def test_pairwise_agreement():
    # a-b agree on (0,2),(1,2) not (0,1): 2/3; a-c 3/3; b-c 2/3 -> 7 of 9 judgements
    assert item_agreement({"a": A, "b": B}) == pytest.approx(2 / 3)
    out = pairwise_agreement({**THREE, "lonely": {"a": A}})
    assert out["per_item"] == {"x": pytest.approx(7 / 9)} and out["overall"] == pytest.approx(7 / 9)


def test_fleiss_kappa_hand_worked():
    # subjects (0,1): {+:2, -:1} P=(4+1-3)/6=1/3; (0,2), (1,2): {+:3} P=1 -> P_bar=7/9
    # categories: + 8 of 9, - 1 of 9 -> P_e=65/81; kappa=(63/81-65/81)/(16/81) = -1/8
    assert fleiss_kappa(THREE) == pytest.approx(-0.125)
    assert fleiss_kappa({"x": {"a": A, "b": A}, "y": {"a": B, "b": B}}) == pytest.approx(1.0)


def test_krippendorff_alpha_hand_worked():
    # binary: o11=4, o22=2, o12=o21=1; n1=5, n2=3, n=8 -> 1 - 7*2/(2*5*3) = 8/15 (ordinal = nominal for 2 values)
    assert krippendorff_alpha_ordinal([[1, 1], [1, 1], [2, 2], [1, 2]]) == pytest.approx(8 / 15)
    # 3 values: n=(1,2,1); d(1,2)=d(2,3)=1.5^2, d(1,3)=3^2; D_o sum=9, D_e sum=36 -> 1 - 3*9/36
    assert krippendorff_alpha_ordinal([[1, 2], [2, 3]]) == pytest.approx(0.25)
    assert krippendorff_alpha_ordinal([[1, 1], [3, 3], [2]]) == pytest.approx(1.0)
    assert krippendorff_alpha_ordinal([[1, 1]]) is None  # no variation: undefined
    # identical rankings from two annotators agree perfectly
    assert ranking_alpha({"x": {"a": A, "b": A}, "y": {"a": B, "b": B}}) == pytest.approx(1.0)


def test_annotator_vs_consensus_of_others():
    # for a: Borda of b, c = scores 0:3, 1:3, 2:0 -> [[0,1],[2]]: a agrees on 2 of 3 pairs; same for b and c
    assert annotator_vs_others(THREE) == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3), "c": pytest.approx(2 / 3)}


def test_borda_with_ties():
    # A: 0->2, 1->1, 2->0; B: 1->2, 0->1, 2->0 -> 3, 3, 0
    assert borda([A, B], 3) == {"ranking": [[0, 1], [2]], "scores": [3.0, 3.0, 0.0]}
    # a tie is half a point each way: 0 and 1 get 1 + 0.5
    assert borda([[[0, 1], [2]]], 3)["scores"] == [1.5, 1.5, 0.0]


def test_majority_pairs_and_condorcet_cycle():
    assert sorted(majority_pairs([A, B, A], 3)) == [(0, 1), (0, 2), (1, 2)]
    cycle = [[[0], [1], [2]], [[1], [2], [0]], [[2], [0], [1]]]  # 0>1, 1>2, 2>0, each 2 votes to 1
    assert sorted(majority_pairs(cycle, 3)) == [(0, 1), (1, 2), (2, 0)]
    assert majority(cycle, 3)["ranking"] == [[0, 1, 2]]
    assert majority_pairs([A, B], 3) == [(0, 2), (1, 2)]  # 1 vote each on (0,1): no pair


def test_bradley_terry_closed_form():
    # two completions, 0 wins twice, 1 once; prior +0.5 each way -> p0/p1 = 2.5/1.5 (the 2-item MLE)
    out = bradley_terry([[[0], [1]], [[0], [1]], [[1], [0]]], 2)
    assert out["scores"][0] - out["scores"][1] == pytest.approx(math.log(5 / 3), abs=1e-8)
    assert out["ranking"] == [[0], [1]]
    assert bradley_terry([[[0], [1]], [[1], [0]]], 2)["ranking"] == [[0, 1]]
    assert consensus([A, A, B], 3, "bradley_terry")["ranking"] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="unknown consensus"):
        consensus([A], 3, "average")


def test_thumbs_majority():
    assert thumbs_majority([True, True, False]) is True
    assert thumbs_majority([True, False]) is None
    assert thumbs_majority([False]) is False
