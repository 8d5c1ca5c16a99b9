"""A catalog of items unseen in training: content features (hashed title tokens, genres, year)
give each its own vector, the vectorised item table equals the row-by-row one, and the ANN
index keeps its recall at the chosen parameters (no servers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.data import synthetic
from models.index import ItemIndex
from models.inputs import (
    ITEM_TOWER_INPUTS,
    item_row,
    item_table,
    item_tower_inputs,
    make_workflow,
)
from models.workflow import HashTokens, Workflow


def test_hash_tokens_batch_and_single_row_agree_and_are_stable():
    op = HashTokens(max_len=3, buckets=1000)
    values = pd.Series(["Toy Story", None, "", "a B c d", "Movie 12", np.nan], dtype=object)
    batch = op.transform(values)
    assert batch.dtype == np.int64 and batch.shape == (6, 3)
    for i, v in enumerate(values):
        np.testing.assert_array_equal(op.transform_one(v), batch[i])
    assert batch[1].tolist() == [0, 0, 0] and batch[2].tolist() == [0, 0, 0]
    assert (batch[3] >= 2).all() and batch[3].max() < op.cardinality  # first 3 tokens kept
    assert HashTokens(max_len=3, buckets=1000).transform_one("toy STORY").tolist() == (
        batch[0].tolist()
    )  # case-insensitive, the same in every process (CRC-32, not Python's hash)
    loaded = Workflow.from_dict(Workflow({"t": [op]}).fit(pd.DataFrame({"t": values})).to_dict())
    np.testing.assert_array_equal(loaded.transform(pd.DataFrame({"t": values}))["t"], batch)


@pytest.fixture(scope="module")
def fitted():
    """The project's workflow fitted on training rows of a few items; a catalog of those and of
    items it never saw (with nulls)."""
    ds = synthetic(n_users=50, n_items=400, n_events=600, seed=5)
    seen = ds.items.iloc[:100]
    rows = [{**item_row(i, p), "age": 30, "gender": "F", "occupation": "x", "zip_prefix": "12",
             "recent_items": []}
            for i, p in zip(seen["item_id"], seen.to_dict("records"), strict=True)]  # fmt: skip
    wf = make_workflow().fit(pd.DataFrame(rows))
    profiles = {r["item_id"]: {k: r[k] for k in ("title", "year", "genres")} for r in
                ds.items.to_dict("records")}  # fmt: skip
    profiles["i2"]["year"] = None
    profiles["i300"]["title"] = None
    profiles["i301"]["genres"] = []
    profiles["only-id"] = {}
    return wf, profiles


def test_the_vectorised_item_table_equals_the_row_by_row_one(fitted):
    wf, profiles = fitted
    ids = [*profiles, "no-profile"]
    names = item_tower_inputs(wf)
    assert names == ITEM_TOWER_INPUTS
    table = item_table(wf, ids, profiles, names)
    for n, item in enumerate(ids):
        one = wf.transform_one(item_row(item, profiles.get(item)), names)
        for name in names:
            assert table[name][n].dtype == one[name].dtype
            np.testing.assert_array_equal(table[name][n], one[name], err_msg=f"{name} {item}")
    unseen = table["item_id"][100:400]
    assert (unseen == 1).all()  # not in the vocabulary: the item id is OOV ...
    titles = {tuple(t) for t in table["item_title"][100:400]}
    assert len(titles) == 300  # ... and the titles tell them apart


def test_unseen_items_get_distinct_vectors_from_their_content(fitted):
    """Two items the model never saw (OOV id) with different titles, or genres, or years, get
    different vectors; the same content gives the same vector. After training with item-id
    dropout, an unseen item lands with the items of its genre."""
    from models.retrieval import build_two_tower

    wf, profiles = fitted
    spec = wf.output_spec()
    cards = {name: c for name, (_, _, c) in spec.items() if c}
    tower = build_two_tower(
        cards,
        spec["item_genres"][1],
        spec["hist_items"][1],
        dim=16,
        seed=0,
        title_len=spec["item_title"][1],
        item_id_dropout=0.5,
    )
    assert tower.item_inputs == ITEM_TOWER_INPUTS
    ids = list(profiles)
    table = item_table(wf, ids, profiles, ITEM_TOWER_INPUTS)
    vectors = tower.embed_items(table)
    unseen = vectors[100:400]
    assert len(np.unique(unseen.round(6), axis=0)) == 300
    twin = item_table(wf, ["i200", "i201"], {"i200": profiles["i200"], "i201": profiles["i200"]},
                      ITEM_TOWER_INPUTS)  # fmt: skip
    twins = tower.embed_items(twin)
    np.testing.assert_allclose(twins[0], twins[1], atol=1e-6)

    # train: users who watched genre-g items go on with genre-g items; half the item ids hidden
    rng = np.random.default_rng(0)
    genres = table["item_genres"]
    primary = genres[:100].argmax(axis=1)
    n = 4000
    pos = rng.integers(0, 100, n)
    hist = np.zeros((n, spec["hist_items"][1]), dtype=np.int64)
    for r in range(n):
        same = np.flatnonzero(primary == primary[pos[r]])
        hist[r, :3] = table["item_id"][rng.choice(same, 3)]
    users = {k: np.full(n, 2, dtype=np.int64) for k in ("user_age", "user_gender")}
    users |= {k: np.full(n, 2, dtype=np.int64) for k in ("user_occupation", "user_zip")}
    users["hist_items"] = hist
    tower.fit(users, {k: v[pos] for k, v in table.items()}, epochs=6, batch_size=128)
    vectors = tower.embed_items(table)
    assert len(np.unique(vectors[100:400].round(6), axis=0)) == 300
    hits, counted = 0, 0
    for r in range(100, 400):
        g = genres[r].argmax()
        if not (primary == g).any():
            continue
        counted += 1
        centroid = vectors[:100][primary == g].mean(axis=0)
        others = vectors[:100][primary != g].mean(axis=0)
        hits += float(vectors[r] @ centroid > vectors[r] @ others)
    assert counted > 200 and hits / counted > 0.8


def test_the_ann_index_finds_95_percent_of_the_exact_top_100():
    """At the chosen parameters, on 20,000 vectors (low intrinsic dimension, as embeddings are),
    recall@100 against exact search is at least 0.95."""
    rng = np.random.default_rng(0)
    n, d = 20_000, 64
    x = rng.normal(size=(n, 12)).astype(np.float32) @ rng.normal(size=(12, d)).astype(np.float32)
    x += 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = ItemIndex.build(x, [f"i{i}" for i in range(n)], exact_limit=10_000)
    assert not index.exact
    queries = x[rng.integers(0, n, 200)] + 0.3 * rng.normal(size=(200, d)).astype(np.float32)
    assert index.recall_vs_exact(queries, 100) >= 0.95
