"""A/B arms: the split by user hash and the attribution of interactions, without servers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from serving.arms import Arm, Arms, ArmsFile, attribute, difference, wilson

USERS = [f"user-{n}" for n in range(10_000)]


@pytest.mark.parametrize("share_b", [0.5, 0.2, 0.05])
def test_the_split_is_sticky_and_within_3_percent_of_the_share(share_b):
    arms = Arms((Arm("A", "v1", 1 - share_b, 1), Arm("B", "v2", share_b, 2)), salt="t1")
    first = [arms.assign(u).name for u in USERS]
    again = Arms(arms.arms, salt="t1")  # another worker, another process: the same split
    assert [again.assign(u).name for u in USERS] == first
    got = first.count("B") / len(USERS)
    assert abs(got - share_b) <= 0.03 * share_b + 0.005, got
    other_test = [Arms(arms.arms, salt="t2").assign(u).name for u in USERS]
    assert other_test != first  # a new salt, a new split


def test_shares_and_names_are_checked():
    with pytest.raises(ValueError, match="add up to 1"):
        Arms((Arm("A", "v1", 0.5), Arm("B", "v2", 0.4)), "s")
    with pytest.raises(ValueError, match="distinct names"):
        Arms((Arm("A", "v1", 0.5), Arm("A", "v2", 0.5)), "s")


def test_the_workers_see_a_new_test_and_its_end(tmp_path):
    seen = ArmsFile(tmp_path, every_s=0.0)
    assert seen.current(time.monotonic()) is None
    arms = Arms((Arm("A", "v1", 0.5, 1), Arm("B", "v2", 0.5, 2)), "s")
    arms.save(tmp_path)
    assert seen.current(time.monotonic()) == arms
    (tmp_path / "ab.json").unlink()
    assert seen.current(time.monotonic()) is None


def _response(rid, user, arm, items, at, status="ok"):
    return {
        "request_id": rid,
        "user_id": user,
        "arm": arm,
        "status": status,
        "items": [{"item_id": i, "score": 1.0} for i in items],
        "request_timestamp_ms": at,
        "timestamp_ms": at + 5,
    }


def _click(user, item, at, request_id=None):
    context = {"request_id": request_id} if request_id else {}
    return {"user_id": user, "item_id": item, "timestamp_ms": at, "context": context}


def test_attribution_is_exact_on_a_synthetic_stream():
    """A stream whose right answer is known by construction: each user gets responses from
    their arm, and clicks of four kinds: by request id, within the window, too late, and on an
    item never shown. The counts must be exactly the constructed ones."""
    rng = np.random.default_rng(0)
    arms = Arms((Arm("A", "v1", 0.5, 1), Arm("B", "v2", 0.5, 2)), "synthetic")
    window = 60_000
    responses, clicks = [], []
    want = {"A": [0, 0, 0, 0], "B": [0, 0, 0, 0]}  # requests, impressions, clicks, by id
    for n in range(2_000):
        user = f"u{n % 400}"
        arm = arms.assign(user).name
        at = n * 1_000_000  # far apart: windows never overlap between requests
        items = [f"i{x}" for x in rng.choice(500, 10, replace=False)]
        responses.append(_response(f"r{n}", user, arm, items, at))
        want[arm][0] += 1
        want[arm][1] += 10
        kind = n % 5
        if kind == 0:  # by request id, even long after the window
            clicks.append(_click(user, items[3], at + 10 * window, request_id=f"r{n}"))
            want[arm][2] += 1
            want[arm][3] += 1
        elif kind == 1:  # no id, within the window; and the same item again: counted once
            clicks.append(_click(user, items[0], at + window // 2))
            clicks.append(_click(user, items[0], at + window // 2 + 1))
            want[arm][2] += 1
        elif kind == 2:  # no id, after the window: not attributed
            clicks.append(_click(user, items[1], at + 2 * window))
        elif kind == 3:  # an item the response did not show
            clicks.append(_click(user, "never-shown", at + 10))
    responses.append(_response("bad", "u1", "A", ["i1"], 0, status="error"))  # not counted
    got = attribute(responses, clicks, window)
    for arm, (requests, impressions, n_clicks, by_id) in want.items():
        c = got[arm]
        assert (c.requests, c.impressions, c.clicks, c.by_request_id) == (
            requests,
            impressions,
            n_clicks,
            by_id,
        )


def test_intervals():
    low, high = wilson(50, 1000)
    assert low < 0.05 < high and low > 0.035 and high < 0.067
    assert wilson(0, 0) == (0.0, 0.0)
    from serving.arms import ArmCounts

    a, b = ArmCounts(impressions=10_000, clicks=500), ArmCounts(impressions=10_000, clicks=600)
    d, lo, hi = difference(a, b)
    assert d == pytest.approx(0.01) and lo > 0 and hi < 0.02
