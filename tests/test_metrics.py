"""Ranking metrics against hand-worked examples."""
import math

import pytest

from recast_ms.data.sample import Sample
from recast_ms.metrics import (aggregate_metrics, dedup_ranking, most_popular_ranking, ndcg_at_k, pass_at_k,
                               popularity_counts, recall_at_k, valid_ratio)
from recast_ms.sid import SIDCodebook

A, B, C, D, E = (1, 1, 1), (1, 1, 2), (1, 2, 1), (2, 1, 1), (3, 3, 3)


def test_dedup_keeps_first_occurrence_and_none_slots():
    assert dedup_ranking([A, B, A, [1, 1, 2], None, C, None]) == [A, B, None, C, None]


def test_single_target_with_duplicates():
    ranked = [A, B, A, C, D]  # de-duplicated: A B C D -> target C at rank 3
    t = {C}
    assert [pass_at_k(ranked, t, k) for k in (1, 2, 3, 32)] == [0.0, 0.0, 1.0, 1.0]
    assert [recall_at_k(ranked, t, k) for k in (2, 3)] == [0.0, 1.0]
    assert ndcg_at_k(ranked, t, 2) == 0.0
    assert ndcg_at_k(ranked, t, 3) == pytest.approx(1 / math.log2(4))  # = 0.5
    assert ndcg_at_k([C, A], t, 1) == 1.0


def test_multi_target():
    ranked = [A, B, C, D]
    t = [B, D, E]
    assert pass_at_k(ranked, t, 1) == 0.0 and pass_at_k(ranked, t, 2) == 1.0
    assert recall_at_k(ranked, t, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, t, 4) == pytest.approx(2 / 3)
    # DCG@4 = 1/log2(3) + 1/log2(5); ideal: 3 hits at ranks 1..3 = 1 + 1/log2(3) + 1/log2(4)
    assert ndcg_at_k(ranked, t, 4) == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 0.5))
    assert ndcg_at_k(ranked, t, 4) == pytest.approx(0.49818, abs=1e-5)
    # ideal DCG uses min(k, |targets|) = 1 at k = 1
    assert ndcg_at_k([B], t, 1) == 1.0
    assert ndcg_at_k([B, D, E], t, 3) == pytest.approx(1.0)


def test_none_slot_and_empty_ranking():
    assert pass_at_k([None, C], [C], 1) == 0.0
    assert pass_at_k([None, C], [C], 2) == 1.0
    assert ndcg_at_k([None, C], [C], 2) == pytest.approx(1 / math.log2(3))
    assert pass_at_k([], [C], 5) == 0.0 and ndcg_at_k([], [C], 5) == 0.0
    assert pass_at_k([[1, 2, 1]], [C], 1) == 1.0  # lists and tuples are the same SID


def test_bad_inputs():
    with pytest.raises(ValueError):
        pass_at_k([A], [], 1)
    with pytest.raises(ValueError):
        recall_at_k([A], [A], 0)


def test_valid_ratio():
    cb = SIDCodebook({0: A, 1: B, 2: C}, codebook_size=4)
    gen = [A, (1, 1, 3), None, "<a_1><b_2><c_1>", "garbage", [1, 1, 2], (1, 1)]
    assert valid_ratio(gen, cb) == pytest.approx(3 / 7)  # A, the text naming C, [1, 1, 2]
    assert valid_ratio([], cb) == 0.0


def test_aggregate():
    rankings = [[A, B, C], [D, D, A]]
    targets = [[C], [A]]  # prompt 1: hit at rank 3; prompt 2: de-duplicated D A -> hit at rank 2
    m = aggregate_metrics(rankings, targets, ks=(1, 2, 32))
    assert m["eval/pass@1"] == 0.0
    assert m["eval/pass@2"] == 0.5
    assert m["eval/pass@32"] == 1.0
    assert m["eval/recall@32"] == 1.0
    assert m["eval/ndcg@2"] == pytest.approx(0.5 / math.log2(3))
    assert m["eval/ndcg@32"] == pytest.approx((0.5 + 1 / math.log2(3)) / 2)
    assert m["eval/num_prompts"] == 2.0
    default = aggregate_metrics(rankings, targets, prefix="test")
    assert {f"test/{n}@{k}" for n in ("pass", "recall", "ndcg") for k in (1, 5, 10, 32)} <= set(default)
    cb = SIDCodebook({0: A, 1: B, 2: C}, codebook_size=4)
    assert aggregate_metrics(rankings, targets, codebook=cb)["eval/valid_ratio"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        aggregate_metrics(rankings, targets[:1])


def test_most_popular_baseline():
    def s(target):
        return Sample("u", (0,), (A,), (0,), (target,))

    train = [s(C), s(B), s(C), s(D), s(B), s(C), s(E)]
    assert popularity_counts(train)[C] == 3
    assert most_popular_ranking(train, k=3) == [C, B, D]  # B, C by count; D < E by SID order
    ranking = most_popular_ranking(train)
    assert pass_at_k(ranking, [D], 3) == 1.0 and pass_at_k(ranking, [E], 3) == 0.0
