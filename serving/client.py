"""Run the graph: on Triton through tritonclient (sync and asyncio), or in this process.

Triton's ready flag says nothing about the Python-backend stubs: a SIGKILLed stub is not
restarted, `/v2/health/ready` stays 200, and every request to its stage fails after ~1 s (or
times out queued behind others). So the serving path is judged by `canary()`, a real inference,
and a dead stage is brought back by `heal()`, a forced reload through the repository API.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from schemas.artifacts import Artifacts
from schemas.settings import CANDIDATES
from serving.graph import LocalRuntime, Step
from serving.operators import GRAPH, decode, request_tensors, response_record
from serving.triton_export import ENSEMBLE, LAYOUTS

_NP_TO_TRITON = {np.object_: "BYTES", np.int64: "INT64", np.int32: "INT32", np.float32: "FP32"}
# The one model of the default layout: an A/B arm's requests go to its versions directly.
EXECUTOR = next(iter(LAYOUTS["executor"]))
# The models an ensemble may chain, in any layout.
STAGES: tuple[str, ...] = tuple(dict.fromkeys(n for groups in LAYOUTS.values() for n in groups))
# Read-only: an unknown user takes the cold-start path, through all six stages.
CANARY_REQUEST: dict[str, Any] = {"user_id": "__canary__", "k": 1, "temperature": 0.0, "seed": 0}
_DEAD_STUB = re.compile(r"Stub process '(\w+?)_\d+_\d+' is not healthy")
_RELOAD_KEY = "streamrec_reload"
# tritonclient's message limits, and reconnection within a second of a restarted server (gRPC's
# default back-off grows to two minutes).
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class CanaryResult:
    """One inference through the ensemble: ok, or why not and which stages look dead."""

    ok: bool
    seconds: float
    reason: str = ""
    # Stages Triton named as dead, or that only failed (no success) while the canary ran.
    suspects: tuple[str, ...] = ()


_Counts = dict[str, tuple[int, int]]  # stage -> (successes, failures) since its last load


def _stage_counts(stats) -> _Counts:
    return {
        m.name: (m.inference_stats.success.count, m.inference_stats.fail.count)
        for m in stats.model_stats
        if m.name in STAGES
    }


def _suspects(before: _Counts, after: _Counts, reason: str) -> tuple[str, ...]:
    named = set(_DEAD_STUB.findall(reason))
    failing = {
        n
        for n, (ok, fail) in after.items()
        if n in before and ok == before[n][0] and fail > before[n][1]
    }
    return tuple(n for n in STAGES if n in named | failing)


def _reload_config(config: dict) -> str:
    """The model's own config plus a fresh parameter: Triton ignores a load of an unchanged
    model, and this one makes it start new stubs (the old ones serve until they are up)."""
    config.setdefault("parameters", {})[_RELOAD_KEY] = {"string_value": str(time.time_ns())}
    return json.dumps(config)


def _infer_args(grpc, tensors: dict[str, np.ndarray]) -> tuple[list, list]:
    """The request tensors as tritonclient inputs (a batch of one: Triton batches requests
    itself), and the graph's response as outputs."""
    inputs = []
    for name, value in tensors.items():
        t = grpc.InferInput(name, [1, *value.shape], _NP_TO_TRITON[value.dtype.type])
        t.set_data_from_numpy(value[None])
        inputs.append(t)
    return inputs, [grpc.InferRequestedOutput(n) for n in GRAPH.response]


def _target(version: int | None) -> tuple[str, str]:
    return (ENSEMBLE, "") if version is None else (EXECUTOR, str(version))


def _outputs(result) -> dict[str, np.ndarray]:
    return {n: result.as_numpy(n)[0] for n in GRAPH.response}


