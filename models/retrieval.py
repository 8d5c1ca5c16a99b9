"""Two-tower retrieval model (Keras 3 on the TensorFlow backend).

The user tower reads the user's attributes and the user's most recent items (``hist_items``,
0-padded, in the ``item_id`` vocabulary). The item-id embedding table is shared by the item
tower and by the history pooling of the user tower, so a user unknown at training time who has
a few recent items (from the stream) still lands near those items.

Both towers end in an L2 normalisation, so ``user @ item`` is a cosine similarity and a Faiss
inner-product index retrieves with it.

Training is an in-batch sampled softmax with logQ correction, a temperature and masking of
in-batch duplicates of the positive item, written as a compiled ``tf.function`` GradientTape
step.

Only the offline side imports this module (it imports TensorFlow); serving uses the ONNX
export (:mod:`models.onnx_export`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

USER_FEATURES: tuple[str, ...] = ("user_age", "user_gender", "user_occupation", "user_zip")
USER_INPUTS: tuple[str, ...] = (*USER_FEATURES, "hist_items")
ITEM_INPUTS: tuple[str, ...] = ("item_id", "item_genres", "item_year")
# The title's hashed tokens (`models.workflow.HashTokens`): an item unseen in training is
# embedded from its content (title, genres, year), not as one shared out-of-vocabulary vector.
TITLE_INPUT = "item_title"
USER_OUTPUT = "user_embedding"
ITEM_OUTPUT = "item_embedding"

PAD_INDEX = 0
OOV_INDEX = 1

ProgressCallback = Callable[[int, float], None]


# --------------------------------------------------------------------------------------------
# graph helpers shared with models.ranking (plain keras.ops, all export cleanly to ONNX)
# --------------------------------------------------------------------------------------------


def safe_index(x, cardinality: int):
    """Map indices outside ``[0, cardinality)`` to the OOV index 1 (instead of a Gather error).

    The stream can record items newer than the model's vocabulary; they must not crash serving.
    """
    x = ops.cast(x, "int64")
    bad = ops.logical_or(ops.less(x, 0), ops.greater_equal(x, cardinality))
    return ops.where(bad, ops.ones_like(x) * OOV_INDEX, x)


def masked_mean(emb, idx):
    """Mean of ``emb`` (n, L, d) over positions where ``idx`` (n, L) != 0; zeros when none.

    Returns ``(pooled (n, d), count (n, 1))``.
    """
    mask = ops.cast(ops.not_equal(idx, PAD_INDEX), emb.dtype)
    count = ops.sum(mask, axis=1, keepdims=True)
    total = ops.sum(emb * ops.expand_dims(mask, -1), axis=1)
    return total / ops.maximum(count, 1.0), count


def l2_normalize(x, eps: float = 1e-12):
    """Row-wise L2 normalisation; finite for an all-zero row."""
    sq = ops.sum(x * x, axis=-1, keepdims=True)
    return x / ops.sqrt(ops.maximum(sq, eps))


def check_cardinalities(cardinalities: Mapping[str, int], names) -> None:
    missing = [n for n in names if n not in cardinalities]
    if missing:
        raise ValueError(f"cardinalities missing for {missing}")
    small = {n: cardinalities[n] for n in names if int(cardinalities[n]) < 2}
    if small:
        raise ValueError(f"cardinalities must be >= 2 (0 = pad, 1 = OOV): {small}")


# --------------------------------------------------------------------------------------------
# building and training helpers shared with models.ranking
# --------------------------------------------------------------------------------------------


class SeededLayers:
    """Makes layers whose initialisers take successive seeds from ``seed``, so a build is
    reproducible without global seeding (as long as the layers are made in the same order)."""

    def __init__(self, seed: int) -> None:
        self._seeds = itertools.count(int(seed) * 1000)

    def next_seed(self) -> int:
        return next(self._seeds)

    def embedding(self, name: str, cardinality: int, dim: int) -> layers.Embedding:
        return layers.Embedding(
            int(cardinality),
            dim,
            name=f"{name}_emb",
            embeddings_initializer=keras.initializers.RandomNormal(
                stddev=0.05, seed=self.next_seed()
            ),
        )

    def dense(self, units: int, name: str, activation: str | None = None) -> layers.Dense:
        return layers.Dense(
            units,
            activation=activation,
            name=name,
            kernel_initializer=keras.initializers.GlorotUniform(seed=self.next_seed()),
        )


def train_epochs(
    train_batch: Callable[[np.ndarray], float | None],
    n: int,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    on_epoch: Callable[[int, float, float], None],
) -> list[float]:
    """Mini-batch epochs over ``n`` rows in a fresh shuffled order each; returns the mean loss
    per epoch.

    ``train_batch(rows)`` trains on one batch of row indices and returns its loss (None: batch
    skipped); ``on_epoch(epoch, mean_loss, seconds)`` runs after each epoch.
    """
    losses: list[float] = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        total, batches = 0.0, 0
        for start in range(0, n, batch_size):
            loss = train_batch(order[start : start + batch_size])
            if loss is not None:
                total += loss
                batches += 1
        mean = total / max(batches, 1)
        losses.append(mean)
        on_epoch(epoch, mean, time.perf_counter() - t0)
    return losses


@keras.saving.register_keras_serializable(package="streamrec")
class RecentSequence(layers.Layer):
    """The user's recent items read in order: the most recent item attends over the history
    (each item embedding plus a learned embedding of its position, most recent first); the
    output is the attended, projected history. Zeros without history.

    Where mean pooling weighs every recent item alike, this weighs them by their position and
    by how they go with what the user watched last. One attention row, not a full block: only
    the most recent position's output is used, so the other rows would be computed for nothing.
    """

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def build(self, emb_shape, idx_shape=None):
        length, d = int(emb_shape[1]), int(emb_shape[2])
        self.position = self.add_weight(
            shape=(length, d),
            initializer=keras.initializers.RandomNormal(stddev=0.05, seed=self.seed),
            name="position",
        )
        self.query, self.key, self.value = (
            self.add_weight(
                shape=(d, d),
                initializer=keras.initializers.GlorotUniform(seed=self.seed + n),
                name=name,
            )
            for n, name in enumerate(("query", "key", "value"), start=1)
        )

    def call(self, emb, idx):
        mask = ops.cast(ops.not_equal(idx, PAD_INDEX), emb.dtype)  # (n, L)
        h = (emb + self.position[None]) * ops.expand_dims(mask, -1)
        q = ops.matmul(h[:, 0], self.query)  # the most recent item asks
        logits = ops.sum(ops.matmul(h, self.key) * ops.expand_dims(q, 1), axis=-1)
        logits = logits / float(np.sqrt(int(emb.shape[-1]))) + (1.0 - mask) * -1e9
        attended = ops.sum(ops.expand_dims(ops.softmax(logits, axis=-1), -1) * h, axis=1)
        out = ops.matmul(attended, self.value)
        return out * ops.minimum(ops.sum(mask, axis=1, keepdims=True), 1.0)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


@dataclass
class TwoTower:
    user_tower: keras.Model
    item_tower: keras.Model
    dim: int
    hist_len: int
    n_genres: int
    temperature: float = 0.05
    seed: int = 0
    item_inputs: tuple[str, ...] = ITEM_INPUTS
    # Share of training pairs whose item id the item tower does not see (it gets the OOV
    # index): the tower learns to embed an item from its content alone, as it must for items
    # unseen in training. The in-batch duplicate mask still uses the real ids.
    item_id_dropout: float = 0.0
    history: list[float] = field(default_factory=list)
    _optimizer: keras.optimizers.Optimizer | None = field(default=None, repr=False)
    _step: Callable | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- training
    def trainable_variables(self) -> list:
        seen: set[int] = set()
        out = []
        for v in [*self.user_tower.trainable_variables, *self.item_tower.trainable_variables]:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
        return out

    def _make_step(self, user_inputs: Mapping, item_inputs: Mapping) -> Callable:
        variables = self.trainable_variables()
        optimizer = self._optimizer
        user_tower, item_tower = self.user_tower, self.item_tower
        inv_temp = 1.0 / float(self.temperature)

        def spec(a: np.ndarray) -> tf.TensorSpec:
            return tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype))

        signature = (
            {k: spec(np.asarray(v)) for k, v in user_inputs.items()},
            {k: spec(np.asarray(v)) for k, v in item_inputs.items()},
            tf.TensorSpec((None,), tf.float32),
            tf.TensorSpec((None,), tf.int64),
        )

        @tf.function(input_signature=signature)
        def step(u, it, log_q, ids):
            with tf.GradientTape() as tape:
                ue = user_tower(u, training=True)
                ie = item_tower(it, training=True)
                logits = tf.matmul(ue, ie, transpose_b=True) * inv_temp
                # logQ correction: popular items appear as in-batch negatives more often
                logits = logits - log_q[None, :]
                n = tf.shape(ids)[0]
                same = tf.equal(ids[:, None], ids[None, :])
                dup = tf.logical_and(same, tf.logical_not(tf.eye(n, dtype=tf.bool)))
                logits = tf.where(dup, tf.fill(tf.shape(logits), -1e9), logits)
                labels = tf.range(n)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
                )
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            return loss

        return step

    def fit(
        self,
        user_inputs: Mapping[str, np.ndarray],
        item_inputs: Mapping[str, np.ndarray],
        item_log_q: np.ndarray | None = None,
        epochs: int = 3,
        batch_size: int = 512,
        learning_rate: float = 3e-3,
        verbose: bool = False,
        progress: ProgressCallback | None = None,
    ) -> list[float]:
        """Train on positive (user state, item) pairs; row i of both dicts is one pair.

        ``item_log_q[i]`` is the log sampling probability of row i's item (see
        :func:`item_log_q`); ``None`` computes it from ``item_inputs["item_id"]``.
        Returns the mean loss per epoch (also appended to ``self.history``).
        """
        u = _as_inputs(user_inputs, USER_INPUTS)
        it = _as_inputs(item_inputs, self.item_inputs)
        n = _check_rows(u, it)
        if n < 2:
            raise ValueError("in-batch softmax needs at least 2 training pairs")
        if item_log_q is None:
            item_log_q = item_log_q_from_ids(it["item_id"])
        log_q = np.asarray(item_log_q, dtype=np.float32).reshape(-1)
        if log_q.shape[0] != n:
            raise ValueError(f"item_log_q has {log_q.shape[0]} rows, inputs have {n}")
        if not np.all(np.isfinite(log_q)):
            raise ValueError("item_log_q must be finite")
        if batch_size < 2:
            raise ValueError("batch_size must be >= 2")

        if self._optimizer is None or float(
            keras.ops.convert_to_numpy(self._optimizer.learning_rate)
        ) != float(learning_rate):
            self._optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
            self._step = None
        if self._step is None:
            self._step = self._make_step(u, it)

        rng = np.random.default_rng(self.seed + len(self.history))

        def train_batch(idx: np.ndarray) -> float | None:
            if idx.shape[0] < 2:
                return None
            batch = {k: v[idx] for k, v in it.items()}
            ids = batch["item_id"]
            if self.item_id_dropout > 0:
                drop = rng.random(len(idx)) < self.item_id_dropout
                batch["item_id"] = np.where(drop, OOV_INDEX, ids)
            return float(self._step({k: v[idx] for k, v in u.items()}, batch, log_q[idx], ids))

        def on_epoch(epoch: int, mean: float, seconds: float) -> None:
            self.history.append(mean)
            if verbose:
                print(
                    f"two-tower epoch {epoch + 1}/{epochs} loss {mean:.4f} "
                    f"({n / seconds:,.0f} pairs/s)"
                )
            if progress is not None:
                progress(epoch, mean)

        return train_epochs(train_batch, n, epochs, batch_size, rng, on_epoch)

    # ---------------------------------------------------------------- inference
    def embed_users(self, user_inputs: Mapping[str, np.ndarray], batch_size: int = 8192):
        return _predict(self.user_tower, _as_inputs(user_inputs, USER_INPUTS), batch_size)

    def embed_items(self, item_inputs: Mapping[str, np.ndarray], batch_size: int = 8192):
        return _predict(self.item_tower, _as_inputs(item_inputs, self.item_inputs), batch_size)


def item_log_q_from_ids(item_ids: np.ndarray) -> np.ndarray:
    """Per-row log sampling probability of each row's item: log(count(item) / n)."""
    ids = np.asarray(item_ids).reshape(-1)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return np.log(counts[inverse] / ids.shape[0]).astype(np.float32)


