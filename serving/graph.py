"""An operator graph: stages with declared tensor inputs and outputs, run in-process or on Triton.

Each operator reads named tensors and writes named tensors; a tensor is produced exactly once.
`Graph` checks the wiring; `Graph.run` is the in-process runtime; `serving.triton_export` turns
the same graph into one Triton Python model per operator plus an ensemble.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Tensor:
    dtype: str  # Triton data type: TYPE_STRING, TYPE_INT64, TYPE_INT32, TYPE_FP32
    dims: tuple[int, ...]  # -1 = variable


NUMPY = {
    "TYPE_STRING": np.object_,
    "TYPE_INT64": np.int64,
    "TYPE_INT32": np.int32,
    "TYPE_FP32": np.float32,
}
STATS = Tensor("TYPE_FP32", (3,))  # candidates in, candidates out, milliseconds


class Operator:
    """One stage. Subclasses declare `name`, `inputs`, `outputs`, the artifact files they need,
    and implement `compute`; `count_in`/`count_out` name the tensors whose length is reported."""

    name: ClassVar[str]
    inputs: ClassVar[dict[str, Tensor]]
    outputs: ClassVar[dict[str, Tensor]]
    files: ClassVar[tuple[str, ...]] = ()
    count_in: ClassVar[str | None] = None
    count_out: ClassVar[str | None] = None

    def __init__(self, artifacts: Path, config: dict[str, Any]):
        self.artifacts = artifacts
        self.config = config

    def compute(self, **tensors: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.compute(**{name: tensors[name] for name in self.inputs})
        ms = (time.perf_counter() - start) * 1000
        n_in = len(tensors[self.count_in]) if self.count_in else 0
        n_out = len(out[self.count_out]) if self.count_out else 0
        out[self.stats_name()] = np.array([n_in, n_out, ms], dtype=np.float32)
        return out

    @classmethod
    def stats_name(cls) -> str:
        return f"stats_{cls.name}"

    @classmethod
    def all_outputs(cls) -> dict[str, Tensor]:
        return {**cls.outputs, cls.stats_name(): STATS}


class Graph:
    def __init__(
        self, request: dict[str, Tensor], operators: list[type[Operator]], response: tuple[str, ...]
    ):
        self.request = request
        self.operators = operators
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

    def build(self, artifacts: Path, config: dict[str, Any]) -> LocalRuntime:
        return LocalRuntime(self, [op(artifacts, config) for op in self.operators])


class LocalRuntime:
    """The graph in this process: the reference for tests, debugging and benchmarks."""

    def __init__(self, graph: Graph, operators: list[Operator]):
        self.graph = graph
        self.operators = operators

    def run(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = dict(request)
        for op in self.operators:
            tensors.update(op(tensors))
        return {name: tensors[name] for name in self.graph.response}
