"""Serving stages that need no servers: graph wiring, filter rules, ordering, requests."""

import json
import warnings

import numpy as np
import pytest

from models.recommender import filter_candidates, order
from serving.graph import Graph, Operator, Tensor
from serving.live import FILES, LiveItems
from serving.operators import (
    GRAPH,
    MAX_K,
    OPERATORS,
    Filtering,
    Ordering,
    limit_per_genre,
    request_tensors,
    response_record,
    strings,
    validate_request,
)
from serving.triton_export import (
    ENSEMBLE,
    LAYOUTS,
    export_repository,
    pin_version,
    read_config,
    shipped_code,
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
    assert {"items", "item_scores", "backfilled", "path", "removed", "stats_retrieval"} <= set(
        GRAPH.response
    )


def test_a_graph_reading_an_unproduced_tensor_is_rejected():
    class Reads(Operator):
        name = "reads"
        inputs = {"nowhere": Tensor("TYPE_FP32", (1,))}
        outputs = {}

    with pytest.raises(ValueError, match="reads 'nowhere'"):
        Graph({"x": Tensor("TYPE_FP32", (1,))}, [Reads], response=(), items=None)


def _export(tmp_path, config, layout="executor"):
    """A model repository exported from fake artifacts (every file "{}", version v1)."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for file in {*FILES, *(f for op in GRAPH.operators for f in op.files)}:
        (artifacts / file).write_text("{}")
    (artifacts / "manifest.json").write_text(json.dumps({"version": "v1"}))
    return export_repository(artifacts, tmp_path / "models", config, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_exported_ensemble_chains_the_models_of_the_layout(tmp_path, layout):
    config = {"redis_url": 'redis://user:"p\\w"@host:6379/0', "candidates": 300}
    repository = _export(tmp_path, config, layout)
    ensemble = read_config(repository / ENSEMBLE / "config.pbtxt")
    steps = ensemble.ensemble_scheduling.step
    assert [step.model_name for step in steps] == list(LAYOUTS[layout])
    available = {t.name for t in ensemble.input}
    for step in steps:  # each model reads what the request or an earlier model carries
        model = read_config(repository / step.model_name / "config.pbtxt")
        assert set(step.input_map) == {t.name for t in model.input} <= available
        assert set(step.output_map) == {t.name for t in model.output}
        assert json.loads(model.parameters["config"].string_value) == config
        available |= set(step.output_map)
    assert {t.name for t in ensemble.output} <= available
    assert ensemble.parameters["artifact_version"].string_value == "v1"


def test_pinning_versions_changes_only_the_version_policy(tmp_path):
    repository = _export(tmp_path, {"candidates": 300}, "fused")
    before = {name: read_config(repository / name / "config.pbtxt") for name in LAYOUTS["fused"]}
    pin_version(repository, 1, 2)
    for name, config in before.items():
        pinned = read_config(repository / name / "config.pbtxt")
        assert pinned.version_policy.specific.versions == [1, 2]
        config.version_policy.specific.versions[:] = [1, 2]
        assert pinned == config


def test_models_ship_the_app_code_the_operators_import_even_in_a_function():
    shipped = {str(path) for path in shipped_code(GRAPH)}
    assert {"serving/graph.py", "serving/operators.py", "serving/__init__.py"} <= shipped
    assert {"state/store.py", "state/feature_store.py", "models/recommender.py"} <= shipped
    assert not any(path.startswith(("streamrec/", "streams/", "tests/")) for path in shipped)


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


def _table(tmp_path, ids, popular=(), seen=(), unavailable=(), fallback=()):
    """A real item table over a fake of the Redis state it reads (no server)."""
    (tmp_path / "manifest.json").write_text(json.dumps({"version": "v1"}))
    (tmp_path / "item_ids.json").write_text(json.dumps(list(ids)))
    (tmp_path / "popular.json").write_text(json.dumps(list(fallback)))
    return CountingItems(tmp_path, FakeState(popular, seen, unavailable))


NOT_EXPLAINED = {
    "explain": np.array([0], np.int32),
    "kept_rank": np.zeros(0, np.int32),
    "kept_scores": np.zeros(0, np.float32),
    "features": np.zeros((0, 3), np.float32),
}


def test_ordering_operator_returns_k_items_with_their_scores(tmp_path):
    op = Ordering(None, {"temperature": 0.0, "max_per_genre": 0}, _table(tmp_path, "abc"))
    (out,) = op(
        [
            {
                "kept": np.array([0, 1, 2]),
                "backfill": np.zeros(0, np.int64),
                "scores": np.array([0.2, 0.9, 0.5], dtype=np.float32),
                "item_genres": np.zeros((3, 2), dtype=np.float32),
                "k": np.array([2], dtype=np.int32),
                "temperature": np.array([-1.0], dtype=np.float32),  # server default: greedy
                "seed": np.array([-1], dtype=np.int64),
                **NOT_EXPLAINED,
            }
        ]
    )
    assert out["items"].tolist() == [b"b", b"c"]
    np.testing.assert_allclose(out["item_scores"], [0.9, 0.5])
    assert out["stats_ordering"][[0, 1, 3]].tolist() == [3, 2, 1]
    assert out["backfilled"].tolist() == [0]


def test_ordering_of_no_candidates_is_empty(tmp_path):
    op = Ordering(None, {"temperature": 0.0, "max_per_genre": 0}, _table(tmp_path, "ab"))
    (out,) = op(
        [
            {
                "kept": np.zeros(0, np.int64),
                "backfill": np.zeros(0, np.int64),
                "scores": np.zeros(0, np.float32),
                "item_genres": np.zeros((0, 2), np.float32),
                "k": np.array([5], np.int32),
                "temperature": np.array([0.0], np.float32),
                "seed": np.array([1], np.int64),
                **NOT_EXPLAINED,
            }
        ]
    )
    assert len(out["items"]) == 0


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 5000}, "k must be between 1 and 1000"),
        ({"k": MAX_K + 1}, "k must be"),
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


# --- backfill: filtering picks popular items under the same rules, ordering appends them ------


class FakeState:
    """The reads of `state.store.RedisState` that the item table and filtering make, over
    plain data: popularity by rank (first = most popular), seen items, unavailable items."""

    def __init__(self, popular=(), seen=(), unavailable=()):
        self.popularity = {i: float(len(popular) - n) for n, i in enumerate(popular)}
        self.seen, self.unavailable = list(seen), set(unavailable)

    def snapshot(self):
        return {
            "popularity": self.popularity,
            "unavailable": self.unavailable,
            "catalog": {},
            "epoch": 0,
            "last": {0: (b"0-0", 0)},
        }

    def changes(self, after):
        return {0: []}

    def seen_sets(self, users):
        return [[i.encode() for i in self.seen] for _ in users]


class CountingItems(LiveItems):
    top_reads = 0

    def top(self, n):
        self.top_reads += 1
        return super().top(n)


CONFIG = {"redis_url": "redis://127.0.0.1:1/0", "feast_project": "t"}
CONFIG |= {"temperature": 0.0, "max_per_genre": 0}
CATALOG = [f"i{n}" for n in range(100)]


def _serve(tmp_path, candidates, k, exclude=(), catalog=None, **state):
    """Filtering → (item features, scoring: the candidate scores) → ordering → response."""
    ids = catalog or dict.fromkeys(
        [*CATALOG, *state.get("popular", ()), *state.get("fallback", ()), *candidates]
    )
    items = _table(tmp_path, ids, **state)
    filtering = Filtering(tmp_path, CONFIG, items)
    filtering.state = items.state  # no server: the client never connected
    request = {"request_id": "r", "user_id": "u", "k": k, "exclude": list(exclude)}
    tensors = request_tensors(request, now_ms=1)
    tensors["candidates"] = items.rows(candidates)
    tensors["candidate_scores"] = np.linspace(0.9, 0.1, len(candidates)).astype(np.float32)
    (out,) = filtering([tensors])
    tensors |= out
    tensors["scores"] = tensors["kept_scores"]
    tensors["item_genres"] = np.zeros((len(tensors["kept"]), 2), np.float32)
    tensors["features"] = np.zeros((0, 3), np.float32)
    tensors |= Ordering(None, CONFIG, items)([tensors])[0]
    outputs = {"path": strings(["personalized"]), **tensors}
    for op in OPERATORS:
        outputs.setdefault(op.stats_name(), np.zeros(4, np.float32))
    return response_record(request, outputs, now_ms=1), tensors, items


def _ids(response):
    return [i["item_id"] for i in response["items"]]


def test_exclusions_that_remove_every_candidate_are_backfilled_to_k(tmp_path):
    response, _, _ = _serve(tmp_path, CATALOG[:20], k=5, exclude=CATALOG[:20], popular=CATALOG)
    assert response["removed"]["excluded"] == 20
    assert _ids(response) == CATALOG[20:25]
    assert response["backfilled"] == 5
    assert [i["score"] for i in response["items"]] == [0.0] * 5
    assert response["status"] == "ok" and "5 of 5 items backfilled" in response["note"]
    assert response["model_version"] == "v1"  # the version of the tables that served it


def test_k_beyond_the_candidates_is_served_ranked_first_then_backfilled(tmp_path):
    response, _, _ = _serve(tmp_path, ["i1", "i2", "i3"], k=6, popular=CATALOG[::-1])
    assert _ids(response) == ["i1", "i2", "i3", "i99", "i98", "i97"]
    assert response["backfilled"] == 3
    assert all(i["score"] > 0 for i in response["items"][:3])


def test_backfill_skips_seen_unavailable_excluded_and_listed_items(tmp_path):
    response, _, _ = _serve(
        tmp_path,
        ["c1", "c2", "c3"],
        k=5,
        exclude=["x1", "c3"],
        catalog=["c1", "s1", "u1", "x1", "c2", "p1", "s2", "p2", "p3", "c3"],
        seen={"s1", "s2", "c2"},
        unavailable={"u1"},
    )
    assert _ids(response) == ["c1", "p1", "p2", "p3"]
    assert response["removed"] == {"seen": 1, "unavailable": 0, "excluded": 1}
    assert response["backfilled"] == 3
    # the catalog minus the filters is smaller than k: a short list that says so
    assert response["status"] == "ok" and len(response["items"]) == 4
    assert response["note"].startswith("short list: 4 of 5 items (3 backfilled")


def test_backfill_reads_deeper_windows_when_the_top_is_filtered_out(tmp_path):
    response, _, items = _serve(tmp_path, ["i0"], k=5, popular=CATALOG, seen=CATALOG[:90])
    assert _ids(response) == CATALOG[90:95]
    assert response["backfilled"] == 5 and items.top_reads > 1


def test_without_a_live_ranking_backfill_uses_the_trained_popular_list(tmp_path):
    response, _, _ = _serve(
        tmp_path, ["a"], k=3, unavailable={"f1"}, fallback=["a", "f1", "f2", "f3", "f4"]
    )
    assert _ids(response) == ["a", "f2", "f3"]
    assert response["backfilled"] == 2


def test_a_live_ranking_that_runs_out_continues_with_the_trained_list(tmp_path):
    response, _, _ = _serve(tmp_path, [], k=4, popular=["p1", "p2"], fallback=["p2", "f1", "f2"])
    assert _ids(response) == ["p1", "p2", "f1", "f2"]
    assert response["backfilled"] == 4


def test_items_nobody_interacted_with_come_last_in_catalog_order(tmp_path):
    response, _, _ = _serve(
        tmp_path,
        ["a"],
        k=4,
        catalog=["a", "c3", "p1", "c1", "c2"],
        popular=["p1"],
        seen={"c1"},
        fallback=["p1"],
    )
    assert _ids(response) == ["a", "p1", "c3", "c2"]
    assert response["backfilled"] == 3


def test_no_backfill_when_k_candidates_are_left_and_no_popularity_read(tmp_path):
    response, tensors, items = _serve(tmp_path, CATALOG[:10], k=10, exclude=["i50"])
    assert _ids(response) == CATALOG[:10]
    assert response["backfilled"] == 0 and response["note"] is None
    assert items.top_reads == 0 and len(tensors["backfill"]) == 0


def test_backfill_never_pushes_the_list_past_k(tmp_path):
    response, _, _ = _serve(tmp_path, CATALOG[:3], k=2, popular=CATALOG)
    assert _ids(response) == CATALOG[:2] and response["backfilled"] == 0


def test_k_up_to_the_maximum_is_valid_and_beyond_it_is_explained():
    request = {"request_id": "r", "user_id": "u", "k": MAX_K, "temperature": None}
    assert validate_request(request) is None
    assert validate_request(request | {"k": MAX_K + 1}) == (
        f"k must be between 1 and {MAX_K} (the most items one response carries), got {MAX_K + 1}"
    )
