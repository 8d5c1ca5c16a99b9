from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pandas as pd
import pytest

from models.data import synthetic
from models.workflow import (
    Bucketize,
    Categorify,
    FillMissing,
    ListCategorify,
    LogOp,
    MultiHot,
    Normalize,
    NotFittedError,
    Workflow,
    WorkflowFormatError,
)

# ------------------------------------------------------------------------------------------------
# operators
# ------------------------------------------------------------------------------------------------


def test_categorify_order_nulls_and_unseen():
    op = Categorify().fit(pd.Series(["b", "a", "c", "a", None, "b", "a", np.nan]))
    assert op.vocab == ["a", "b", "c"]  # by count, ties by value
    assert op.cardinality == 5
    values = pd.Series(["a", "b", "c", "zzz", None, np.nan, pd.NA])
    assert op.transform(values).tolist() == [2, 3, 4, 1, 0, 0, 0]
    assert op.transform(values).dtype == np.int64
    assert [int(op.transform_one(v)) for v in values] == [2, 3, 4, 1, 0, 0, 0]
    assert isinstance(op.transform_one("a"), np.int64)


def test_categorify_compares_values_as_strings():
    op = Categorify().fit(pd.Series([7, 7, 8]))
    assert op.vocab == ["7", "8"]
    assert op.transform(pd.Series(["7", 8, None])).tolist() == [2, 3, 0]
    assert op.transform_one("8") == op.transform_one(8) == 3


def test_categorify_frequency_threshold_and_max_size():
    values = pd.Series(["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"])
    op = Categorify(freq_threshold=3).fit(values)
    assert op.vocab == ["a", "b"] and op.cardinality == 4
    assert op.transform(pd.Series(["a", "b", "c", "d"])).tolist() == [2, 3, 1, 1]
    assert op.transform_one("c") == 1
    capped = Categorify(max_size=3).fit(values)
    assert capped.vocab == ["a", "b", "c"]


def test_categorify_not_fitted():
    with pytest.raises(NotFittedError):
        Categorify().transform(pd.Series(["a"]))
    with pytest.raises(NotFittedError):
        Categorify().transform_one("a")


def test_normalize_with_nulls_and_std_floor():
    op = Normalize().fit(pd.Series([1.0, 2.0, 3.0, None]))
    assert op.mean == pytest.approx(2.0) and op.std == pytest.approx(np.std([1, 2, 3]))
    out = op.transform(pd.Series([1.0, 3.0, None, np.nan]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.2247449, 1.2247449, 0.0, 0.0], rtol=1e-6)
    assert op.transform_one(None) == 0.0 and isinstance(op.transform_one(2.0), np.float32)
    constant = Normalize().fit(pd.Series([5, 5, 5]))
    assert constant.std == 1e-6 and constant.transform_one(5) == 0.0
    int_nullable = pd.Series(pd.array([1, None, 3], dtype="Int64"))
    assert Normalize().fit(int_nullable).transform(int_nullable).tolist() == [-1.0, 0.0, 1.0]


def test_fill_missing():
    op = FillMissing("unknown")
    out = op.transform(pd.Series(["M", None, np.nan, "F"]))
    assert out.tolist() == ["M", "unknown", "unknown", "F"]
    assert op.transform_one(None) == "unknown" and op.transform_one("F") == "F"
    assert FillMissing(np.int64(3)).value == 3 and type(FillMissing(np.int64(3)).value) is int


def test_log_op():
    op = LogOp()
    out = op.transform(pd.Series([0.0, np.e - 1, -5.0, None]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:3], [0.0, 1.0, 0.0], rtol=1e-6)
    assert np.isnan(out[3]) and np.isnan(op.transform_one(None))
    assert op.transform_one(np.e - 1) == out[1]


def test_bucketize_edges_and_nulls():
    op = Bucketize([18, 25, 35])
    assert op.cardinality == 5
    values = pd.Series([0, 17.9, 18, 24, 25, 35, 99, None])
    expected = [1, 1, 2, 2, 3, 4, 4, 0]
    assert op.transform(values).tolist() == expected
    assert [int(op.transform_one(v)) for v in values] == expected
    with pytest.raises(ValueError):
        Bucketize([3, 2])


