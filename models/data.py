"""Data sets: MovieLens-100K (from the ``recbole==1.2.1`` wheel), RecBole atomic-file directories,
a fast synthetic generator, and the temporal split used for evaluation.

Every loader returns a :class:`Dataset` with the same column names and dtypes:

* ``interactions``: ``user_id`` (str), ``item_id`` (str), ``rating`` (float32),
  ``timestamp`` (int64, epoch seconds), sorted by timestamp (stable).
* ``users``: ``user_id`` (str), ``age`` (Int64), ``gender``, ``occupation``, ``zip_code``
  (str or None).
* ``items``: ``item_id`` (str), ``title`` (str or None), ``year`` (Int64), ``genres``
  (a Python ``list[str]`` per row).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ML100K_NAME = "ml-100k"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
_WHEEL_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{ext}"
_EXTENSIONS = ("inter", "user", "item")
_DOWNLOAD_TIMEOUT_S = 600

INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_code")
ITEM_COLUMNS = ("item_id", "title", "year", "genres")

# RecBole field names (after the ``:type`` suffix is removed) → our column names.
_ITEM_ALIASES = {
    "title": ("movie_title", "title"),
    "year": ("release_year", "year"),
    "genres": ("class", "genre", "genres"),
}


class DataUnavailable(RuntimeError):
    """The data set could not be found or fetched."""


@dataclass
class Dataset:
    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame


# ------------------------------------------------------------------------------------------------
# MovieLens-100K and RecBole atomic files
# ------------------------------------------------------------------------------------------------


def load_movielens_100k(cache_dir: Path) -> Dataset:
    """MovieLens-100K, extracted once from the recbole wheel into ``cache_dir/ml-100k/``."""
    target = Path(cache_dir) / ML100K_NAME
    if not all((target / f"{ML100K_NAME}.{ext}").is_file() for ext in _EXTENSIONS):
        _fetch_movielens_100k(target)
    return load_directory(target)


def _fetch_movielens_100k(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="streamrec-recbole-") as tmp:
        wheel = _download_recbole_wheel(Path(tmp), target)
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for ext in _EXTENSIONS:
                member = _WHEEL_MEMBER.format(ext=ext)
                try:
                    data = zf.read(member)
                except KeyError as exc:
                    raise DataUnavailable(
                        f"{wheel.name} has no {member}. {_manual_hint(target)}"
                    ) from exc
                _write_atomically(target / f"{ML100K_NAME}.{ext}", data)


def _download_recbole_wheel(tmp: Path, target: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", RECBOLE_REQUIREMENT, "-d", str(tmp),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataUnavailable(
            f"Could not run `{' '.join(cmd)}`: {exc}. {_manual_hint(target)}"
        ) from exc
    wheels = sorted(tmp.glob("recbole-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise DataUnavailable(
            f"Downloading the MovieLens-100K files failed: `pip download {RECBOLE_REQUIREMENT}` "
            f"exited with {proc.returncode}{'' if wheels else ' and produced no wheel'}:\n"
            f"{tail}\n{_manual_hint(target)}"
        )
    return wheels[0]


def _manual_hint(target: Path) -> str:
    return (
        f"To supply the files by hand, copy ml-100k.inter, ml-100k.user and ml-100k.item "
        f"(RecBole atomic files, found in the {RECBOLE_REQUIREMENT} wheel under "
        f"recbole/dataset_example/ml-100k/) into {target}, or load any directory of RecBole "
        f"atomic files with models.data.load_directory(path)."
    )


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_directory(path: Path) -> Dataset:
    """A data set from a directory of RecBole atomic files (``*.inter``; ``*.user`` and
    ``*.item`` optional)."""
    path = Path(path)
    inter = _find_atomic_file(path, "inter")
    if inter is None:
        raise DataUnavailable(
            f"No *.inter file in {path}: a data set directory needs a RecBole interaction file "
            f"(tab-separated, header like 'user_id:token\\titem_id:token\\trating:float\\t"
            f"timestamp:float'); *.user and *.item files are optional."
        )
    user = _find_atomic_file(path, "user")
    item = _find_atomic_file(path, "item")
    return Dataset(
        name=inter.stem,
        interactions=_parse_interactions(_read_atomic(inter), inter),
        users=_parse_users(_read_atomic(user)) if user else _empty_users(),
        items=_parse_items(_read_atomic(item)) if item else _empty_items(),
    )


def _find_atomic_file(directory: Path, ext: str) -> Path | None:
    candidates = sorted(directory.glob(f"*.{ext}"))
    if len(candidates) > 1:
        preferred = [p for p in candidates if p.stem == directory.name]
        if len(preferred) != 1:
            names = ", ".join(p.name for p in candidates)
            raise DataUnavailable(f"Several *.{ext} files in {directory} ({names}); keep one.")
        candidates = preferred
    return candidates[0] if candidates else None


def _read_atomic(path: Path) -> pd.DataFrame:
    """All fields as strings ("" where empty); ``name:type`` headers reduced to ``name``."""
    frame = pd.read_csv(
        path,
        sep="\t",
        dtype=str,
        keep_default_na=False,
        na_filter=False,
        quoting=csv.QUOTE_NONE,
        encoding="utf-8",
    )
    return frame.rename(columns=lambda c: c.split(":", 1)[0].strip())


def _parse_interactions(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(raw.columns)}")
    for column in ("user_id", "item_id", "timestamp"):
        empty = int((raw[column].str.strip() == "").sum())
        if empty:
            raise ValueError(f"{path}: {empty} row(s) with an empty {column}")
    rating = (
        _to_float(raw["rating"]) if "rating" in raw.columns else pd.Series(1.0, index=raw.index)
    )
    frame = pd.DataFrame(
        {
            "user_id": raw["user_id"].str.strip().astype(object),
            "item_id": raw["item_id"].str.strip().astype(object),
            "rating": rating.to_numpy(dtype=np.float32),
            "timestamp": np.floor(_to_float(raw["timestamp"], strict=True)).astype(np.int64),
        }
    )
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _parse_users(raw: pd.DataFrame) -> pd.DataFrame:
    if "user_id" not in raw.columns:
        raise ValueError(f"user file without a user_id column: {list(raw.columns)}")
    n = len(raw)
    return pd.DataFrame(
        {
            "user_id": raw["user_id"].str.strip().astype(object),
            "age": _to_int64(raw["age"]) if "age" in raw else pd.array([None] * n, "Int64"),
            "gender": _optional_str(raw, "gender"),
            "occupation": _optional_str(raw, "occupation"),
            "zip_code": _optional_str(raw, "zip_code"),
        }
    )


def _parse_items(raw: pd.DataFrame) -> pd.DataFrame:
    if "item_id" not in raw.columns:
        raise ValueError(f"item file without an item_id column: {list(raw.columns)}")
    source = {
        ours: next((name for name in names if name in raw.columns), None)
        for ours, names in _ITEM_ALIASES.items()
    }
    n = len(raw)
    year = raw[source["year"]] if source["year"] else None
    genres = raw[source["genres"]] if source["genres"] else pd.Series([""] * n, index=raw.index)
    return pd.DataFrame(
        {
            "item_id": raw["item_id"].str.strip().astype(object),
            "title": _optional_str(raw, source["title"]),
            "year": _to_int64(year) if year is not None else pd.array([None] * n, "Int64"),
            "genres": [value.split() for value in genres],
        }
    )


def _optional_str(raw: pd.DataFrame, column: str | None) -> pd.Series:
    if column is None or column not in raw.columns:
        return pd.Series([None] * len(raw), index=raw.index, dtype=object)
    values = raw[column].str.strip()
    return values.where(values != "", None).astype(object)


def _to_float(values: pd.Series, strict: bool = False) -> pd.Series:
    stripped = values.str.strip()
    return pd.to_numeric(stripped.where(stripped != ""), errors="raise" if strict else "coerce")


def _to_int64(values: pd.Series) -> pd.Series:
    """Whole numbers as nullable Int64; empty or non-numeric (e.g. 'unkonwn', 'V') → <NA>."""
    return _to_float(values).round().astype("Int64")


def _empty_users() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Series([], dtype=object),
            "age": pd.Series([], dtype="Int64"),
            "gender": pd.Series([], dtype=object),
            "occupation": pd.Series([], dtype=object),
            "zip_code": pd.Series([], dtype=object),
        }
    )


def _empty_items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": pd.Series([], dtype=object),
            "title": pd.Series([], dtype=object),
            "year": pd.Series([], dtype="Int64"),
            "genres": pd.Series([], dtype=object),
        }
    )


# ------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------

_OCCUPATIONS = (
    "student", "engineer", "educator", "programmer", "writer", "artist",
    "healthcare", "executive", "retired", "other",
)  # fmt: skip
_START_TS = 1_700_000_000
_SPAN_S = 30 * 86_400
_PREFERRED_SHARE = 0.7  # share of events drawn from one of the user's two preferred genres


def synthetic(
    n_users: int, n_items: int, n_events: int, seed: int = 0, n_genres: int = 18
) -> Dataset:
    """A random data set with a Zipf-like (exponent 1.1) item popularity and learnable taste.

    Each item has a primary genre (plus up to two more); each user prefers two genres. 70 % of
    a user's events pick a popular item of a preferred genre (popularity-weighted within the
    primary genre), the rest a popular item of any genre; preferred-genre events get higher
    ratings. Timestamps spread over 30 days. Users are Zipf-like active (exponent 0.8), and a few
    user attributes are missing (age 3 %, gender 2 %).
    """
    if n_users < 1 or n_items < 1 or n_events < 0 or n_genres < 1:
        raise ValueError("need n_users >= 1, n_items >= 1, n_events >= 0 and n_genres >= 1")
    rng = np.random.default_rng(seed)
    genre_names = [f"genre{g:02d}" for g in range(n_genres)]

    item_weight = _zipf_weights(rng, n_items, 1.1)
    primary = rng.integers(0, n_genres, n_items)
    items = _synthetic_items(rng, n_items, primary, genre_names)
    users, preferred = _synthetic_users(rng, n_users, n_genres)

    user_idx = _weighted_draw(rng, np.cumsum(_zipf_weights(rng, n_users, 0.8)), n_events)
    genre = preferred[user_idx, rng.integers(0, 2, n_events)]
    item_idx = _weighted_draw(rng, np.cumsum(item_weight), n_events)
    in_genre = _draw_within_genre(rng, item_weight, primary, genre, n_genres)
    use_pref = (rng.random(n_events) < _PREFERRED_SHARE) & (in_genre >= 0)
    item_idx = np.where(use_pref, in_genre, item_idx)

    liked = primary[item_idx] == genre
    rating = np.clip(np.rint(3.0 + liked + rng.normal(0.0, 0.8, n_events)), 1, 5)
    timestamp = _START_TS + np.sort(rng.integers(0, _SPAN_S, n_events))

    interactions = pd.DataFrame(
        {
            "user_id": users["user_id"].to_numpy()[user_idx],
            "item_id": items["item_id"].to_numpy()[item_idx],
            "rating": rating.astype(np.float32),
            "timestamp": timestamp.astype(np.int64),
        }
    )
    return Dataset(
        name=f"synthetic-{n_users}u-{n_items}i-{n_events}e-s{seed}",
        interactions=interactions,
        users=users,
        items=items,
    )


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Weight ``rank**-exponent`` with ranks randomly assigned, so ids do not reveal popularity."""
    return (rng.permutation(n) + 1.0) ** -exponent


