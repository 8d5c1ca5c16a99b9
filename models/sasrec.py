"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018) as an offline
baseline (Keras 3 on the TensorFlow backend).

The model reads a user's last ``max_len`` items, left-padded with id 0: item embedding (scaled by
``sqrt(dim)``) plus a learned positional embedding, then ``blocks`` pre-layer-norm blocks of causal
multi-head self-attention and a point-wise feed-forward network, each with dropout and a residual
connection, and a final layer norm. The score of item ``j`` after position ``t`` is the dot
product of the hidden state at ``t`` with item ``j``'s input embedding (one shared table).

Departures from the paper, both small:

* A start token (id 1) is put before every sequence, so the first item of a sequence is a trained
  target too and an empty history gets a meaningful row (what users start with), not an untrained
  one. Histories longer than ``max_len - 1`` items lose it, in training and in scoring alike.
* Training is next-item prediction at every position with a full softmax cross-entropy over the
  catalog instead of one sampled negative per position. That is cheap for the ~1,700 items of
  MovieLens-100K; a large catalog would need a sampled softmax (with a logQ correction).

Long sequences are cut into windows of ``max_len`` ending at the sequence end and every
``max_len // 2`` items before it; each window trains only the targets that no later window
trains, so every target counts once and all but a user's first ``max_len // 2`` targets see at
least ``max_len // 2`` items of context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from models.metrics import ndcg_at_k

_PAD = 0
_START = 1
_FIRST_ITEM = 2  # catalog item k has id k + _FIRST_ITEM
_EVAL_K = 10
_SCORE_BATCH = 1024

Progress = Callable[[int, float, float | None], None]


@dataclass
class SASRecConfig:
    max_len: int = 50
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    epochs: int = 30  # upper bound; early stopping on the validation slice picks the best epoch
    batch_size: int = 128
    learning_rate: float = 1e-3
    patience: int = 3  # epochs without validation improvement before stopping
    seed: int = 0


class SASRec:
    """A fitted SASRec model; build it with :meth:`fit`."""

    def __init__(self, net: _Net, items: list[str], best_epoch: int, max_len: int) -> None:
        self._net = net
        self.items = list(items)
        self.best_epoch = best_epoch
        self._max_len = max_len
        self._ids = {item: k + _FIRST_ITEM for k, item in enumerate(self.items)}

    @classmethod
    def fit(
        cls,
        sequences: dict[str, list[str]],
        items: list[str],
        cfg: SASRecConfig | None = None,
        validation: dict[str, tuple[list[str], list[str]]] | None = None,
        progress: Progress | None = None,
    ) -> SASRec:
        """Train on ``sequences`` (user -> item ids in time order; ids outside ``items`` skipped).

        With ``validation`` (user -> (history, next items)) training stops after ``cfg.patience``
        epochs without a better NDCG@10 of the next items given the history (history items
        excluded), and the weights of the best epoch are kept; without it ``cfg.epochs`` epochs
        are trained. ``progress(epoch, train_loss, val_ndcg_or_None)`` is called after each epoch.
        """
        cfg = cfg or SASRecConfig()
        if len(set(items)) != len(items):
            raise ValueError("items has duplicate ids")
        if not items:
            raise ValueError("items is empty")
        keras.utils.set_random_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)

        net = _Net(len(items), cfg)
        model = cls(net, items, best_epoch=0, max_len=cfg.max_len)
        inputs, targets = _windows([model._encode(s) for s in sequences.values()], cfg.max_len)
        if not (targets >= 0).any():
            raise ValueError("no training targets: every sequence is empty or unknown")
        optimizer = keras.optimizers.Adam(learning_rate=cfg.learning_rate, beta_2=0.98)
        step = _train_step(net, optimizer, cfg.max_len)

        best_ndcg, best_weights, stale = -math.inf, None, 0
        for epoch in range(1, cfg.epochs + 1):
            order = rng.permutation(len(inputs))
            losses = [
                float(step(inputs[batch], targets[batch]))
                for batch in np.array_split(order, max(1, math.ceil(len(order) / cfg.batch_size)))
            ]
            loss = float(np.mean(losses))
            ndcg = model._validate(validation) if validation else None
            if progress is not None:
                progress(epoch, loss, ndcg)
            if ndcg is None:
                model.best_epoch = epoch
                continue
            if ndcg > best_ndcg:
                best_ndcg, best_weights, stale = ndcg, net.get_weights(), 0
                model.best_epoch = epoch
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        if best_weights is not None:
            net.set_weights(best_weights)
        return model

    def scores(self, histories: list[list[str]]) -> np.ndarray:
        """float32 [len(histories), len(items)]: each catalog item's score as the next item.

        Uses the last ``max_len`` known items of each history; unknown ids are skipped, and an
        empty history is scored from the start token alone.
        """
        rows = [self._window(h) for h in histories]
        if not rows:
            return np.zeros((0, len(self.items)), dtype=np.float32)
        out = [
            self._net.last_scores(np.stack(rows[i : i + _SCORE_BATCH])).numpy()
            for i in range(0, len(rows), _SCORE_BATCH)
        ]
        return np.concatenate(out).astype(np.float32, copy=False)

    def _encode(self, sequence: list[str]) -> list[int]:
        return [_START] + [self._ids[i] for i in sequence if i in self._ids]

    def _window(self, history: list[str]) -> np.ndarray:
        ids = self._encode(history)[-self._max_len :]
        row = np.full(self._max_len, _PAD, dtype=np.int32)
        row[self._max_len - len(ids) :] = ids
        return row

    def _validate(self, validation: dict[str, tuple[list[str], list[str]]]) -> float:
        """Mean NDCG@10 of the next items over the users that have any, history excluded."""
        cases = [(h, nxt) for h, nxt in validation.values() if nxt]
        if not cases:
            return 0.0
        scores = self.scores([h for h, _ in cases])
        values = []
        for row, (history, next_items) in zip(scores, cases, strict=True):
            seen = [self._ids[i] - _FIRST_ITEM for i in history if i in self._ids]
            row[seen] = -np.inf
            top = np.argpartition(-row, _EVAL_K)[:_EVAL_K] if len(row) > _EVAL_K else row.argsort()
            top = top[np.argsort(-row[top], kind="stable")]
            values.append(ndcg_at_k([self.items[k] for k in top], set(next_items), _EVAL_K))
        return float(np.mean(values))


