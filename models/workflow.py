"""A small fit/transform preprocessing workflow (our replacement for NVTabular).

A :class:`Workflow` maps output names to chains of operators. It is fitted offline on a
DataFrame, saved as a versioned JSON artifact, and applied in two ways that give the same
numbers:

* ``transform(df)`` (batch, vectorized): one ``np.ndarray`` per output, shape ``(n,)`` for
  scalar outputs and ``(n, width)`` for list/multi-hot outputs.
* ``transform_one(row)`` (one request, dict lookups, microseconds): per output a numpy *array
  scalar* (``np.int64`` / ``np.float32``, shape ``()``) or a 1-D array of shape ``(width,)``,
  equal in value and dtype to row ``i`` of the batch output.

Output dtypes are int64 (indices: Categorify, Bucketize, ListCategorify) or float32 (Normalize,
LogOp, MultiHot). Index conventions: 0 = null/padding, 1 = out-of-vocabulary, 2.. = vocabulary.

Nulls are ``None``, ``NaN``, ``pd.NA`` and ``pd.NaT``. Categorical values are compared as
strings (``str(value)``), so ``7`` and ``"7"`` are the same category.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

FORMAT_NAME = "streamrec-workflow"
FORMAT_VERSION = 1

PAD_INDEX = 0
OOV_INDEX = 1
FIRST_INDEX = 2


class NotFittedError(RuntimeError):
    pass


class WorkflowFormatError(ValueError):
    pass


def is_null(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


def _null_mask(values: pd.Series) -> np.ndarray:
    return values.isna().to_numpy(dtype=bool)


def _as_series(values: Any) -> pd.Series:
    return values if isinstance(values, pd.Series) else pd.Series(values, dtype=_dtype_of(values))


def _dtype_of(values: Any) -> Any:
    return values.dtype if isinstance(values, np.ndarray) else object


def _floats(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (0.0 where null) and the null mask."""
    series = _as_series(values)
    mask = _null_mask(series)
    x = np.zeros(len(series), dtype=np.float64)
    x[~mask] = series[~mask].astype(np.float64).to_numpy()
    return x, mask


def _cell_list(value: Any) -> list[Any]:
    """A list-column cell as a list: a null cell is empty; a string or a number is an error."""
    if isinstance(value, list):
        return value
    if isinstance(value, tuple | np.ndarray):
        return list(value)
    if is_null(value):
        return []
    raise TypeError(f"expected a list, tuple or array (or null) in a list column, got {value!r}")


# ------------------------------------------------------------------------------------------------
# Operators
# ------------------------------------------------------------------------------------------------