class TritonRecommender:
    """The `streamrec` ensemble over gRPC."""

    def __init__(self, url: str, timeout: float | None = 10.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.timeout = timeout
        self._heal_lock = threading.Lock()
        config = self.client.get_model_config(ENSEMBLE, as_json=True)["config"]
        self.version = config["parameters"]["artifact_version"]["string_value"]

    def run(self, tensors: dict[str, np.ndarray], version: int | None = None) -> dict:
        """Through the ensemble, or through version `version` of the executor (an A/B arm)."""
        inputs, outputs = _infer_args(self._grpc, tensors)
        model, number = _target(version)
        result = self.client.infer(
            model, inputs, model_version=number, outputs=outputs, client_timeout=self.timeout
        )
        return _outputs(result)

    def run_batch(self, batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Requests sent together (Triton batches them); outputs in order."""
        done: queue.Queue = queue.Queue()
        for n, tensors in enumerate(batch):
            inputs, outputs = _infer_args(self._grpc, tensors)
            self.client.async_infer(
                ENSEMBLE,
                inputs,
                partial(lambda n, result, error: done.put((n, result, error)), n),
                outputs=outputs,
                client_timeout=self.timeout,
            )
        results: list[dict[str, np.ndarray]] = [{}] * len(batch)
        for _ in batch:
            n, result, error = done.get()
            if error is not None:
                raise error
            results[n] = _outputs(result)
        return results

    def recommend(self, request: dict) -> dict:
        return response_record(request, self.run(request_tensors(request)))

    def canary(self, timeout: float = 2.0) -> CanaryResult:
        """One real inference of CANARY_REQUEST through the ensemble within `timeout` s.
        Costs a statistics call and one cold-start request; never raises."""
        start, before = time.monotonic(), {}
        try:
            before = _stage_counts(self.client.get_inference_statistics(client_timeout=timeout))
            inputs, outputs = _infer_args(self._grpc, request_tensors(CANARY_REQUEST))
            self.client.infer(ENSEMBLE, inputs, outputs=outputs, client_timeout=timeout)
            return CanaryResult(True, time.monotonic() - start)
        except Exception as e:
            reason = str(e) or type(e).__name__
        try:
            after = _stage_counts(self.client.get_inference_statistics(client_timeout=timeout))
        except Exception:
            after = {}
        return CanaryResult(
            False, time.monotonic() - start, reason, _suspects(before, after, reason)
        )

    def heal(self, stages: Sequence[str], timeout: float = 30.0) -> list[str]:
        """Reload `stages` (e.g. a failed canary's suspects) with new stub processes through
        Triton's repository API, one after another (~2-4 s each); concurrent calls queue."""
        with self._heal_lock:
            for name in stages:
                config = self.client.get_model_config(name, as_json=True)["config"]
                self.client.load_model(name, config=_reload_config(config), client_timeout=timeout)
        return list(stages)

    def models(self) -> list[str]:
        """The models the ensemble chains."""
        config = self.client.get_model_config(ENSEMBLE, as_json=True)["config"]
        return [step["model_name"] for step in config["ensemble_scheduling"]["step"]]

    def serve_version(self, *numbers: int, timeout: float = 120.0) -> None:
        """Serve versions `numbers` of every model of the ensemble (two during an A/B test).
        Triton loads a new one beside those serving and switches over once it is ready (no
        request fails meanwhile); with several models in the ensemble, each on its own."""
        for name in self.models():
            config = self.client.get_model_config(name, as_json=True)["config"]
            config["version_policy"] = {"specific": {"versions": list(numbers)}}
            self.client.load_model(name, config=json.dumps(config), client_timeout=timeout)

    def served_version(self) -> str:
        """The artifact version that answers requests now (a canary request says)."""
        outputs = self.run(request_tensors(CANARY_REQUEST))
        return decode(outputs["model_version"])[0]

    def close(self) -> None:
        self.client.close()


class AsyncTritonRecommender:
    """The ensemble from asyncio code (the stream processors)."""

    def __init__(self, url: str):
        import tritonclient.grpc.aio as aioclient

        self._grpc = aioclient
        self.client = aioclient.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)
        self.version = ""
        self._heal_lock = asyncio.Lock()

    async def connect(self) -> None:
        config = await self.client.get_model_config(ENSEMBLE, as_json=True)
        self.version = config["config"]["parameters"]["artifact_version"]["string_value"]

    async def run(
        self,
        tensors: dict[str, np.ndarray],
        timeout: float | None = None,
        version: int | None = None,
    ) -> dict:
        inputs, outputs = _infer_args(self._grpc, tensors)
        model, number = _target(version)
        result = await self.client.infer(
            model, inputs, model_version=number, outputs=outputs, client_timeout=timeout
        )
        return _outputs(result)

    async def canary(self, timeout: float = 2.0) -> CanaryResult:
        """As `TritonRecommender.canary`."""
        start, before = time.monotonic(), {}
        try:
            before = _stage_counts(
                await self.client.get_inference_statistics(client_timeout=timeout)
            )
            inputs, outputs = _infer_args(self._grpc, request_tensors(CANARY_REQUEST))
            await self.client.infer(ENSEMBLE, inputs, outputs=outputs, client_timeout=timeout)
            return CanaryResult(True, time.monotonic() - start)
        except Exception as e:
            reason = str(e) or type(e).__name__
        try:
            stats = await self.client.get_inference_statistics(client_timeout=timeout)
            after = _stage_counts(stats)
        except Exception:
            after = {}
        return CanaryResult(
            False, time.monotonic() - start, reason, _suspects(before, after, reason)
        )

    async def heal(self, stages: Sequence[str], timeout: float = 30.0) -> list[str]:
        """As `TritonRecommender.heal`."""
        async with self._heal_lock:
            for name in stages:
                config = (await self.client.get_model_config(name, as_json=True))["config"]
                await self.client.load_model(
                    name, config=_reload_config(config), client_timeout=timeout
                )
        return list(stages)

    async def close(self) -> None:
        await self.client.close()


class LocalRecommender:
    """The same graph in this process (reference runtime)."""

    def __init__(self, artifacts: Path, config: dict[str, Any], step: Step | None = None):
        """`step`: called as each part starts to be built (see `Graph.instantiate`)."""
        self.runtime: LocalRuntime = GRAPH.build(artifacts, serving_config(config), step)
        self.version = Artifacts(artifacts).version

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runtime.run(tensors)

    def run_batch(self, batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return self.runtime.run_batch(batch)

    def recommend(self, request: dict) -> dict:
        return response_record(request, self.run(request_tensors(request)))


DEFAULTS: dict[str, Any] = {
    "redis_url": "redis://127.0.0.1:6379/0",
    "feast_project": "streamrec",
    "candidates": CANDIDATES,
    "temperature": 0.0,
    "max_per_genre": 0,  # 0 = no limit
}


def serving_config(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown serving settings: {sorted(unknown)}")
    return DEFAULTS | overrides