def _weighted_draw(rng: np.random.Generator, cumulative: np.ndarray, size: int) -> np.ndarray:
    picks = np.searchsorted(cumulative, rng.random(size) * cumulative[-1], side="right")
    return np.minimum(picks, len(cumulative) - 1)


def _draw_within_genre(
    rng: np.random.Generator,
    weight: np.ndarray,
    primary: np.ndarray,
    genre: np.ndarray,
    n_genres: int,
) -> np.ndarray:
    """One popularity-weighted item of each requested primary genre (-1 where it has none)."""
    order = np.argsort(primary, kind="stable")
    cumulative = np.cumsum(weight[order])
    counts = np.bincount(primary, minlength=n_genres)
    ends = np.cumsum(counts)
    hi = cumulative[ends - 1]
    lo = np.where(ends - counts > 0, cumulative[np.maximum(ends - counts - 1, 0)], 0.0)
    x = lo[genre] + rng.random(len(genre)) * (hi[genre] - lo[genre])
    pos = np.searchsorted(cumulative, x, side="right")
    pos = np.clip(pos, ends[genre] - counts[genre], ends[genre] - 1)  # float rounding at edges
    return np.where(counts[genre] > 0, order[np.clip(pos, 0, len(order) - 1)], -1)


def _synthetic_items(
    rng: np.random.Generator, n: int, primary: np.ndarray, names: list[str]
) -> pd.DataFrame:
    n_genres = len(names)
    extra = (primary[:, None] + rng.integers(1, max(n_genres, 2), (n, 2))) % n_genres
    n_extra = rng.integers(0, 3, n) if n_genres > 1 else np.zeros(n, dtype=np.int64)
    codes = np.column_stack([primary, extra])
    # Few distinct (genre, genre, genre, count) combinations: build each list once, copy it.
    keys = ((codes[:, 0] * n_genres + codes[:, 1]) * n_genres + codes[:, 2]) * 3 + n_extra
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    lists = [
        list(dict.fromkeys(names[g] for g in codes[i, : 1 + n_extra[i]].tolist()))
        for i in first.tolist()
    ]
    return pd.DataFrame(
        {
            "item_id": _ids("i", n),
            "title": _ids("Movie ", n),
            "year": pd.array(rng.integers(1950, 2024, n), dtype="Int64"),
            "genres": [lists[k].copy() for k in inverse.tolist()],
        }
    )


