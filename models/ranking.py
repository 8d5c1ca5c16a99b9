"""DLRM ranker (Keras 3 on the TensorFlow backend).

Bottom MLP over the dense features -> an ``emb_dim`` vector; one embedding per categorical
feature; the masked mean of the user's recent items (``hist_items``, embedded with the same
table as ``item_id``); pairwise dot products of all these vectors (upper triangle, no self)
concatenated with the bottom output -> top MLP -> logit -> sigmoid ``score`` (n, 1).

With ``wide=True`` a linear ("wide") path from the standardised dense features is added to the
logit and the deep logit starts at zero, so the model starts as a logistic regression on the
dense features and the DLRM part learns a residual; :func:`fit_ranker` can train that residual
at a lower learning rate (``deep_lr_scale``), or not at all (0: the wide model alone). On a
temporal split the deep interactions fit the training period (static item appeal, in-sample
retrieval scores) and do not carry forward, while the wide combination of retrieval score and
time-decayed popularity does: see ``TrainConfig.ranker_deep_lr_scale`` in :mod:`models.train`.

The dense features are standardised inside the graph by a :class:`Standardize` layer
that :func:`fit_ranker` adapts on the training data the first time, so serving feeds
the raw dense values.

Only the offline side imports this module (it imports TensorFlow).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from models.retrieval import (
    SeededLayers,
    _as_inputs,
    _check_rows,
    _predict,
    check_cardinalities,
    masked_mean,
    safe_index,
    train_epochs,
)

CATEGORICAL: tuple[str, ...] = (
    "user_age",
    "user_gender",
    "user_occupation",
    "user_zip",
    "item_id",
    "item_year",
)
RANKER_INPUTS: tuple[str, ...] = (*CATEGORICAL, "dense", "hist_items")
RANKER_OUTPUT = "score"
DENSE_NORM_LAYER = "dense_norm"
WIDE_LAYER = "wide"

ProgressCallback = Callable[[int, float], None]


@keras.saving.register_keras_serializable(package="streamrec")
class Standardize(layers.Layer):
    """``(x - mean) * inv_std`` with non-trainable per-feature statistics.

    Not ``keras.layers.Normalization``: that layer keeps its adapted statistics as eager
    tensors, which ``tf2onnx.convert.from_function`` turns into extra ONNX *graph inputs*
    (named like ``dlrm/dense_norm/Sub/y:0``) instead of constants. Variables are frozen.
    """

    def build(self, input_shape):
        d = int(input_shape[-1])
        self.mean = self.add_weight(shape=(d,), initializer="zeros", trainable=False, name="mean")
        self.inv_std = self.add_weight(
            shape=(d,), initializer="ones", trainable=False, name="inv_std"
        )

    def call(self, x):
        return (x - ops.cast(self.mean, x.dtype)) * ops.cast(self.inv_std, x.dtype)

    @property
    def adapted(self) -> bool:
        """False while the layer still holds its initial statistics (mean 0, scale 1)."""
        mean = ops.convert_to_numpy(self.mean)
        inv_std = ops.convert_to_numpy(self.inv_std)
        return not (np.all(mean == 0.0) and np.all(inv_std == 1.0))

    def set_stats(self, data: np.ndarray) -> None:
        """Fit on ``data`` (n, d); constant features get scale 1 instead of 1/0."""
        data = np.asarray(data, dtype=np.float64)
        std = data.std(axis=0)
        self.mean.assign(data.mean(axis=0).astype(np.float32))
        self.inv_std.assign(
            np.where(std > 1e-6, 1.0 / np.maximum(std, 1e-6), 1.0).astype(np.float32)
        )


def build_dlrm(
    cardinalities: Mapping[str, int],
    n_dense: int,
    hist_len: int,
    emb_dim: int = 16,
    bottom: Sequence[int] = (64, 16),
    top: Sequence[int] = (64, 32),
    seed: int = 0,
    wide: bool = False,
) -> keras.Model:
    """Build the DLRM; inputs are :data:`RANKER_INPUTS`, output ``score`` (n, 1) in (0, 1).

    ``wide``: add a linear path from the standardised dense features (layer ``wide``) to the
    logit, and start the deep logit at zero.
    """
    check_cardinalities(cardinalities, CATEGORICAL)
    if n_dense < 1 or hist_len < 1:
        raise ValueError("n_dense and hist_len must be >= 1")
    bottom = tuple(int(b) for b in bottom)
    if not bottom or bottom[-1] != emb_dim:
        raise ValueError(f"the last bottom layer must have emb_dim={emb_dim} units: {bottom}")
    make = SeededLayers(seed)
    inputs = {n: keras.Input(shape=(), dtype="int64", name=n) for n in CATEGORICAL}
    inputs["dense"] = keras.Input(shape=(n_dense,), dtype="float32", name="dense")
    inputs["hist_items"] = keras.Input(shape=(hist_len,), dtype="int64", name="hist_items")

    # bottom MLP over standardised dense features
    x = normed = Standardize(name=DENSE_NORM_LAYER)(inputs["dense"])
    for i, units in enumerate(bottom):
        x = make.dense(units, f"bottom_{i}", "relu")(x)
    vectors = [x]

    tables = {}
    for n in CATEGORICAL:
        tables[n] = make.embedding(n, cardinalities[n], emb_dim)
        vectors.append(tables[n](safe_index(inputs[n], cardinalities[n])))
    hist = safe_index(inputs["hist_items"], cardinalities["item_id"])
    pooled, _ = masked_mean(tables["item_id"](hist), hist)
    vectors.append(pooled)

    # pairwise dot-product interaction, upper triangle without the diagonal
    f = len(vectors)
    stacked = ops.stack(vectors, axis=1)  # (n, f, d)
    gram = ops.matmul(stacked, ops.transpose(stacked, (0, 2, 1)))  # (n, f, f)
    flat = ops.reshape(gram, (-1, f * f))
    rows, cols = np.triu_indices(f, k=1)
    pairs = ops.take(flat, (rows * f + cols).astype("int32"), axis=1)  # (n, f(f-1)/2)

    z = layers.Concatenate(name="interaction")([x, pairs])
    for i, units in enumerate(top):
        z = make.dense(int(units), f"top_{i}", "relu")(z)
    if wide:
        logit = layers.Dense(1, name="logit", kernel_initializer="zeros")(z)
        logit = layers.Add(name="wide_deep")([make.dense(1, WIDE_LAYER)(normed), logit])
    else:
        logit = make.dense(1, "logit")(z)
    score = layers.Activation("sigmoid", name=RANKER_OUTPUT)(logit)
    return keras.Model(inputs, score, name="dlrm")


def fit_ranker(
    model: keras.Model,
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    epochs: int = 3,
    batch_size: int = 1024,
    learning_rate: float = 3e-3,
    seed: int = 0,
    adapt_dense: bool | None = None,
    verbose: bool = False,
    progress: ProgressCallback | None = None,
    deep_lr_scale: float = 1.0,
) -> list[float]:
    """Train with binary cross-entropy; returns the mean loss per epoch.

    ``adapt_dense`` (default: only if not yet adapted) fits the in-graph standardisation of
    ``dense`` on these inputs. For a model built with ``wide=True``, ``deep_lr_scale`` scales
    the learning rate of everything but the wide path (0 freezes it: the wide model alone).
    """
    x = _as_inputs(inputs, RANKER_INPUTS)
    n = _check_rows(x)
    y = _labels(labels, n)
    norm = model.get_layer(DENSE_NORM_LAYER)
    if adapt_dense or (adapt_dense is None and not norm.adapted):
        norm.set_stats(x["dense"])
    step = _train_step(model, x, _variable_groups(model, learning_rate, deep_lr_scale))

    def train_batch(idx: np.ndarray) -> float:
        return float(step({k: v[idx] for k, v in x.items()}, y[idx]))

    def on_epoch(epoch: int, mean: float, seconds: float) -> None:
        if verbose:
            print(f"dlrm epoch {epoch + 1}/{epochs} loss {mean:.4f} ({n / seconds:,.0f} rows/s)")
        if progress is not None:
            progress(epoch, mean)

    rng = np.random.default_rng(seed)
    return train_epochs(train_batch, n, epochs, batch_size, rng, on_epoch)


def _labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels, dtype=np.float32).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"labels have {y.shape[0]} rows, inputs have {n}")
    if np.any((y < 0) | (y > 1)):
        raise ValueError("labels must be in [0, 1]")
    return y


VariableGroups = list[tuple[list, float]]


def _variable_groups(
    model: keras.Model, learning_rate: float, deep_lr_scale: float
) -> VariableGroups:
    """The trainable variables in groups with their learning rate: the wide path at
    ``learning_rate`` and the rest at ``deep_lr_scale`` times it (left out at 0)."""
    if deep_lr_scale < 0:
        raise ValueError("deep_lr_scale must be >= 0")
    variables = list(model.trainable_variables)
    if deep_lr_scale == 1.0 or all(layer.name != WIDE_LAYER for layer in model.layers):
        return [(variables, learning_rate)]
    wide_ids = {id(v) for v in model.get_layer(WIDE_LAYER).trainable_variables}
    groups = [([v for v in variables if id(v) in wide_ids], learning_rate)]
    if deep_lr_scale > 0:
        deep = [v for v in variables if id(v) not in wide_ids]
        groups.append((deep, learning_rate * deep_lr_scale))
    return groups


def _train_step(model: keras.Model, x: Mapping[str, np.ndarray], groups: VariableGroups):
    """A compiled step: binary cross-entropy on the logit, one Adam per variable group."""
    optimizers = [keras.optimizers.Adam(learning_rate=lr) for _, lr in groups]
    variables = [v for vs, _ in groups for v in vs]
    logit_model = keras.Model(model.inputs, model.get_layer(RANKER_OUTPUT).input)
    signature = (
        {k: tf.TensorSpec((None, *v.shape[1:]), tf.as_dtype(v.dtype)) for k, v in x.items()},
        tf.TensorSpec((None,), tf.float32),
    )

    @tf.function(input_signature=signature)
    def step(batch, target):
        with tf.GradientTape() as tape:
            z = tf.reshape(logit_model(batch, training=True), [-1])
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=z))
        grads = tape.gradient(loss, variables)
        start = 0
        for optimizer, (vs, _) in zip(optimizers, groups, strict=True):
            optimizer.apply_gradients(zip(grads[start : start + len(vs)], vs, strict=True))
            start += len(vs)
        return loss

    return step


def predict_ranker(
    model: keras.Model, inputs: Mapping[str, np.ndarray], batch_size: int = 8192
) -> np.ndarray:
    """Probabilities, shape (n,)."""
    return _predict(model, _as_inputs(inputs, RANKER_INPUTS), batch_size).reshape(-1)


def evaluate_ranker(
    model: keras.Model, inputs: Mapping[str, np.ndarray], labels: np.ndarray
) -> dict[str, float]:
    """``{"auc", "logloss", "n", "positive_rate"}`` of the model on labelled rows."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = predict_ranker(model, inputs)
    return {
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "n": float(y.shape[0]),
        "positive_rate": float(y.mean()) if y.size else float("nan"),
    }


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank formula (ties get average ranks); NaN with only one class."""
    y = np.asarray(labels).reshape(-1) > 0.5
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value
    upper = np.cumsum(counts)
    avg_rank = upper - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