class Op:
    """One step of a column's chain.

    ``dtype`` is the output dtype ("int64"/"float32"), or None for an op that passes values
    through (only allowed before another op). ``width`` is None for scalar outputs.
    """

    dtype: ClassVar[str | None] = None

    def fit(self, values: Any) -> Op:
        return self

    def transform(self, values: Any) -> np.ndarray:
        raise NotImplementedError

    def transform_one(self, value: Any) -> Any:
        raise NotImplementedError

    @property
    def width(self) -> int | None:
        return None

    @property
    def cardinality(self) -> int | None:
        return None

    def params(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {}

    def state(self) -> dict[str, Any] | None:
        """What ``fit`` learned (None when not fitted or nothing to learn)."""
        return None

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"op": type(self).__name__, "params": self.params(), "state": self.state()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Op:
        op_cls = OPS.get(data.get("op"))
        if op_cls is None:
            raise WorkflowFormatError(f"unknown operator {data.get('op')!r}; known: {list(OPS)}")
        if cls is not Op and not issubclass(op_cls, cls):
            raise WorkflowFormatError(f"expected a {cls.__name__}, got {data['op']!r}")
        op = op_cls(**data.get("params", {}))
        if data.get("state") is not None:
            op.load_state(data["state"])
        return op

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class Categorify(Op):
    """Values → indices: 0 null, 1 out-of-vocabulary (or rarer than ``freq_threshold``),
    2.. the vocabulary in descending frequency, ties by value.

    With ``vocab_from`` (inside a Workflow) it reuses the vocabulary of another output's
    Categorify instead of fitting its own.
    """

    dtype = "int64"

    def __init__(
        self, freq_threshold: int = 1, max_size: int | None = None, vocab_from: str | None = None
    ):
        if freq_threshold < 1:
            raise ValueError("freq_threshold must be >= 1")
        if max_size is not None and max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.freq_threshold = freq_threshold
        self.max_size = max_size
        self.vocab_from = vocab_from
        self.vocab: list[str] | None = None
        self._lookup: dict[str, int] = {}
        self._index: pd.Index | None = None

    def fit(self, values: Any) -> Categorify:
        if self.vocab_from is not None:
            return self  # the Workflow shares the source's vocabulary
        series = _as_series(values)
        keys = series[~_null_mask(series)].astype(str)
        counts = keys.value_counts()
        counts = counts[counts >= self.freq_threshold]
        frame = pd.DataFrame({"value": counts.index.astype(str), "count": counts.to_numpy()})
        frame = frame.sort_values(["count", "value"], ascending=[False, True], kind="stable")
        vocab = frame["value"].tolist()
        self.set_vocab(vocab if self.max_size is None else vocab[: self.max_size])
        return self

    def set_vocab(self, vocab: Sequence[str]) -> None:
        self.vocab = list(vocab)
        self._lookup = {value: i for i, value in enumerate(self.vocab, start=FIRST_INDEX)}
        self._index = pd.Index(self.vocab, dtype=object)

    def share_vocab(self, source: Categorify) -> None:
        if source.vocab is None:
            raise NotFittedError("the source Categorify is not fitted")
        self.vocab, self._lookup, self._index = source.vocab, source._lookup, source._index

    def transform(self, values: Any) -> np.ndarray:
        self._check_fitted()
        series = _as_series(values)
        mask = _null_mask(series)
        pos = self._index.get_indexer(series.astype(str).to_numpy(dtype=object))
        out = np.where(pos >= 0, pos + FIRST_INDEX, OOV_INDEX).astype(np.int64)
        out[mask] = PAD_INDEX
        return out

    def transform_one(self, value: Any) -> np.int64:
        self._check_fitted()
        if is_null(value):
            return np.int64(PAD_INDEX)
        return np.int64(self._lookup.get(str(value), OOV_INDEX))

    def index_of(self, value: Any) -> int:
        """Plain-int index of one value (for code that needs no numpy scalar)."""
        return PAD_INDEX if is_null(value) else self._lookup.get(str(value), OOV_INDEX)

    @property
    def cardinality(self) -> int | None:
        return None if self.vocab is None else len(self.vocab) + FIRST_INDEX

    def params(self) -> dict[str, Any]:
        return {
            "freq_threshold": self.freq_threshold,
            "max_size": self.max_size,
            "vocab_from": self.vocab_from,
        }

    def state(self) -> dict[str, Any] | None:
        if self.vocab is None or self.vocab_from is not None:
            return None
        return {"vocab": self.vocab}

    def load_state(self, state: dict[str, Any]) -> None:
        self.set_vocab(state["vocab"])

    def _check_fitted(self) -> None:
        if self.vocab is None:
            raise NotFittedError(f"{self!r} is not fitted")


class Normalize(Op):
    """``(x - mean) / max(std, min_std)``; nulls → 0.0 (the mean)."""

    dtype = "float32"

    def __init__(self, min_std: float = 1e-6):
        self.min_std = min_std
        self.mean: float | None = None
        self.std: float | None = None

    def fit(self, values: Any) -> Normalize:
        x, mask = _floats(values)
        x = x[~mask]
        self.mean = float(x.mean()) if len(x) else 0.0
        self.std = max(float(x.std()) if len(x) else 1.0, self.min_std)
        return self

    def transform(self, values: Any) -> np.ndarray:
        self._check_fitted()
        x, mask = _floats(values)
        out = (x - self.mean) / self.std
        out[mask] = 0.0
        return out.astype(np.float32)

    def transform_one(self, value: Any) -> np.float32:
        self._check_fitted()
        if is_null(value):
            return np.float32(0.0)
        return np.float32((float(value) - self.mean) / self.std)

    def params(self) -> dict[str, Any]:
        return {"min_std": self.min_std}

    def state(self) -> dict[str, Any] | None:
        return None if self.mean is None else {"mean": self.mean, "std": self.std}

    def load_state(self, state: dict[str, Any]) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])

    def _check_fitted(self) -> None:
        if self.mean is None:
            raise NotFittedError(f"{self!r} is not fitted")