def _synthetic_users(
    rng: np.random.Generator, n: int, n_genres: int
) -> tuple[pd.DataFrame, np.ndarray]:
    preferred = rng.integers(0, n_genres, (n, 2))
    age = pd.array(rng.integers(16, 75, n), dtype="Int64")
    age[rng.random(n) < 0.03] = pd.NA
    gender = np.where(rng.random(n) < 0.5, "F", "M").astype(object)
    gender[rng.random(n) < 0.02] = None
    users = pd.DataFrame(
        {
            "user_id": _ids("u", n),
            "age": age,
            "gender": gender,
            "occupation": np.array(_OCCUPATIONS, dtype=object)[
                rng.integers(0, len(_OCCUPATIONS), n)
            ],
            "zip_code": pd.Series(rng.integers(10_000, 100_000, n)).astype(str).astype(object),
        }
    )
    return users, preferred


def _ids(prefix: str, n: int) -> np.ndarray:
    """``prefix1 .. prefixN`` as an object array (index it with 0-based positions)."""
    return np.array([f"{prefix}{i}" for i in range(1, n + 1)], dtype=object)


# ------------------------------------------------------------------------------------------------
# Temporal split
# ------------------------------------------------------------------------------------------------


@dataclass
class Split:
    train: pd.DataFrame
    test: pd.DataFrame
    cut_timestamp: int


