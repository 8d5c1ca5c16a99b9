"""An operator graph: stages with declared tensor inputs and outputs, run in-process or on Triton.

Each operator reads named tensors and writes named tensors; a tensor is produced exactly once.
Operators compute on a batch of requests at once (one dict of tensors per request, shapes as
declared, no batch dimension). `Graph` checks the wiring; `LocalRuntime` runs it in this
process; `serving.triton_export` runs the same graph on Triton, all operators in one executor
model or split over several models chained by an ensemble.

Item tensors (`Tensor.items`) hold rows of the stages' shared item table (`serving.live`):
integers inside a process, item ids on the wire between Triton models.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Tensor:
    dtype: str  # Triton data type: TYPE_STRING, TYPE_INT64, TYPE_INT32, TYPE_FP32
    dims: tuple[int, ...]  # -1 = variable
    items: bool = False  # item rows (INT64) in a process, item ids (TYPE_STRING) on the wire

    @property
    def wire_dtype(self) -> str:
        return "TYPE_STRING" if self.items else self.dtype


NUMPY = {
    "TYPE_STRING": np.object_,
    "TYPE_INT64": np.int64,
    "TYPE_INT32": np.int32,
    "TYPE_FP32": np.float32,
}
STATS = Tensor("TYPE_FP32", (4,))  # candidates in, candidates out, milliseconds, batch size
Tensors = dict[str, np.ndarray]  # one request's tensors
Step = Callable[[str], None]  # called with the name of each part as it starts


class Operator:
    """One stage. Subclasses declare `name`, `inputs`, `outputs`, the artifact files they need,
    and implement `compute` over a batch; `count_in`/`count_out` name the tensors whose length
    is reported. `items` is the process's shared item table (`serving.live.LiveItems`)."""

    name: ClassVar[str]
    inputs: ClassVar[dict[str, Tensor]]
    outputs: ClassVar[dict[str, Tensor]]
    files: ClassVar[tuple[str, ...]] = ()
    count_in: ClassVar[str | None] = None
    count_out: ClassVar[str | None] = None

    def __init__(self, artifacts: Path, config: dict[str, Any], items):
        self.artifacts = artifacts
        self.config = config
        self.items = items

    def compute(self, batch: list[Tensors]) -> list[Tensors]:
        """The outputs of each request of the batch, in order."""
        raise NotImplementedError

    def __call__(self, batch: list[Tensors]) -> list[Tensors]:
        start = time.perf_counter()
        outs = self.compute([{name: t[name] for name in self.inputs} for t in batch])
        ms = (time.perf_counter() - start) * 1000
        for t, out in zip(batch, outs, strict=True):
            n_in = len(t[self.count_in]) if self.count_in else 0
            n_out = len(out[self.count_out]) if self.count_out else 0
            out[self.stats_name()] = np.array([n_in, n_out, ms, len(batch)], dtype=np.float32)
        return outs

    @classmethod
    def stats_name(cls) -> str:
        return f"stats_{cls.name}"

    @classmethod
    def all_outputs(cls) -> dict[str, Tensor]:
        return {**cls.outputs, cls.stats_name(): STATS}