class FillMissing(Op):
    """Replace nulls by ``value``; other values pass through unchanged (must not end a chain)."""

    def __init__(self, value: Any):
        self.value = value.item() if isinstance(value, np.generic) else value  # JSON-safe

    def transform(self, values: Any) -> np.ndarray:
        series = _as_series(values)
        out = series.to_numpy(dtype=object, na_value=None).copy()
        for i in np.flatnonzero(_null_mask(series)):
            out[i] = self.value
        return out

    def transform_one(self, value: Any) -> Any:
        return self.value if is_null(value) else value

    def params(self) -> dict[str, Any]:
        return {"value": self.value}


class LogOp(Op):
    """``log1p(max(x, 0))`` as float32; nulls stay null (NaN) for the next op."""

    dtype = "float32"

    def transform(self, values: Any) -> np.ndarray:
        x, mask = _floats(values)
        out = np.log1p(np.maximum(x, 0.0)).astype(np.float32)
        out[mask] = np.nan
        return out

    def transform_one(self, value: Any) -> np.float32:
        if is_null(value):
            return np.float32(np.nan)
        # Same numpy kernel as the batch path on a 1-element array: math.log1p (libm) may
        # differ from numpy's vectorized log1p in the last bit.
        x = np.array([max(float(value), 0.0)], dtype=np.float64)
        return np.log1p(x).astype(np.float32)[0]


class Bucketize(Op):
    """0 = null, 1 = below ``boundaries[0]``, ..., ``len(boundaries) + 1`` = at/above the last
    boundary (a value equal to a boundary goes to the upper bucket)."""

    dtype = "int64"

    def __init__(self, boundaries: Sequence[float]):
        bounds = [float(b) for b in boundaries]
        if not bounds or any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"boundaries must be non-empty and strictly increasing: {bounds}")
        self.boundaries = bounds
        self._array = np.asarray(bounds, dtype=np.float64)

    def transform(self, values: Any) -> np.ndarray:
        x, mask = _floats(values)
        out = np.searchsorted(self._array, x, side="right").astype(np.int64) + 1
        out[mask] = PAD_INDEX
        return out

    def transform_one(self, value: Any) -> np.int64:
        if is_null(value):
            return np.int64(PAD_INDEX)
        return np.int64(bisect.bisect_right(self.boundaries, float(value)) + 1)

    @property
    def cardinality(self) -> int:
        return len(self.boundaries) + 2

    def params(self) -> dict[str, Any]:
        return {"boundaries": self.boundaries}


class ListCategorify(Op):
    """A list of values → ``max_len`` indices, most recent first, 0-padded at the end.

    ``input_order`` says how the input lists are ordered: "newest_first" (the default, as the
    stream stores recent items: the first ``max_len`` are kept as they are) or "oldest_first"
    (chronological: the last ``max_len`` are kept, reversed). A null cell → all zeros; null
    elements → 0; unseen → 1.
    The vocabulary is its own (fitted over all elements) or, with ``vocab_from``, that of
    another output's Categorify (e.g. history items use the ``item_id`` vocabulary).
    """

    dtype = "int64"
    INPUT_ORDERS = ("oldest_first", "newest_first")

    def __init__(
        self,
        max_len: int,
        vocab_from: str | None = None,
        freq_threshold: int = 1,
        max_size: int | None = None,
        input_order: str = "newest_first",
    ):
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        if input_order not in self.INPUT_ORDERS:
            raise ValueError(f"input_order must be one of {self.INPUT_ORDERS}: {input_order!r}")
        self.max_len = max_len
        self.input_order = input_order
        self.categorify = Categorify(freq_threshold, max_size, vocab_from)

    @property
    def vocab_from(self) -> str | None:
        return self.categorify.vocab_from

    def fit(self, values: Any) -> ListCategorify:
        if self.vocab_from is None:  # else the Workflow shares the source's vocabulary
            self.categorify.fit(_flatten(values)[0])
        return self

    def share_vocab(self, source: Categorify) -> None:
        self.categorify.share_vocab(source)

    def transform(self, values: Any) -> np.ndarray:
        self.categorify._check_fitted()
        flat, rows, lengths = _flatten(values)
        out = np.zeros((len(lengths), self.max_len), dtype=np.int64)
        if not len(flat):
            return out
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        offset = np.arange(len(flat)) - starts  # position inside its own list
        if self.input_order == "oldest_first":
            col = np.repeat(lengths, lengths) - 1 - offset
        else:
            col = offset
        keep = col < self.max_len
        out[rows[keep], col[keep]] = self.categorify.transform(flat[keep])
        return out

    def transform_one(self, value: Any) -> np.ndarray:
        self.categorify._check_fitted()
        items = _cell_list(value)
        if self.input_order == "oldest_first":
            items = items[: -self.max_len - 1 : -1]
        out = np.zeros(self.max_len, dtype=np.int64)
        index_of = self.categorify.index_of
        for col, item in enumerate(items[: self.max_len]):
            out[col] = index_of(item)
        return out

    @property
    def width(self) -> int:
        return self.max_len

    @property
    def cardinality(self) -> int | None:
        return self.categorify.cardinality

    def params(self) -> dict[str, Any]:
        return {
            "max_len": self.max_len,
            "input_order": self.input_order,
            **self.categorify.params(),
        }

    def state(self) -> dict[str, Any] | None:
        return self.categorify.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.categorify.load_state(state)


