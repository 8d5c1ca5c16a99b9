import numpy as np
import pandas as pd
import pytest

from state.features import (
    HISTORY_LEN,
    POPULARITY_HALF_LIFE_MS,
    ItemStats,
    replay,
    update_item,
    update_user,
)

G = np.array([1.0, 0.0, 0.0])
H = np.array([0.0, 1.0, 1.0])


def test_recent_items_most_recent_first_deduplicated_and_bounded():
    state = None
    for i in range(HISTORY_LEN + 5):
        state = update_user(state, str(i), G, i)
    state = update_user(state, "10", G, 100)
    assert state.recent_items[0] == "10"
    assert state.recent_items.count("10") == 1
    assert len(state.recent_items) == HISTORY_LEN
    assert state.event_count == HISTORY_LEN + 6


def test_genre_affinity_stays_a_distribution_and_moves_towards_new_genres():
    state = update_user(None, "a", G, 0)
    assert state.genre_affinity == [1.0, 0.0, 0.0]
    state = update_user(state, "b", H, 1)
    assert sum(state.genre_affinity) == pytest.approx(1.0)
    assert state.genre_affinity[1] > 0 and state.genre_affinity[0] < 1


def test_popularity_halves_after_one_half_life():
    stats = update_item(None, 0)
    assert stats.at(POPULARITY_HALF_LIFE_MS) == pytest.approx(0.5)
    stats = update_item(stats, POPULARITY_HALF_LIFE_MS)
    assert stats.popularity == pytest.approx(1.5)


def test_an_old_event_does_not_move_popularity_time_backwards():
    stats = ItemStats(popularity=2.0, popularity_ms=1000)
    older = update_item(stats, 10)
    assert older.popularity_ms == 1000 and older.popularity == pytest.approx(3.0)


def test_replay_gives_the_state_before_each_interaction():
    df = pd.DataFrame(
        {"user_id": ["u", "u", "v"], "item_id": ["a", "b", "a"], "timestamp": [1, 2, 3]}
    )
    r = replay(df, {"a": G, "b": H})
    assert r.users_before[0].recent_items == []
    assert r.users_before[1].recent_items == ["a"]
    assert r.users["u"].recent_items == ["b", "a"]
    assert r.popularity_before[0] == 0.0 and r.popularity_before[2] > 0.99


def test_a_late_event_is_counted_but_does_not_rewrite_recency():
    state = update_user(None, "new", G, 2000)
    late = update_user(state, "old", H, 1000)
    assert late.recent_items == ["new"]
    assert late.genre_affinity == state.genre_affinity
    assert late.last_event_ms == 2000 and late.event_count == 2


def test_seen_before_only_counts_earlier_positions_of_the_same_user():
    from models.examples import SeenBefore

    seen = SeenBefore(np.array(["u", "u", "v", "u"]), np.array(["a", "b", "a", "c"]))
    got = seen.mask(
        np.array(["u", "u", "v", "w"]),
        np.array([1, 3, 2, 9]),
        np.array([["a", "b", "c"], ["a", "b", "c"], ["a", "b", "zz"], ["a", "b", "c"]]),
    )
    assert got.tolist() == [
        [True, False, False],
        [True, True, False],
        [False, False, False],
        [False, False, False],
    ]


def test_hard_negatives_come_from_the_unseen_retrieval_candidates():
    from models.examples import SeenBefore, hard_negatives
    from models.index import ItemIndex

    ids = ["a", "b", "c", "d", "e", "f", "g"]
    emb = np.eye(len(ids), dtype=np.float32)[:, :6]  # "g" scores 0 for every user below
    index = ItemIndex.build(emb, ids)
    seen = SeenBefore(np.array(["u", "u", "u"]), np.array(["a", "b", "c"]))
    user = np.ones((1, 6), dtype=np.float32)
    for seed in range(5):
        draws, inside = hard_negatives(
            user,
            index,
            np.array(["c"]),
            np.array(["u"]),
            np.array([2]),
            seen,
            3,
            6,
            np.random.default_rng(seed),
        )
        # a and b were seen before position 2, c is the positive; g is not a top-6 candidate
        assert sorted(draws[0]) == ["d", "e", "f"] and inside.tolist() == [True]