def _windows(encoded: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 [n, max_len], left-padded; target -1 = no loss at that position.

    A sequence of tokens t_0..t_m trains input t_j -> target t_{j+1}. Windows end at m, m - h,
    m - 2h, ... (h = max_len // 2); each trains its last h positions (the earliest window all of
    its positions), so the trained parts tile the sequence.
    """
    half = max(1, max_len // 2)
    inputs, targets = [], []
    for tokens in encoded:
        end = len(tokens) - 1  # number of (input, target) pairs
        while end > 0:
            start = max(0, end - max_len)
            x = np.full(max_len, _PAD, dtype=np.int32)
            y = np.full(max_len, -1, dtype=np.int32)
            x[max_len - (end - start) :] = tokens[start:end]
            y[max_len - (end - start) :] = np.asarray(tokens[start + 1 : end + 1]) - _FIRST_ITEM
            if start > 0:
                y[: max_len - half] = -1
            inputs.append(x)
            targets.append(y)
            end -= half if start > 0 else end
    if not inputs:
        return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), np.int32)
    return np.stack(inputs), np.stack(targets)


def _train_step(net: _Net, optimizer: keras.optimizers.Optimizer, max_len: int) -> Callable:
    spec = tf.TensorSpec((None, max_len), tf.int32)

    @tf.function(input_signature=(spec, spec))
    def step(ids, targets):
        mask = tf.cast(targets >= 0, tf.float32)
        with tf.GradientTape() as tape:
            logits = net.all_scores(ids, training=True)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.maximum(targets, 0), logits=logits
            )
            loss = tf.reduce_sum(loss * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables, strict=True))
        return loss

    return step


class _Block(layers.Layer):
    """Pre-norm causal self-attention and point-wise feed-forward, each with a residual."""

    def __init__(self, cfg: SASRecConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        self.attn_norm = layers.LayerNormalization(epsilon=1e-8)
        self.attn = layers.MultiHeadAttention(
            num_heads=cfg.heads, key_dim=cfg.dim // cfg.heads, dropout=cfg.dropout
        )
        self.ffn_norm = layers.LayerNormalization(epsilon=1e-8)
        self.ffn_in = layers.Dense(cfg.dim, activation="relu")
        self.ffn_out = layers.Dense(cfg.dim)
        self.drop = layers.Dropout(cfg.dropout)

    def call(self, x, attention_mask, keep, training=False):
        q = self.attn_norm(x)
        x = x + self.drop(self.attn(q, q, attention_mask=attention_mask, training=training))
        h = self.ffn_out(self.drop(self.ffn_in(self.ffn_norm(x)), training=training))
        return (x + self.drop(h, training=training)) * keep


class _Net(keras.Model):
    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__(name="sasrec")
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by heads {cfg.heads}")
        self.item_emb = layers.Embedding(n_items + _FIRST_ITEM, cfg.dim)
        self.pos_emb = layers.Embedding(cfg.max_len, cfg.dim)
        self.drop = layers.Dropout(cfg.dropout)
        self.blocks = [_Block(cfg, name=f"block_{i}") for i in range(cfg.blocks)]
        self.norm = layers.LayerNormalization(epsilon=1e-8)
        self.scale = math.sqrt(cfg.dim)
        self.max_len = cfg.max_len
        self(np.zeros((1, cfg.max_len), np.int32))  # create the weights

    def call(self, ids, training=False):
        """Hidden states [batch, max_len, dim]; zero at padding."""
        valid = tf.not_equal(ids, _PAD)
        keep = tf.cast(valid, tf.float32)[:, :, None]
        x = self.item_emb(ids) * self.scale + self.pos_emb(tf.range(self.max_len))[None]
        x = self.drop(x, training=training) * keep
        causal = tf.linalg.band_part(tf.ones((self.max_len, self.max_len), tf.bool), -1, 0)
        # a padded query attends to nothing valid; its output is masked out anyway
        attention_mask = tf.logical_and(causal[None], valid[:, None, :])
        for block in self.blocks:
            x = block(x, attention_mask, keep, training=training)
        return self.norm(x) * keep

    def _item_table(self):
        return self.item_emb.embeddings[_FIRST_ITEM:]

    def all_scores(self, ids, training=False):
        return tf.einsum("bld,nd->bln", self(ids, training=training), self._item_table())

    def last_scores(self, ids):
        return tf.matmul(self(ids, training=False)[:, -1], self._item_table(), transpose_b=True)