def test_list_categorify_padding_truncation_and_order():
    train = pd.Series([["a", "b", "c", "d"], ["b", "a"], None])
    lists = pd.Series([["a", "b", "c", "d"], ["b"], [], None, ["zzz", None, "a"]])
    newest_first = ListCategorify(max_len=3).fit(train)  # newest first in the input too
    assert newest_first.categorify.vocab == ["a", "b", "c", "d"]
    expected = [[2, 3, 4], [3, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 2]]
    assert newest_first.transform(lists).tolist() == expected
    assert [newest_first.transform_one(v).tolist() for v in lists] == expected

    chronological = ListCategorify(max_len=3, input_order="oldest_first").fit(train)
    expected = [[5, 4, 3], [3, 0, 0], [0, 0, 0], [0, 0, 0], [2, 0, 1]]  # last 3, reversed
    assert chronological.transform(lists).tolist() == expected
    assert [chronological.transform_one(v).tolist() for v in lists] == expected
    assert chronological.transform(lists).dtype == np.int64
    assert chronological.transform_one(("a",)).dtype == np.int64
    with pytest.raises(TypeError, match="expected a list"):
        chronological.transform_one("abc")


def test_multi_hot():
    op = MultiHot().fit(pd.Series([["Drama", "Comedy"], ["Action"], None]))
    assert op.vocab == ["Action", "Comedy", "Drama"] and op.width == 3
    values = pd.Series([["Comedy", "Drama"], [], None, ["Horror", "Action"], np.array(["Drama"])])
    expected = [[0, 1, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]]
    out = op.transform(values)
    assert out.dtype == np.float32 and out.tolist() == expected
    assert [op.transform_one(v).tolist() for v in values] == expected
    given = MultiHot(vocab=["x", "y"]).fit(pd.Series([["z"]]))
    assert given.vocab == ["x", "y"]


# ------------------------------------------------------------------------------------------------
# workflow
# ------------------------------------------------------------------------------------------------

AGE_BOUNDS = [18, 25, 35, 45, 50, 56]


def make_workflow() -> Workflow:
    return Workflow(
        {
            "user_id": [Categorify(freq_threshold=2)],
            "item_id": [Categorify()],
            "age_bucket": [FillMissing(30), Bucketize(AGE_BOUNDS)],
            "age_norm": [Normalize()],
            "gender": [Categorify()],
            "occupation": [FillMissing("none"), Categorify()],
            "year": [Normalize()],
            "rating_log": [LogOp(), Normalize()],
            "genres": [MultiHot()],
            "hist_items": [ListCategorify(max_len=5, vocab_from="item_id")],
            "last_item": [Categorify(vocab_from="item_id")],
        },
        inputs={"age_bucket": "age", "age_norm": "age", "rating_log": "rating"},
    )


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """A realistic joined frame: interactions + user + item attributes + recent histories."""
    ds = synthetic(n_users=200, n_items=500, n_events=3000, seed=3)
    df = ds.interactions.merge(ds.users, on="user_id").merge(ds.items, on="item_id")
    df = df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    rng = np.random.default_rng(0)
    histories, seen = [], {}
    for user, item in zip(df["user_id"], df["item_id"], strict=True):
        past = seen.setdefault(user, [])
        histories.append(list(past[:8]) if rng.random() > 0.05 else None)
        past.insert(0, item)
    df["hist_items"] = histories
    df["last_item"] = [h[0] if h else None for h in histories]
    # nulls and unseen values in every kind of column
    n = len(df)
    df.loc[rng.random(n) < 0.05, "occupation"] = None
    df.loc[rng.random(n) < 0.05, "genres"] = None
    df.loc[rng.random(n) < 0.03, "year"] = pd.NA
    df.loc[rng.random(n) < 0.02, "rating"] = np.nan
    return df


def assert_outputs_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_workflow_outputs_and_spec(frame):
    wf = make_workflow().fit(frame)
    out = wf.transform(frame)
    n = len(frame)
    spec = wf.output_spec()
    for name, (dtype, width, _) in spec.items():
        assert out[name].dtype == np.dtype(dtype), name
        assert out[name].shape == ((n,) if width is None else (n, width)), name
    assert spec["hist_items"] == ("int64", 5, spec["item_id"][2])
    assert spec["last_item"][2] == spec["item_id"][2]
    assert spec["age_bucket"] == ("int64", None, len(AGE_BOUNDS) + 2)
    assert spec["genres"] == ("float32", 18, None)
    assert spec["age_norm"] == ("float32", None, None)
    # the shared vocabulary maps exactly like item_id's own Categorify
    item_op = wf.columns["item_id"][0]
    np.testing.assert_array_equal(out["last_item"], item_op.transform(frame["last_item"]))
    hist = frame["hist_items"].iloc[-1]
    assert out["hist_items"][-1].tolist() == [item_op.index_of(v) for v in hist[:5]]
    assert out["user_id"].min() >= 1  # freq_threshold=2 sends rare users to OOV, none null
    assert 1 in out["user_id"]


