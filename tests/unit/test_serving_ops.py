"""Serving stages that need no servers: graph wiring, filter rules, ordering, requests."""

import warnings

import numpy as np
import pytest

from models.recommender import filter_candidates, order
from serving.graph import Graph, Operator, Tensor
from serving.operators import (
    GRAPH,
    Ordering,
    limit_per_genre,
    request_tensors,
    strings,
    validate_request,
)


def test_the_graph_is_wired_and_each_tensor_is_produced_once():
    assert [op.name for op in GRAPH.operators] == [
        "user_features",
        "retrieval",
        "filtering",
        "item_features",
        "scoring",
        "ordering",
    ]
    assert {"items", "item_scores", "path", "removed", "stats_retrieval"} <= set(GRAPH.response)


def test_a_graph_reading_an_unproduced_tensor_is_rejected():
    class Reads(Operator):
        name = "reads"
        inputs = {"nowhere": Tensor("TYPE_FP32", (1,))}
        outputs = {}

    with pytest.raises(ValueError, match="reads 'nowhere'"):
        Graph({"x": Tensor("TYPE_FP32", (1,))}, [Reads], response=())


def test_filter_rules_remove_and_count_each_reason():
    kept, removed = filter_candidates(
        ["a", "b", "c", "d", "e"], seen={"a"}, unavailable={"b", "a"}, excluded={"c"}
    )
    assert kept == ["d", "e"]
    assert removed == {"seen": 1, "unavailable": 1, "excluded": 1}


def test_temperature_zero_is_greedy_top_k():
    scores = np.array([0.1, 3.0, -2.0, 2.5, 0.0])
    assert order(scores, 3, temperature=0.0).tolist() == [1, 3, 0]


def test_sampled_first_positions_follow_the_softmax_at_temperature_one():
    scores = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    firsts = np.array([order(scores, 1, 1.0, seed)[0] for seed in range(20_000)])
    freq = np.bincount(firsts, minlength=4) / len(firsts)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_higher_temperature_explores_more():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])

    def top_share(t):
        return np.mean([order(scores, 1, t, s)[0] == 0 for s in range(2000)])

    assert top_share(0.1) > top_share(1.0) > top_share(10.0)


def test_extreme_scores_do_not_overflow():
    scores = np.array([1e300, -1e300, 0.0, 1e308])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in (0.0, 1e-9, 1.0, 1e9):
            result = order(scores, 4, t, seed=3)
            assert sorted(result.tolist()) == [0, 1, 2, 3]
            if t <= 1.0:
                assert result[0] == 3


def test_same_seed_same_order_different_seed_different_order():
    scores = np.zeros(50)
    assert order(scores, 10, 1.0, 7).tolist() == order(scores, 10, 1.0, 7).tolist()
    assert order(scores, 10, 1.0, 7).tolist() != order(scores, 10, 1.0, 8).tolist()


def test_at_most_n_items_per_primary_genre():
    genres = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 0]], dtype=np.float32)
    assert limit_per_genre(np.array([0, 1, 2, 3, 4]), genres, 2).tolist() == [0, 1, 3, 4]
    assert limit_per_genre(np.array([2, 1, 0]), genres, 0).tolist() == [2, 1, 0]


def test_ordering_operator_returns_k_items_with_their_scores():
    op = Ordering(None, {"temperature": 0.0, "max_per_genre": 0})
    out = op(
        {
            "kept": strings(["a", "b", "c"]),
            "scores": np.array([0.2, 0.9, 0.5], dtype=np.float32),
            "item_genres": np.zeros((3, 2), dtype=np.float32),
            "k": np.array([2], dtype=np.int32),
            "temperature": np.array([-1.0], dtype=np.float32),  # server default: greedy
            "seed": np.array([-1], dtype=np.int64),
        }
    )
    assert out["items"].tolist() == [b"b", b"c"]
    np.testing.assert_allclose(out["item_scores"], [0.9, 0.5])
    assert out["stats_ordering"][:2].tolist() == [3, 2]


def test_ordering_of_no_candidates_is_empty():
    op = Ordering(None, {"temperature": 0.0, "max_per_genre": 0})
    out = op(
        {
            "kept": strings([]),
            "scores": np.zeros(0, np.float32),
            "item_genres": np.zeros((0, 2), np.float32),
            "k": np.array([5], np.int32),
            "temperature": np.array([0.0], np.float32),
            "seed": np.array([1], np.int64),
        }
    )
    assert len(out["items"]) == 0


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 5000}, "k must be"),
        ({"user_id": ""}, "user_id"),
        ({"request_id": ""}, "request_id"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_invalid_requests_are_explained(change, error):
    request = {"request_id": "r", "user_id": "u", "k": 10, "temperature": None}
    assert validate_request(request) is None
    assert error in validate_request(request | change)


def test_request_tensors_carry_defaults_for_missing_options():
    t = request_tensors({"request_id": "r", "user_id": "u", "k": 3, "exclude": []}, now_ms=5)
    assert t["exclude"].tolist() == [b""] and t["temperature"][0] < 0 and t["seed"][0] < 0
    assert t["now_ms"].tolist() == [5] and t["k"].dtype == np.int32
