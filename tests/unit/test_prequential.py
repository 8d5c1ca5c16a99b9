"""EASE and the prequential table's statistics, on hand-made data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.ease import EASE
from models.evaluate import Point, summarize
from models.prequential import _from_scores, markdown_table


def _pairs(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id"])


def test_ease_recommends_what_co_occurs_and_has_a_zero_diagonal():
    # a and b always together, c and d always together
    rows = [(f"u{n}", i) for n in range(20) for i in ("a", "b")]
    rows += [(f"v{n}", i) for n in range(20) for i in ("c", "d")]
    ease = EASE.fit(_pairs(rows), ["a", "b", "c", "d"], lam=1.0)
    assert np.allclose(np.diag(ease.weights), 0.0)
    scores = ease.scores([["a"], ["c", "unknown"], []])
    assert scores.shape == (3, 4)
    assert np.argmax(scores[0]) == ease.row["b"]
    assert np.argmax(scores[1]) == ease.row["d"]
    assert np.all(scores[2] == 0.0)


def test_ease_stronger_regularisation_shrinks_the_weights():
    rows = [(f"u{n}", i) for n in range(10) for i in ("a", "b", "c") if (n + ord(i)) % 3]
    weak = EASE.fit(_pairs(rows), ["a", "b", "c"], lam=0.1)
    strong = EASE.fit(_pairs(rows), ["a", "b", "c"], lam=100.0)
    assert np.abs(strong.weights).sum() < np.abs(weak.weights).sum()


def _point(user: str, relevant: set[str], warm: bool, seen: set[str] = frozenset()) -> Point:
    return Point(user, 0, None, set(seen), np.zeros(1), relevant, warm, 0, [])


def test_from_scores_removes_seen_items():
    points = [_point("u", {"c"}, True, seen={"a"})]
    lists = _from_scores(np.array([[3.0, 2.0, 1.0]]), ["a", "b", "c"], points)
    assert lists == [["b", "c"]]


def test_summary_averages_per_user_first_and_pairs_the_differences():
    # u1 has two points (one hit, one miss) and u2 one point (hit) for "ours"; "theirs" misses all
    points = [_point("u1", {"x"}, True), _point("u1", {"y"}, True), _point("u2", {"z"}, False)]
    ours = [["x"], ["q"], ["z"]]
    theirs = [["q"], ["q"], ["q"]]
    result = summarize(points, {"ours": ours, "theirs": theirs})
    row = result["ours"]["all"]
    assert (row["users"], row["points"]) == (2, 3)
    assert row["ndcg@10"] == pytest.approx((0.5 + 1.0) / 2)  # per user first: not 2/3
    assert row["ndcg@10 se"] == pytest.approx(np.std([0.5, 1.0], ddof=1) / np.sqrt(2))
    assert result["theirs"]["all"]["ndcg@10 diff"] == pytest.approx(0.75)
    assert result["ours"]["all"]["ndcg@10 diff"] == 0.0
    assert result["ours"]["warm"]["users"] == 1 and result["ours"]["cold-at-cut"]["users"] == 1
    table = markdown_table({"results": result})
    assert "+0.7500" in table and table.count("\n") == 2 + 3 * 2 - 1
