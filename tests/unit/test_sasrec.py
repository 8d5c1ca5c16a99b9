"""Unit tests of the SASRec baseline on a tiny synthetic catalog (no servers)."""

from __future__ import annotations

import numpy as np
import pytest

from models.sasrec import SASRec, SASRecConfig, _windows

ITEMS = [f"i{k}" for k in range(10)]
N = len(ITEMS)
FAST = {"max_len": 8, "dim": 16, "dropout": 0.1, "batch_size": 16, "learning_rate": 1e-2}


def cycle(start: int, length: int) -> list[str]:
    """``length`` items of the cycle i0 -> i1 -> ... -> i9 -> i0, from ``i{start}``."""
    return [ITEMS[(start + t) % N] for t in range(length)]


def ending_at(last: int, length: int) -> list[str]:
    return cycle(last - length + 1, length)


SEQUENCES = {f"u{u}": cycle(u % N, 20 + u) for u in range(20)}


@pytest.fixture(scope="module")
def model() -> SASRec:
    return SASRec.fit(SEQUENCES, ITEMS, SASRecConfig(epochs=10, **FAST))


def top1(model: SASRec, histories: list[list[str]]) -> list[str]:
    return [model.items[k] for k in model.scores(histories).argmax(axis=1)]


def test_learns_the_deterministic_next_item(model: SASRec) -> None:
    after_i3 = top1(model, [ending_at(3, n) for n in range(1, 13)])
    assert after_i3.count("i4") >= 11, after_i3
    # every item as the last one, histories of 1..6 items: 60 cases, 1 in 10 by chance
    cases = [(last, ending_at(last, n)) for last in range(N) for n in range(1, 7)]
    predicted = top1(model, [h for _, h in cases])
    hits = sum(p == ITEMS[(last + 1) % N] for (last, _), p in zip(cases, predicted, strict=True))
    assert hits >= 54, list(zip(cases, predicted, strict=True))


def test_scores_shape_empty_and_unknown_ids(model: SASRec) -> None:
    s = model.scores([["i1", "i2"], [], ["nope"], ["nope", "i3", "also-nope"], ["i3"]])
    assert s.shape == (5, N) and s.dtype == np.float32
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s[1], s[2])  # only unknown ids = empty history
    np.testing.assert_allclose(s[3], s[4], rtol=1e-5, atol=1e-5)
    assert not np.allclose(s[1], s[4])  # the history matters
    assert model.scores([]).shape == (0, N)


def test_only_the_last_max_len_items_are_used(model: SASRec) -> None:
    long = cycle(0, 3 * FAST["max_len"] + 1)
    other_prefix = cycle(5, 7) + long[-FAST["max_len"] :]
    s = model.scores([long, long[-FAST["max_len"] :], other_prefix])
    np.testing.assert_allclose(s[0], s[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s[0], s[2], rtol=1e-5, atol=1e-5)


def test_early_stopping_keeps_the_best_validation_epoch() -> None:
    # The validation answer contradicts the training pattern (i7 after i2), so fitting the
    # training data makes validation worse at some point and early stopping must kick in.
    validation = {f"v{k}": (ending_at(2, k + 1), ["i7"]) for k in range(5)}
    cfg = SASRecConfig(epochs=25, patience=2, **FAST)
    seen: list[tuple[int, float, float | None]] = []
    model = SASRec.fit(SEQUENCES, ITEMS, cfg, validation, lambda *a: seen.append(a))

    ndcgs = [v for _, _, v in seen]
    assert [e for e, _, _ in seen] == list(range(1, len(seen) + 1))
    assert all(v is not None for v in ndcgs)
    assert model.best_epoch == int(np.argmax(ndcgs)) + 1
    assert len(seen) == model.best_epoch + cfg.patience < cfg.epochs  # it did stop early
    # the weights are those of the best epoch, not of the last one: the validation `fit`
    # reported for each epoch, computed again on the model it returned
    assert model._validate(validation) == pytest.approx(max(ndcgs), abs=1e-6)  # noqa: SLF001


def test_without_validation_all_epochs_are_trained() -> None:
    seen: list[tuple[int, float, float | None]] = []
    model = SASRec.fit(
        SEQUENCES, ITEMS, SASRecConfig(epochs=3, **FAST), progress=lambda *a: seen.append(a)
    )
    assert model.best_epoch == 3
    assert [(e, v) for e, _, v in seen] == [(1, None), (2, None), (3, None)]
    losses = [loss for _, loss, _ in seen]
    assert losses[-1] < losses[0] and all(np.isfinite(losses))


def test_windows_train_every_target_exactly_once() -> None:
    max_len = 6
    tokens = [1, *range(2, 2 + 17)]  # start token, then 17 items
    inputs, targets = _windows([tokens], max_len)
    trained = sorted(int(t) for t in targets[targets >= 0])
    assert trained == list(range(17))  # item k + 2 is target k
    for x, y in zip(inputs, targets, strict=True):
        # the target at a position is the input at the next position
        at = np.flatnonzero(y[:-1] >= 0)
        np.testing.assert_array_equal(y[at] + 2, x[at + 1])
    assert inputs.shape == targets.shape and inputs.shape[1] == max_len


def test_rejects_a_catalog_with_duplicates() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        SASRec.fit(SEQUENCES, [*ITEMS, "i0"], SASRecConfig(epochs=1, **FAST))
