import numpy as np

from models.index import ItemIndex


def _data(n=500, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, [f"item-{i}" for i in range(n)]


def test_exact_index_returns_the_true_nearest_neighbours():
    emb, ids = _data()
    index = ItemIndex.build(emb, ids)
    queries = np.random.default_rng(1).normal(size=(20, 16)).astype(np.float32)
    scores, found = index.search(queries, 10)
    truth = np.argsort(-(queries @ emb.T), axis=1)[:, :10]
    assert index.exact
    assert found == [[ids[r] for r in row] for row in truth]
    np.testing.assert_allclose(scores, np.sort(queries @ emb.T, axis=1)[:, ::-1][:, :10], 1e-5)


def test_the_approximate_index_above_the_limit_reports_its_recall_against_exact():
    emb, ids = _data(n=3000)
    index = ItemIndex.build(emb, ids, exact_limit=1000)
    queries = np.random.default_rng(2).normal(size=(50, 16)).astype(np.float32)
    assert not index.exact
    assert index.recall_vs_exact(queries, 10) > 0.9


def test_new_items_become_searchable_and_ids_survive_save_load(tmp_path):
    emb, ids = _data(n=100)
    index = ItemIndex.build(emb, ids)
    new = np.zeros((1, 16), dtype=np.float32)
    new[0, 3] = 1.0
    index.add(new, ["brand-new"])
    index.add(new, ["brand-new"])  # idempotent
    assert len(index) == 101
    index.save(tmp_path)
    loaded = ItemIndex.load(tmp_path)
    _, found = loaded.search(new, 1)
    assert found == [["brand-new"]]