def test_batch_and_single_row_agree_exactly(frame):
    wf = make_workflow().fit(frame)
    batch = wf.transform(frame)
    for i, row in enumerate(frame.to_dict("records")):
        one = wf.transform_one(row)
        for name, value in one.items():
            expected = batch[name][i]
            assert value.dtype == expected.dtype, (name, i)
            assert np.shape(value) == np.shape(expected), (name, i)
            np.testing.assert_array_equal(value, expected, err_msg=f"{name} row {i}")


def test_unseen_and_null_row(frame):
    wf = make_workflow().fit(frame)
    row = {
        "user_id": "new-user", "item_id": None, "age": None, "gender": None,
        "occupation": None, "year": None, "rating": None, "genres": None,
        "hist_items": ["new-item", frame["item_id"].iloc[0]], "last_item": "new-item",
    }  # fmt: skip
    one = wf.transform_one(row)
    assert one["user_id"] == 1 and one["item_id"] == 0 and one["last_item"] == 1
    assert one["age_bucket"] == Bucketize(AGE_BOUNDS).transform_one(30)
    assert one["age_norm"] == 0.0 and one["year"] == 0.0 and one["rating_log"] == 0.0
    assert one["genres"].sum() == 0.0
    assert one["hist_items"][0] == 1 and one["hist_items"][1] >= 2
    assert one["hist_items"][2:].tolist() == [0, 0, 0]
    batch = wf.transform(pd.DataFrame([row]))
    assert_outputs_equal({k: v[0] for k, v in batch.items()}, one)
    with pytest.raises(KeyError, match="genres"):
        wf.transform_one({k: v for k, v in row.items() if k != "genres"})


def test_save_load_round_trip(frame, tmp_path):
    wf = make_workflow().fit(frame)
    path = wf.save(tmp_path / "wf" / "workflow.json")
    loaded = Workflow.load(path)
    assert_outputs_equal(wf.transform(frame), loaded.transform(frame))
    assert loaded.output_spec() == wf.output_spec()
    row = frame.to_dict("records")[10]
    assert_outputs_equal(wf.transform_one(row), loaded.transform_one(row))
    # the shared vocabulary is stored once, and linked again on load
    saved = json.loads(path.read_text())
    assert saved["columns"]["hist_items"][0]["state"] is None
    assert loaded.columns["hist_items"][0].categorify.vocab is loaded.vocab("item_id")


def test_unknown_format_version_rejected(frame, tmp_path):
    path = make_workflow().fit(frame).save(tmp_path / "workflow.json")
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(WorkflowFormatError, match="unsupported workflow format version 99"):
        Workflow.load(path)
    path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(WorkflowFormatError, match="not a streamrec-workflow"):
        Workflow.load(path)


def test_workflow_configuration_errors():
    with pytest.raises(ValueError, match="vocab_from"):
        Workflow({"hist": [ListCategorify(max_len=3, vocab_from="item_id")]})
    with pytest.raises(ValueError, match="must end with"):
        Workflow({"age": [FillMissing(0)]})
    with pytest.raises(ValueError, match="last op"):
        Workflow({"genres": [MultiHot(), Normalize()]})
    with pytest.raises(NotFittedError):
        Workflow({"a": [Categorify()]}).transform(pd.DataFrame({"a": ["x"]}))
    with pytest.raises(KeyError, match="input columns missing"):
        Workflow({"a": [Categorify()]}).fit(pd.DataFrame({"b": ["x"]}))


def test_transform_one_is_fast(frame):
    wf = make_workflow().fit(frame)
    row = frame.to_dict("records")[-1]
    timings = []
    for _ in range(200):
        start = time.perf_counter()
        wf.transform_one(row)
        timings.append(time.perf_counter() - start)
    median = statistics.median(timings)
    print(f"transform_one median {median * 1e6:.1f} µs for {len(wf.columns)} outputs")
    assert median < 1e-3