def temporal_split(interactions: pd.DataFrame, quantile: float = 0.8) -> Split:
    """Train = events strictly before the cut, test = at/after it (no leakage).

    The cut is the timestamp of the event at position ``round(quantile * n)`` in time order, so
    train holds ``quantile`` of the events, a little less when many share the cut timestamp.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if interactions.empty:
        raise ValueError("cannot split an empty interaction frame")
    ordered = interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)
    ts = ordered["timestamp"].to_numpy()
    cut = int(ts[min(int(round(quantile * len(ts))), len(ts) - 1)])
    before = ts < cut
    return Split(
        train=ordered[before].reset_index(drop=True),
        test=ordered[~before].reset_index(drop=True),
        cut_timestamp=cut,
    )


def split_users(split: Split) -> tuple[set[str], set[str]]:
    """(warm, cold) test users: with / without any interaction in train."""
    seen = set(split.train["user_id"].unique())
    test_users = set(split.test["user_id"].unique())
    return test_users & seen, test_users - seen


def load(spec: str, cache_dir: Path) -> Dataset:
    """A data set by name: `ml-100k`, `synthetic:USERS,ITEMS,EVENTS[,SEED]`, or a directory."""
    if spec == "ml-100k":
        return load_movielens_100k(cache_dir)
    if spec.startswith("synthetic:"):
        try:
            numbers = [int(x) for x in spec.split(":", 1)[1].split(",")]
            users, items, events, *seed = numbers
        except ValueError:
            raise DataUnavailable(
                f"bad synthetic spec {spec!r}: expected synthetic:USERS,ITEMS,EVENTS[,SEED]"
            ) from None
        return synthetic(users, items, events, seed=seed[0] if seed else 0)
    path = Path(spec)
    if path.is_dir():
        return load_directory(path)
    raise DataUnavailable(
        f"unknown data set {spec!r}: use ml-100k, synthetic:USERS,ITEMS,EVENTS or a directory "
        "of RecBole atomic files (.inter, .user, .item)"
    )
