"""Run the graph: on Triton through tritonclient (sync and asyncio), or in this process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from serving.graph import LocalRuntime
from serving.operators import DEFAULTS, GRAPH, request_tensors, response_record
from serving.triton_export import ENSEMBLE

_NP_TO_TRITON = {np.object_: "BYTES", np.int64: "INT64", np.int32: "INT32", np.float32: "FP32"}


def _infer_args(grpc, tensors: dict[str, np.ndarray]) -> tuple[list, list]:
    """The request tensors as tritonclient inputs, and the graph's response as outputs."""
    inputs = []
    for name, value in tensors.items():
        t = grpc.InferInput(name, list(value.shape), _NP_TO_TRITON[value.dtype.type])
        t.set_data_from_numpy(value)
        inputs.append(t)
    return inputs, [grpc.InferRequestedOutput(n) for n in GRAPH.response]


class TritonRecommender:
    """The `streamrec` ensemble over gRPC."""

    def __init__(self, url: str, timeout: float | None = 10.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.timeout = timeout
        config = self.client.get_model_config(ENSEMBLE, as_json=True)["config"]
        self.version = config["parameters"]["artifact_version"]["string_value"]

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs, outputs = _infer_args(self._grpc, tensors)
        result = self.client.infer(ENSEMBLE, inputs, outputs=outputs, client_timeout=self.timeout)
        return {n: result.as_numpy(n) for n in GRAPH.response}

    def recommend(self, request: dict) -> dict:
        return response_record(request, self.run(request_tensors(request)), self.version)

    def close(self) -> None:
        self.client.close()


class AsyncTritonRecommender:
    """The ensemble from asyncio code (the stream processors)."""

    def __init__(self, url: str):
        import tritonclient.grpc.aio as aioclient

        self._grpc = aioclient
        self.client = aioclient.InferenceServerClient(url)
        self.version = ""

    async def connect(self) -> None:
        config = await self.client.get_model_config(ENSEMBLE, as_json=True)
        self.version = config["config"]["parameters"]["artifact_version"]["string_value"]

    async def run(self, tensors: dict[str, np.ndarray], timeout: float | None = None) -> dict:
        inputs, outputs = _infer_args(self._grpc, tensors)
        result = await self.client.infer(ENSEMBLE, inputs, outputs=outputs, client_timeout=timeout)
        return {n: result.as_numpy(n) for n in GRAPH.response}

    async def close(self) -> None:
        await self.client.close()


class LocalRecommender:
    """The same graph in this process (reference runtime)."""

    def __init__(self, artifacts: Path, config: dict[str, Any]):
        self.runtime: LocalRuntime = GRAPH.build(artifacts, serving_config(config))
        self.version = json.loads((artifacts / "manifest.json").read_text())["version"]

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runtime.run(tensors)

    def recommend(self, request: dict) -> dict:
        return response_record(request, self.run(request_tensors(request)), self.version)


def serving_config(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown serving settings: {sorted(unknown)}")
    return DEFAULTS | overrides
