"""Ranking metrics over recommended lists and sets of relevant items."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_k(recommended: Sequence[str], relevant: set[str], k: int) -> float:
    if not relevant:
        return 0.0
    return len(set(recommended[:k]) & relevant) / min(len(relevant), k)


def ndcg_at_k(recommended: Sequence[str], relevant: set[str], k: int) -> float:
    if not relevant:
        return 0.0
    gains = [1.0 / np.log2(i + 2) for i, item in enumerate(recommended[:k]) if item in relevant]
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(len(relevant), k)))
    return float(sum(gains) / ideal)


def coverage(lists: Sequence[Sequence[str]], catalog_size: int, k: int) -> float:
    """Share of the catalog that appears in at least one top-k list."""
    seen = {item for rec in lists for item in rec[:k]}
    return len(seen) / catalog_size if catalog_size else 0.0