def build_two_tower(
    cardinalities: Mapping[str, int],
    n_genres: int,
    hist_len: int,
    dim: int = 64,
    seed: int = 0,
    temperature: float = 0.05,
    attr_dim: int | None = None,
    hidden: int | None = None,
    sequence: bool = False,
    title_len: int | None = None,
    item_id_dropout: float = 0.0,
) -> TwoTower:
    """Build the user and item towers (sharing the item-id embedding table).

    ``sequence``: the user tower also reads the history in order (:class:`RecentSequence`).
    ``title_len``: the item tower also reads ``item_title`` (that many hashed title tokens,
    cardinality ``cardinalities["item_title"]``), mean-pooled.
    """
    if not 0.0 <= item_id_dropout < 1.0:
        raise ValueError("item_id_dropout must be in [0, 1)")
    check_cardinalities(cardinalities, (*USER_FEATURES, "item_id", "item_year"))
    if n_genres < 1 or hist_len < 1 or dim < 1:
        raise ValueError("n_genres, hist_len and dim must be >= 1")
    make = SeededLayers(seed)
    towers = _Towers(
        cardinalities=cardinalities,
        dim=dim,
        attr_dim=attr_dim or max(8, dim // 4),
        hidden=hidden or 2 * dim,
        make=make,
        item_emb=make.embedding("item_id", cardinalities["item_id"], dim),
    )
    user_tower = _user_tower(towers, hist_len, sequence)
    item_tower = _item_tower(towers, n_genres, title_len)
    return TwoTower(
        user_tower=user_tower,
        item_tower=item_tower,
        dim=dim,
        hist_len=hist_len,
        n_genres=n_genres,
        temperature=temperature,
        seed=seed,
        item_inputs=tuple(item_tower.input),
        item_id_dropout=item_id_dropout,
    )


@dataclass(frozen=True)
class _Towers:
    """What both towers are built from. The layers' seeds follow the order they are made in,
    so the towers must be built in the same order (user, then item) for the same weights."""

    cardinalities: Mapping[str, int]
    dim: int
    attr_dim: int
    hidden: int
    make: SeededLayers
    item_emb: layers.Embedding  # the item-id table both towers share

    def categorical(self, name: str, x):
        """The ``attr_dim`` embedding of categorical input ``x`` called ``name``."""
        card = self.cardinalities[name]
        return self.make.embedding(name, card, self.attr_dim)(safe_index(x, card))

    def item_ids(self, x):
        return safe_index(x, int(self.cardinalities["item_id"]))

    def head(self, parts: list, residual, prefix: str, output: str):
        """Concatenated parts -> hidden ReLU layer -> ``dim`` units, plus ``residual``,
        L2-normalised."""
        x = layers.Concatenate(name=f"{prefix}_concat")(parts)
        x = self.make.dense(self.hidden, f"{prefix}_hidden", "relu")(x)
        x = self.make.dense(self.dim, f"{prefix}_out")(x)
        return layers.Identity(name=output)(l2_normalize(x + residual))


def _user_tower(towers: _Towers, hist_len: int, sequence: bool) -> keras.Model:
    inputs = {n: keras.Input(shape=(), dtype="int64", name=n) for n in USER_FEATURES}
    inputs["hist_items"] = keras.Input(shape=(hist_len,), dtype="int64", name="hist_items")
    parts = [towers.categorical(n, inputs[n]) for n in USER_FEATURES]
    hist = towers.item_ids(inputs["hist_items"])
    hist_emb = towers.item_emb(hist)
    pooled, count = masked_mean(hist_emb, hist)
    if sequence:
        recent = RecentSequence(seed=towers.make.next_seed(), name="recent_sequence")
        parts.append(recent(hist_emb, hist))
    # residual from the pooled history: an item-to-item term that works for cold users
    user_vec = towers.head([*parts, pooled, count / float(hist_len)], pooled, "user", USER_OUTPUT)
    return keras.Model(inputs, user_vec, name="user_tower")


def _item_tower(towers: _Towers, n_genres: int, title_len: int | None) -> keras.Model:
    inputs = {
        "item_id": keras.Input(shape=(), dtype="int64", name="item_id"),
        "item_genres": keras.Input(shape=(n_genres,), dtype="float32", name="item_genres"),
        "item_year": keras.Input(shape=(), dtype="int64", name="item_year"),
    }
    id_vec = towers.item_emb(towers.item_ids(inputs["item_id"]))
    genres = towers.make.dense(towers.attr_dim, "genres_proj")(inputs["item_genres"])
    parts = [id_vec, genres, towers.categorical("item_year", inputs["item_year"])]
    if title_len:
        check_cardinalities(towers.cardinalities, (TITLE_INPUT,))
        inputs[TITLE_INPUT] = keras.Input(shape=(title_len,), dtype="int64", name=TITLE_INPUT)
        card = towers.cardinalities[TITLE_INPUT]
        tokens = safe_index(inputs[TITLE_INPUT], card)
        token_emb = towers.make.embedding(TITLE_INPUT, card, towers.attr_dim)(tokens)
        parts.append(masked_mean(token_emb, tokens)[0])
    item_vec = towers.head(parts, id_vec, "item", ITEM_OUTPUT)
    return keras.Model(inputs, item_vec, name="item_tower")


# --------------------------------------------------------------------------------------------
# input plumbing
# --------------------------------------------------------------------------------------------

_FLOAT_INPUTS = {"item_genres", "dense"}


def _as_inputs(inputs: Mapping[str, np.ndarray], names) -> dict[str, np.ndarray]:
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"missing inputs {missing}")
    out = {}
    for n in names:
        a = np.asarray(inputs[n])
        out[n] = np.ascontiguousarray(a, dtype=np.float32 if n in _FLOAT_INPUTS else np.int64)
    return out


def _check_rows(*dicts: Mapping[str, np.ndarray]) -> int:
    sizes = {k: v.shape[0] for d in dicts for k, v in d.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"inputs disagree on the number of rows: {sizes}")
    return next(iter(sizes.values()))


def _predict(model: keras.Model, inputs: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    n = _check_rows(inputs)
    out = [
        keras.ops.convert_to_numpy(model({k: v[s : s + batch_size] for k, v in inputs.items()}))
        for s in range(0, n, batch_size)
    ]
    if not out:
        return np.zeros((0, *model.output.shape[1:]), dtype=np.float32)
    return np.concatenate(out, axis=0)
