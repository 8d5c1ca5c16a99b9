"""Unit tests of the two-tower retriever, the DLRM ranker and their ONNX export (no servers)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models.onnx_export import export_onnx, onnx_session, parity, run_onnx  # noqa: E402
from models.ranking import (  # noqa: E402
    RANKER_INPUTS,
    auc,
    build_dlrm,
    evaluate_ranker,
    fit_ranker,
    logloss,
    predict_ranker,
)
from models.retrieval import (  # noqa: E402
    ITEM_INPUTS,
    USER_INPUTS,
    build_two_tower,
    item_log_q_from_ids,
)

L = 6  # history length
G = 5  # genres
D = 4  # dense features
N_ITEMS = 40  # real items: indices 2 .. 41 (0 = pad, 1 = OOV)
CARD = {
    "user_age": 8,
    "user_gender": 4,
    "user_occupation": 10,
    "user_zip": 30,
    "item_id": N_ITEMS + 2,
    "item_year": 12,
}
ITEMS = np.arange(2, N_ITEMS + 2)
CLUSTER_A, CLUSTER_B = ITEMS[: N_ITEMS // 2], ITEMS[N_ITEMS // 2 :]


def item_features(ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    genres = (rng.random((ids.shape[0], G)) < 0.2).astype(np.float32)
    genres[:, 0] = ids < CLUSTER_B[0]  # genre 0 marks cluster A, genre 1 cluster B
    genres[:, 1] = ids >= CLUSTER_B[0]
    return {
        "item_id": ids.astype(np.int64),
        "item_genres": genres,
        "item_year": (ids % (CARD["item_year"] - 2) + 2).astype(np.int64),
    }


def random_users(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {k: rng.integers(0, CARD[k], n) for k in USER_INPUTS if k != "hist_items"}
    out["hist_items"] = rng.integers(0, CARD["item_id"], (n, L))
    return out


def planted_pairs(n: int, rng: np.random.Generator):
    """Users with a history in one cluster; the positive item is from the same cluster."""
    cluster = rng.integers(0, 2, n)
    pools = np.stack([CLUSTER_A, CLUSTER_B])[cluster]  # (n, 20)
    hist = np.zeros((n, L), np.int64)
    lengths = rng.integers(1, L + 1, n)
    for i in range(n):
        hist[i, : lengths[i]] = rng.choice(pools[i], lengths[i], replace=False)
    users = {k: rng.integers(0, CARD[k], n) for k in USER_INPUTS if k != "hist_items"}
    users["hist_items"] = hist
    pos = pools[np.arange(n), rng.integers(0, pools.shape[1], n)]
    return users, item_features(pos, rng), cluster


# ---------------------------------------------------------------------------- two-tower


@pytest.fixture(scope="module")
def tower():
    return build_two_tower(CARD, n_genres=G, hist_len=L, dim=16, seed=0)


def test_two_tower_shapes_and_unit_norm(tower):
    rng = np.random.default_rng(1)
    u = tower.embed_users(random_users(7, rng))
    it = tower.embed_items(item_features(ITEMS[:9], rng))
    assert u.shape == (7, 16) and it.shape == (9, 16)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(it, axis=1), 1.0, atol=1e-5)
    assert sorted(t.name for t in tower.user_tower.inputs) == sorted(USER_INPUTS)
    assert sorted(t.name for t in tower.item_tower.inputs) == sorted(ITEM_INPUTS)


def test_two_tower_shares_item_table(tower):
    user_tables = {id(v) for v in tower.user_tower.weights}
    shared = [v for v in tower.item_tower.weights if id(v) in user_tables]
    assert len(shared) == 1 and tuple(shared[0].shape) == (CARD["item_id"], 16)


def test_empty_user_and_out_of_vocab_are_finite(tower):
    empty = {k: np.zeros((2,), np.int64) for k in USER_INPUTS if k != "hist_items"}
    empty["hist_items"] = np.zeros((2, L), np.int64)
    u = tower.embed_users(empty)
    assert np.all(np.isfinite(u))
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
    # indices beyond the vocabulary behave like OOV (1) instead of failing the gather
    rng = np.random.default_rng(2)
    far = item_features(np.array([10_000, 1]), rng)
    far["item_year"][:] = 3
    far["item_genres"][1] = far["item_genres"][0]
    it = tower.embed_items(far)
    np.testing.assert_allclose(it[0], it[1], atol=1e-6)


def test_the_sequence_tower_reads_the_order_and_exports(tmp_path):
    """With `sequence` the user vector depends on the order of the history (mean pooling does
    not), stays finite for an empty one, and the ONNX export agrees with Keras."""
    rng = np.random.default_rng(4)
    users = random_users(6, rng)
    users["hist_items"][:, :4] = ITEMS[2:6]  # four items, then padding
    users["hist_items"][:, 4:] = 0
    users["hist_items"][0] = 0  # an empty history
    reordered = dict(users, hist_items=users["hist_items"].copy())
    reordered["hist_items"][1:, :4] = ITEMS[2:6][::-1]
    for sequence in (False, True):
        tt = build_two_tower(CARD, n_genres=G, hist_len=L, dim=16, seed=0, sequence=sequence)
        a, b = tt.embed_users(users), tt.embed_users(reordered)
        assert np.all(np.isfinite(a)) and np.allclose(a[0], b[0])
        assert np.allclose(a[1:], b[1:], atol=1e-6) != sequence
    path = export_onnx(tt.user_tower, tmp_path / "user.onnx")
    assert parity(tt.user_tower, path, users) <= 1e-4


def test_two_tower_build_is_deterministic():
    rng = np.random.default_rng(3)
    users = random_users(4, rng)
    a = build_two_tower(CARD, n_genres=G, hist_len=L, dim=8, seed=5).embed_users(users)
    b = build_two_tower(CARD, n_genres=G, hist_len=L, dim=8, seed=5).embed_users(users)
    c = build_two_tower(CARD, n_genres=G, hist_len=L, dim=8, seed=6).embed_users(users)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_item_log_q():
    lq = item_log_q_from_ids(np.array([5, 5, 7, 9]))
    np.testing.assert_allclose(np.exp(lq), [0.5, 0.5, 0.25, 0.25], rtol=1e-6)


def recall_at_k(tt, users, pos_ids, k):
    ue = tt.embed_users(users)
    ie = tt.embed_items(item_features(ITEMS, np.random.default_rng(0)))
    top = ITEMS[np.argsort(-(ue @ ie.T), axis=1)[:, :k]]
    return float(np.mean([p in row for p, row in zip(pos_ids, top, strict=True)])), top


def test_two_tower_learns_planted_clusters():
    rng = np.random.default_rng(4)
    users, items, _ = planted_pairs(3000, rng)
    tt = build_two_tower(CARD, n_genres=G, hist_len=L, dim=16, seed=0, temperature=0.1)
    seen = []
    losses = tt.fit(
        users,
        items,
        item_log_q_from_ids(items["item_id"]),
        epochs=4,
        batch_size=128,
        learning_rate=1e-2,
        progress=lambda e, loss: seen.append(e),
    )
    assert seen == [0, 1, 2, 3]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1

    test_users, test_items, cluster = planted_pairs(400, np.random.default_rng(5))
    k = 10
    recall, top = recall_at_k(tt, test_users, test_items["item_id"], k)
    # the best possible is 10/20 = 0.5 (the positive is uniform in its cluster); random 0.25
    assert recall > 1.5 * k / N_ITEMS, recall
    in_cluster = np.where(cluster[:, None] == 0, top < CLUSTER_B[0], top >= CLUSTER_B[0])
    assert in_cluster.mean() > 0.9

    # a cold user: no attributes, two recent items of cluster B -> cluster B items
    cold = {k_: np.zeros((1,), np.int64) for k_ in USER_INPUTS if k_ != "hist_items"}
    cold["hist_items"] = np.array([[CLUSTER_B[3], CLUSTER_B[7], 0, 0, 0, 0]])
    _, top_cold = recall_at_k(tt, cold, [CLUSTER_B[0]], k)
    assert np.mean(top_cold >= CLUSTER_B[0]) >= 0.9


def test_fit_rejects_bad_inputs(tower):
    rng = np.random.default_rng(6)
    users, items, _ = planted_pairs(10, rng)
    with pytest.raises(ValueError, match="rows"):
        tower.fit(users, item_features(ITEMS[:5], rng), epochs=1)
    with pytest.raises(ValueError, match="missing"):
        tower.fit({"user_age": users["user_age"]}, items, epochs=1)


# ---------------------------------------------------------------------------- DLRM


def ranker_rows(n: int, rng: np.random.Generator):
    x = {k: rng.integers(0, CARD[k], n) for k in RANKER_INPUTS if k not in ("dense", "hist_items")}
    x["item_id"] = rng.choice(ITEMS, n)
    x["hist_items"] = rng.integers(0, CARD["item_id"], (n, L))
    x["dense"] = rng.normal(10.0, 5.0, (n, D)).astype(np.float32)  # unscaled on purpose
    # planted: gender 2 likes cluster A, the others cluster B; plus a dense-feature effect
    likes = (x["user_gender"] == 2) == (x["item_id"] < CLUSTER_B[0])
    logit = 2.5 * np.where(likes, 1.0, -1.0) + 0.8 * (x["dense"][:, 0] - 10.0) / 5.0
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def dlrm():
    return build_dlrm(CARD, n_dense=D, hist_len=L, emb_dim=8, bottom=(16, 8), top=(16, 8))


def test_dlrm_shape_and_range(dlrm):
    x, _ = ranker_rows(9, np.random.default_rng(7))
    p = keras.ops.convert_to_numpy(dlrm(x))
    assert p.shape == (9, 1)
    assert np.all((p > 0) & (p < 1))
    assert predict_ranker(dlrm, x).shape == (9,)
    assert sorted(t.name for t in dlrm.inputs) == sorted(RANKER_INPUTS)
    assert list(dlrm.output_names) == ["score"]
    with pytest.raises(ValueError, match="emb_dim"):
        build_dlrm(CARD, n_dense=D, hist_len=L, emb_dim=8, bottom=(16, 4))


def test_dlrm_learns_planted_signal():
    x, y = ranker_rows(6000, np.random.default_rng(8))
    xt, yt = ranker_rows(2000, np.random.default_rng(9))
    model = build_dlrm(CARD, n_dense=D, hist_len=L, emb_dim=8, bottom=(16, 8), top=(16, 8))
    before = evaluate_ranker(model, xt, yt)
    losses = fit_ranker(model, x, y, epochs=4, batch_size=256, learning_rate=1e-2)
    after = evaluate_ranker(model, xt, yt)
    assert losses[-1] < losses[0]
    assert after["auc"] > 0.7 and after["auc"] > before["auc"] + 0.1, (before, after)
    assert after["logloss"] < before["logloss"]
    assert model.get_layer("dense_norm").adapted


def test_auc_hand_checked():
    y = np.array([1, 0, 1, 0])
    assert auc(y, [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert auc(y, [0.1, 0.9, 0.2, 0.8]) == 0.0
    assert auc(y, [0.9, 0.8, 0.3, 0.1]) == 0.75  # 3 of 4 (pos, neg) pairs ordered
    assert auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties count half
    assert np.isnan(auc([1, 1], [0.2, 0.3]))
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))


def test_evaluate_ranker_on_a_pass_through_model():
    # a "ranker" whose score is dense[:, 0], so its AUC is known exactly
    inputs = {n: keras.Input(shape=(), dtype="int64", name=n) for n in RANKER_INPUTS}
    inputs["dense"] = keras.Input(shape=(D,), dtype="float32", name="dense")
    inputs["hist_items"] = keras.Input(shape=(L,), dtype="int64", name="hist_items")
    model = keras.Model(inputs, keras.layers.Lambda(lambda d: d[:, :1])(inputs["dense"]))
    x, _ = ranker_rows(4, np.random.default_rng(10))
    x["dense"][:, 0] = [0.9, 0.1, 0.8, 0.2]
    res = evaluate_ranker(model, x, np.array([1, 0, 1, 0]))
    assert res["auc"] == 1.0
    assert res["logloss"] == pytest.approx(-np.mean(np.log([0.9, 0.9, 0.8, 0.8])), rel=1e-5)
    assert evaluate_ranker(model, x, np.array([0, 1, 0, 1]))["auc"] == 0.0


# ---------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tower, dlrm):
    out = tmp_path_factory.mktemp("onnx")
    # give the ranker non-trivial dense statistics so the standardisation is exercised
    x, y = ranker_rows(300, np.random.default_rng(11))
    fit_ranker(dlrm, x, y, epochs=1, batch_size=100)
    return {
        "user": (
            tower.user_tower,
            export_onnx(tower.user_tower, out / "user.onnx"),
            USER_INPUTS,
            "user_embedding",
        ),
        "item": (
            tower.item_tower,
            export_onnx(tower.item_tower, out / "item.onnx"),
            ITEM_INPUTS,
            "item_embedding",
        ),
        "dlrm": (dlrm, export_onnx(dlrm, out / "dlrm.onnx"), RANKER_INPUTS, "score"),
    }


def all_features(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x, _ = ranker_rows(n, rng)
    x.update(item_features(x["item_id"], rng))
    x["hist_items"][0] = 0  # an empty history
    x["item_id"][-1] = 10_000  # out of vocabulary
    return x


@pytest.mark.parametrize("name", ["user", "item", "dlrm"])
def test_onnx_names_and_parity(exported, name):
    model, path, names, output = exported[name]
    sess = onnx_session(path)
    assert sorted(i.name for i in sess.get_inputs()) == sorted(names)
    assert [o.name for o in sess.get_outputs()] == [output]
    assert all(i.shape[0] == "batch" for i in sess.get_inputs())  # dynamic batch
    rng = np.random.default_rng(12)
    for n in (1, 2, 33):
        x = all_features(n, rng)
        assert parity(model, path, x) <= 1e-4
        got = run_onnx(sess, x)  # extra keys are ignored, dtypes are cast
        assert got.shape[0] == n and np.all(np.isfinite(got))


def test_run_onnx_casts_and_complains(exported):
    model, path, _, _ = exported["item"]
    sess = onnx_session(path)
    x = item_features(ITEMS[:3], np.random.default_rng(13))
    as_lists = {k: v.tolist() for k, v in x.items()}  # Python ints/floats -> int64/float32
    np.testing.assert_allclose(run_onnx(sess, as_lists), run_onnx(sess, x), atol=0)
    with pytest.raises(ValueError, match="item_year"):
        run_onnx(sess, {k: v for k, v in x.items() if k != "item_year"})
