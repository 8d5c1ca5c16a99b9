"""Export Keras models to ONNX and run them with onnxruntime.

The ONNX graph's input names are the Keras input names (the feature names of the contract:
``user_age``, ``hist_items``, ``item_id``, ``dense``, ...), each with a dynamic batch
dimension, and its output names are the Keras output names (``user_embedding``,
``item_embedding``, ``score``), so serving feeds and reads dicts by name.

We call ``tf2onnx.convert.from_function`` on a ``tf.function`` of our own instead of
``model.export(path, format="onnx")``: for a model with dict inputs Keras names the ONNX
inputs after the (alphabetically sorted) flattened specs and the output ``output_0``; our
wrapper fixes both names explicitly. The graph is the same.

:func:`export_onnx` and :func:`parity` import TensorFlow (offline only); :func:`onnx_session`
and :func:`run_onnx` need only onnxruntime and numpy, so serving may use them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OPSET = 17

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def export_onnx(model: Any, path: Path | str, opset: int = DEFAULT_OPSET) -> Path:
    """Convert a (functional, dict-input) Keras model to ONNX at ``path``; returns the path."""
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    names = [t.name for t in model.inputs]
    specs = [
        tf.TensorSpec((None, *t.shape[1:]), tf.as_dtype(t.dtype), name=t.name) for t in model.inputs
    ]
    out_names = list(model.output_names)

    @tf.function(input_signature=specs, autograph=False)
    def serve(*args):
        out = model(dict(zip(names, args, strict=True)), training=False)
        outs = out if isinstance(out, list | tuple) else [out]
        return {n: tf.identity(o) for n, o in zip(out_names, outs, strict=True)}

    tf2onnx.convert.from_function(serve, input_signature=specs, opset=opset, output_path=str(path))
    _name_batch_dim(path)
    _check_names(path, names, out_names)
    return path


def _name_batch_dim(path: Path) -> None:
    """tf2onnx gives every input its own ``unk__N`` batch dim; call them all ``batch``."""
    import onnx

    proto = onnx.load(str(path))
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    onnx.save(proto, str(path))


def _check_names(path: Path, inputs: list[str], outputs: list[str]) -> None:
    sess = onnx_session(path)
    got_in = sorted(i.name for i in sess.get_inputs())
    got_out = [o.name for o in sess.get_outputs()]
    if got_in != sorted(inputs) or sorted(got_out) != sorted(outputs):
        raise RuntimeError(
            f"ONNX export named inputs {got_in} / outputs {got_out}, "
            f"expected {sorted(inputs)} / {outputs}"
        )


USER_INDEX = "user_index"


def per_user(path: Path | str, user_inputs: set[str]) -> bytes:
    """The model at `path`, rewritten to compute what depends only on `user_inputs` once per
    user instead of once per row: those inputs then take one row per user, and a new input
    `user_index` (int64, one per row) says which user each row belongs to.

    A ranker scores hundreds of candidates per user; its user-only part (e.g. pooling the
    user's history embeddings) is the same for all of them. The rewrite gathers the user-only
    tensors where the rest of the graph reads them; the results are identical.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    constant = {i.name for i in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    user = set(user_inputs)
    for node in graph.node:  # in topological order
        inputs = [i for i in node.input if i]
        if any(i in user for i in inputs) and all(i in user or i in constant for i in inputs):
            user.update(node.output)
    frontier = {
        i: f"{i}/per_row"
        for node in graph.node
        if not set(node.output) <= user
        for i in node.input
        if i in user
    }
    if not frontier:
        raise ValueError(f"nothing in {path} depends only on {sorted(user_inputs)}")
    for node in graph.node:
        if not set(node.output) <= user:
            for n, name in enumerate(node.input):
                node.input[n] = frontier.get(name, name)
    gathers = [
        onnx.helper.make_node("Gather", [name, USER_INDEX], [row], axis=0)
        for name, row in frontier.items()
    ]
    graph.node.extend(gathers)
    graph.input.append(
        onnx.helper.make_tensor_value_info(USER_INDEX, onnx.TensorProto.INT64, ["rows"])
    )
    return _sorted(model).SerializeToString()


def _sorted(model):
    """Nodes in topological order (the appended gathers moved before their readers)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        node = next(n for n in pending if all(i in ready for i in n.input))
        pending.remove(node)
        ordered.append(node)
        ready.update(node.output)
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def onnx_session(path: Path | str | bytes, intra_op_num_threads: int = 1):
    """A CPU onnxruntime session (one intra-op thread by default) of a file or model bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_num_threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_feed(session, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inputs the session declares, cast to its dtypes; extra keys are ignored."""
    feed = {}
    missing = []
    for i in session.get_inputs():
        if i.name not in inputs:
            missing.append(i.name)
            continue
        dtype = _ORT_DTYPES.get(i.type)
        if dtype is None:
            raise TypeError(f"unsupported ONNX input type {i.type} for {i.name}")
        a = np.asarray(inputs[i.name])
        if a.dtype != dtype:
            a = a.astype(dtype)
        feed[i.name] = np.ascontiguousarray(a)
    if missing:
        raise ValueError(f"missing ONNX inputs {missing}")
    return feed


def run_onnx(session, inputs: Mapping[str, Any], output: str | None = None) -> np.ndarray:
    """Run the session on a feature dict; returns ``output`` (default: the first output)."""
    names = [output] if output is not None else [session.get_outputs()[0].name]
    return session.run(names, onnx_feed(session, inputs))[0]


def parity(model: Any, path: Path | str, inputs: Mapping[str, Any]) -> float:
    """Max abs difference between Keras ``model(inputs)`` and onnxruntime on the same inputs."""
    import keras

    session = onnx_session(path)
    feed = onnx_feed(session, inputs)
    expected = keras.ops.convert_to_numpy(model(feed, training=False))
    got = run_onnx(session, feed)
    if expected.shape != got.shape:
        raise AssertionError(f"shape mismatch: keras {expected.shape} vs onnx {got.shape}")
    if expected.size == 0:
        return 0.0
    return float(np.max(np.abs(expected.astype(np.float64) - got.astype(np.float64))))
