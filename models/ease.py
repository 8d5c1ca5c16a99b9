"""EASE (Steck 2019), a strong item-item baseline for offline evaluation.

B = I − P·diag(1/diag(P)) with P = (XᵀX + λI)⁻¹ over the binary user × item matrix X, so that
diag(B) = 0. A user's scores are x·B for their current history x: a user's history is folded in
at scoring time and nothing is fitted per user. P is dense (items²): this is for catalogs of
tens of thousands of items at most.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

MAX_ITEMS = 50_000


class EASE:
    def __init__(self, items: list[str], weights: np.ndarray):
        self.items = items
        self.row = {item: n for n, item in enumerate(items)}
        self.weights = weights  # float32 [items, items], zero diagonal

    @classmethod
    def fit(cls, interactions: pd.DataFrame, items: Sequence[str], lam: float) -> EASE:
        """`interactions`: user_id, item_id (repeats count once); `items`: the score columns."""
        items = list(items)
        if len(items) > MAX_ITEMS:
            raise ValueError(f"EASE needs an items² matrix: {len(items):,} items is too many")
        row = {item: n for n, item in enumerate(items)}
        pairs = interactions[interactions["item_id"].isin(row)][["user_id", "item_id"]]
        pairs = pairs.drop_duplicates()
        users = {u: n for n, u in enumerate(pairs["user_id"].unique())}
        x = np.zeros((len(users), len(items)), dtype=np.float64)
        x[pairs["user_id"].map(users).to_numpy(), pairs["item_id"].map(row).to_numpy()] = 1.0
        gram = x.T @ x + lam * np.eye(len(items))
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)
        np.fill_diagonal(b, 0.0)
        return cls(items, b.astype(np.float32))

    def scores(self, histories: Iterable[Iterable[str]]) -> np.ndarray:
        """float32 [histories, items]: each history (any order; unknown ids ignored) folded in."""
        histories = list(histories)
        x = np.zeros((len(histories), len(self.items)), dtype=np.float32)
        for n, history in enumerate(histories):
            x[n, [self.row[i] for i in set(history) if i in self.row]] = 1.0
        return x @ self.weights