class MultiHot(Op):
    """A list of values → float32 vector of width ``len(vocab)`` with 1.0 where present.

    ``vocab`` given, or fitted as the sorted distinct values. Unknown values are ignored; a
    null cell → all zeros.
    """

    dtype = "float32"

    def __init__(self, vocab: Sequence[str] | None = None):
        self.vocab: list[str] | None = None
        self._given = vocab is not None
        if vocab is not None:
            self._set_vocab(vocab)

    def _set_vocab(self, vocab: Sequence[str]) -> None:
        self.vocab = [str(v) for v in vocab]
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("MultiHot vocab has duplicates")
        self._lookup = {value: i for i, value in enumerate(self.vocab)}
        self._index = pd.Index(self.vocab, dtype=object)

    def fit(self, values: Any) -> MultiHot:
        if not self._given:
            flat, _, _ = _flatten(values)
            keys = flat[~pd.isna(flat)].astype(str)
            self._set_vocab(sorted(set(keys.tolist())))
        return self

    def transform(self, values: Any) -> np.ndarray:
        if self.vocab is None:
            raise NotFittedError(f"{self!r} is not fitted")
        flat, rows, lengths = _flatten(values)
        out = np.zeros((len(lengths), len(self.vocab)), dtype=np.float32)
        if len(flat):
            mask = pd.isna(flat)
            col = self._index.get_indexer(pd.Series(flat, dtype=object).astype(str).to_numpy())
            keep = (col >= 0) & ~mask
            out[rows[keep], col[keep]] = 1.0
        return out

    def transform_one(self, value: Any) -> np.ndarray:
        if self.vocab is None:
            raise NotFittedError(f"{self!r} is not fitted")
        out = np.zeros(len(self.vocab), dtype=np.float32)
        for item in _cell_list(value):
            if not is_null(item):
                col = self._lookup.get(str(item))
                if col is not None:
                    out[col] = 1.0
        return out

    @property
    def width(self) -> int | None:
        return None if self.vocab is None else len(self.vocab)

    def params(self) -> dict[str, Any]:
        return {"vocab": self.vocab if self._given else None}

    def state(self) -> dict[str, Any] | None:
        return None if self.vocab is None or self._given else {"vocab": self.vocab}

    def load_state(self, state: dict[str, Any]) -> None:
        self._set_vocab(state["vocab"])


class HashTokens(Op):
    """A text → its first ``max_len`` word tokens (lower-cased runs of letters and digits), each
    hashed (CRC-32, stable across processes) to ``2 .. buckets + 1``; 0-padded at the end. A
    null or empty text → all zeros. Nothing to fit: a text never seen in training still gets its
    own indices (an item unseen in training is embedded from its title).
    """

    dtype = "int64"
    _TOKEN = re.compile(r"[0-9a-z]+")

    def __init__(self, max_len: int = 8, buckets: int = 65536):
        if max_len < 1 or buckets < 1:
            raise ValueError("max_len and buckets must be >= 1")
        self.max_len = max_len
        self.buckets = buckets
        self._cache: dict[str, int] = {}

    def _index(self, token: str) -> int:
        index = self._cache.get(token)
        if index is None:
            index = FIRST_INDEX + zlib.crc32(token.encode()) % self.buckets
            if len(self._cache) < 1_000_000:
                self._cache[token] = index
        return index

    def _indices(self, value: Any) -> list[int]:
        if is_null(value):
            return []
        tokens = self._TOKEN.findall(str(value).lower())[: self.max_len]
        return [self._index(t) for t in tokens]

    def transform(self, values: Any) -> np.ndarray:
        cells = _as_series(values).tolist()
        out = np.zeros((len(cells), self.max_len), dtype=np.int64)
        findall, cache, index, n = self._TOKEN.findall, self._cache, self._index, self.max_len
        rows = [
            [] if is_null(v) else [cache.get(t) or index(t) for t in findall(str(v).lower())[:n]]
            for v in cells
        ]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        if lengths.sum():
            flat = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
            out[np.repeat(np.arange(len(rows)), lengths), np.arange(len(flat)) - starts] = flat
        return out

    def transform_one(self, value: Any) -> np.ndarray:
        out = np.zeros(self.max_len, dtype=np.int64)
        indices = self._indices(value)
        out[: len(indices)] = indices
        return out

    @property
    def width(self) -> int:
        return self.max_len

    @property
    def cardinality(self) -> int:
        return self.buckets + FIRST_INDEX

    def params(self) -> dict[str, Any]:
        return {"max_len": self.max_len, "buckets": self.buckets}