class Graph:
    def __init__(
        self,
        request: dict[str, Tensor],
        operators: list[type[Operator]],
        response: tuple[str, ...],
        items: Callable[[Path, dict[str, Any]], Any],
    ):
        self.request = request
        self.operators = operators
        self.items = items  # (artifacts, config) -> the item table the operators share
        self.response = response + tuple(op.stats_name() for op in operators)
        self._check()

    def _check(self) -> None:
        produced = dict(self.request)
        for op in self.operators:
            for name, spec in op.inputs.items():
                if name not in produced:
                    raise ValueError(f"{op.name} reads '{name}', which nothing before it produces")
                if produced[name].dtype != spec.dtype:
                    raise ValueError(
                        f"{op.name} reads '{name}' as {spec.dtype}, "
                        f"produced as {produced[name].dtype}"
                    )
            for name, spec in op.all_outputs().items():
                if name in produced:
                    raise ValueError(f"'{name}' is produced twice ({op.name})")
                produced[name] = spec
        missing = [name for name in self.response if name not in produced]
        if missing:
            raise ValueError(f"response tensors nobody produces: {missing}")
        self.tensors = produced

    def build(
        self, artifacts: Path, config: dict[str, Any], step: Step | None = None
    ) -> LocalRuntime:
        return LocalRuntime(self, self.instantiate(self.operators, artifacts, config, step))

    def instantiate(
        self,
        operators: list[type[Operator]],
        artifacts: Path,
        config: dict[str, Any],
        step: Step | None = None,
    ) -> list[Operator]:
        """These operators of the graph, sharing one item table. `step(name)`, if given, is
        called as each part starts to be built ("item table", then each operator's name): a
        hook for timings (bench.serving)."""
        mark = step if step is not None else (lambda name: None)
        mark("item table")
        items = self.items(artifacts, config)
        built = []
        for op in operators:
            mark(op.name)
            built.append(op(artifacts, config, items))
        return built


def run_batch(operators: list[Operator], batch: list[Tensors]) -> list[Tensors]:
    """Run operators in order over a batch; every tensor they produce is added to each request's
    dict. The shared item table first takes in what changed since the last batch."""
    if operators:
        operators[0].items.sync()
    batch = [dict(t) for t in batch]
    for op in operators:
        for t, out in zip(batch, op(batch), strict=True):
            t.update(out)
    return batch


class LocalRuntime:
    """The graph in this process: the reference for tests, debugging and benchmarks."""

    def __init__(self, graph: Graph, operators: list[Operator]):
        self.graph = graph
        self.operators = operators

    def run(self, request: Tensors) -> Tensors:
        return self.run_batch([request])[0]

    def run_batch(self, requests: list[Tensors]) -> list[Tensors]:
        done = run_batch(self.operators, requests)
        return [{name: t[name] for name in self.graph.response} for t in done]


class Executor:
    """Some operators of the graph run as one unit in this process: the body of one Triton model.

    Takes a batch of requests as they arrive on the wire (item tensors as ids), runs the
    operators once over the batch and returns each request's `outputs` (item tensors as ids).
    A batch that fails is run again request by request, so that one bad request fails alone.
    """

    def __init__(
        self,
        graph: Graph,
        names: list[str],
        outputs: list[str],
        artifacts: Path,
        config: dict[str, Any],
    ):
        chosen = [op for op in graph.operators if op.name in names]
        self.operators = graph.instantiate(chosen, artifacts, config)
        self.items = self.operators[0].items
        self.tensors = graph.tensors
        self.outputs = outputs

    def run(self, batch: list[Tensors]) -> list[Tensors | Exception]:
        try:
            return self._run(batch)
        except Exception as e:  # noqa: BLE001 - isolate the failing request(s)
            if len(batch) == 1:
                return [e]
        return [r for t in batch for r in self.run([t])]

    def _run(self, batch: list[Tensors]) -> list[Tensors]:
        batch = [{n: self._from_wire(n, v) for n, v in t.items()} for t in batch]
        done = run_batch(self.operators, batch)
        return [{n: self._to_wire(n, t[n]) for n in self.outputs} for t in done]

    def _from_wire(self, name: str, value: np.ndarray) -> np.ndarray:
        if not self.tensors[name].items:
            return value
        rows = self.items.rows(value.tolist())
        if len(rows) != len(value):
            raise KeyError(f"{name}: item ids unknown to this process")
        return rows

    def _to_wire(self, name: str, value: np.ndarray) -> np.ndarray:
        if not self.tensors[name].items:
            return value
        ids = self.items.raw_ids
        return np.array([ids[r] for r in value.tolist()], dtype=np.object_)