def _flatten(values: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A column of lists → (all elements as an object array, their row numbers, list lengths)."""
    lists = [_cell_list(cell) for cell in _as_series(values).tolist()]
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(chain.from_iterable(lists), dtype=object, count=int(lengths.sum()))
    return flat, np.repeat(np.arange(len(lists)), lengths), lengths


OPS: dict[str, type[Op]] = {
    cls.__name__: cls
    for cls in (
        Categorify,
        Normalize,
        FillMissing,
        LogOp,
        Bucketize,
        ListCategorify,
        MultiHot,
        HashTokens,
    )
}
_LIST_OPS = (ListCategorify, MultiHot, HashTokens)


# ------------------------------------------------------------------------------------------------
# Workflow
# ------------------------------------------------------------------------------------------------


class Workflow:
    """Output name → chain of operators, e.g.::

        Workflow(
            {
                "item_id": [Categorify()],
                "user_age": [FillMissing(30), Bucketize([18, 25, 35, 45, 55])],
                "item_genres": [MultiHot()],
                "hist_items": [ListCategorify(max_len=20, vocab_from="item_id")],
            },
            inputs={"user_age": "age", "item_genres": "genres"},
        )

    Each output reads the input column of the same name unless ``inputs`` maps it to another.
    ``vocab_from`` names another *output* whose chain contains a Categorify.
    """

    def __init__(
        self, columns: Mapping[str, Sequence[Op]], inputs: Mapping[str, str] | None = None
    ):
        self.columns: dict[str, list[Op]] = {name: list(ops) for name, ops in columns.items()}
        self.inputs: dict[str, str] = {name: name for name in self.columns}
        unknown = set(inputs or {}) - set(self.columns)
        if unknown:
            raise ValueError(f"inputs given for unknown outputs: {sorted(unknown)}")
        self.inputs.update(inputs or {})
        for name, ops in self.columns.items():
            _check_chain(name, ops)
        self._check_shared_vocabs()
        self._fitted = False

    # -- configuration -------------------------------------------------------------------------

    def _check_shared_vocabs(self) -> None:
        for name, source in self._vocab_links():
            if source not in self.columns:
                raise ValueError(f"{name}: vocab_from={source!r} is not an output of this workflow")
            source_op = _vocab_op(self.columns[source])
            if source_op is None or source_op.vocab_from is not None:
                raise ValueError(
                    f"{name}: vocab_from={source!r} needs a Categorify (with its own vocabulary) "
                    f"in the chain of {source!r}"
                )

    def _vocab_links(self) -> Iterable[tuple[str, str]]:
        for name, ops in self.columns.items():
            op = _vocab_op(ops)
            if op is not None and op.vocab_from is not None:
                yield name, op.vocab_from

    def _link_vocabs(self) -> None:
        for name, source in self._vocab_links():
            _vocab_op(self.columns[name]).share_vocab(_vocab_op(self.columns[source]))

    # -- fit / transform -----------------------------------------------------------------------

    def fit(self, df: pd.DataFrame) -> Workflow:
        self._check_columns(df.columns, self.inputs.values())
        shared = {name for name, _ in self._vocab_links()}
        for name in [n for n in self.columns if n not in shared]:
            self._fit_chain(self.columns[name], df[self.inputs[name]])
        self._link_vocabs()
        for name in shared:
            self._fit_chain(self.columns[name], df[self.inputs[name]])
        self._fitted = True
        return self

    @staticmethod
    def _fit_chain(ops: list[Op], values: Any) -> None:
        for i, op in enumerate(ops):
            op.fit(values)
            if i < len(ops) - 1:
                values = op.transform(values)

    def _selected(self, outputs: Iterable[str] | None) -> list[tuple[str, list[Op]]]:
        if outputs is None:
            return list(self.columns.items())
        return [(name, self.columns[name]) for name in outputs]

    def transform(
        self, df: pd.DataFrame, outputs: Iterable[str] | None = None
    ) -> dict[str, np.ndarray]:
        """All outputs, or only `outputs` (then only their input columns are needed)."""
        self._check_fitted()
        selected = self._selected(outputs)
        self._check_columns(df.columns, [self.inputs[name] for name, _ in selected])
        out = {}
        for name, ops in selected:
            values: Any = df[self.inputs[name]]
            for op in ops:
                values = op.transform(values)
            out[name] = values
        return out

    def transform_one(
        self, row: Mapping[str, Any], outputs: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """One row (a dict of input values) → {output: np.int64/np.float32 scalar or 1-D array}.

        Equal in value and dtype to row ``i`` of ``transform`` on a frame holding that row.
        """
        self._check_fitted()
        out = {}
        for name, ops in self._selected(outputs):
            try:
                value = row[self.inputs[name]]
            except KeyError:
                raise KeyError(f"row has no {self.inputs[name]!r} (input of {name!r})") from None
            for op in ops:
                value = op.transform_one(value)
            out[name] = value
        return out

    def output_spec(self) -> dict[str, tuple[str, int | None, int | None]]:
        """{output: (dtype, width or None for scalars, cardinality or None)}."""
        self._check_fitted()
        return {
            name: (ops[-1].dtype, ops[-1].width, ops[-1].cardinality)
            for name, ops in self.columns.items()
        }

    @property
    def input_columns(self) -> list[str]:
        return list(dict.fromkeys(self.inputs.values()))

    def vocab(self, name: str) -> list[str]:
        """The vocabulary (index ``i + 2`` ↔ ``vocab[i]``) of an output with a Categorify."""
        op = _vocab_op(self.columns[name])
        if op is None or op.vocab is None:
            raise ValueError(f"{name!r} has no fitted Categorify")
        return op.vocab

    def _check_columns(self, available: Iterable[str], needed: Iterable[str]) -> None:
        missing = sorted(set(needed) - set(available))
        if missing:
            raise KeyError(f"input columns missing: {missing}")

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError("the workflow is not fitted; call fit(df) or Workflow.load(path)")

    # -- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fitted": self._fitted,
            "inputs": self.inputs,
            "columns": {name: [op.to_dict() for op in ops] for name, ops in self.columns.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Workflow:
        if data.get("format") != FORMAT_NAME:
            raise WorkflowFormatError(
                f"not a {FORMAT_NAME} artifact (format={data.get('format')!r})"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise WorkflowFormatError(
                f"unsupported workflow format version {version!r}; this code reads version "
                f"{FORMAT_VERSION}. Re-fit and save the workflow with this version of streamrec."
            )
        columns = {name: [Op.from_dict(op) for op in ops] for name, ops in data["columns"].items()}
        workflow = cls(columns, inputs=data.get("inputs"))
        if data.get("fitted"):
            workflow._link_vocabs()
            workflow._fitted = True
        return workflow

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Workflow:
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise WorkflowFormatError(f"{path}: not a JSON workflow artifact: {exc}") from exc
        return cls.from_dict(data)


def _check_chain(name: str, ops: Sequence[Op]) -> None:
    if not ops:
        raise ValueError(f"{name}: empty operator chain")
    for op in ops:
        if not isinstance(op, Op):
            raise TypeError(f"{name}: {op!r} is not an operator")
    if ops[-1].dtype is None:
        raise ValueError(
            f"{name}: the chain must end with an op that outputs numbers, not {ops[-1]!r}"
        )
    for op in ops[:-1]:
        if isinstance(op, _LIST_OPS):
            raise ValueError(f"{name}: {op!r} outputs a vector and must be the last op")


def _vocab_op(ops: Sequence[Op]) -> Categorify | None:
    for op in ops:
        if isinstance(op, Categorify):
            return op
        if isinstance(op, ListCategorify):
            return op.categorify
    return None
