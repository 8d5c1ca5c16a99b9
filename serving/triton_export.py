"""Export the operator graph to a Triton model repository: one Python-backend model per operator
(its code and artifacts under the version folder) and an ensemble named `streamrec`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from serving.graph import Graph, Operator, Tensor
from serving.operators import GRAPH

ENSEMBLE = "streamrec"
ROOT = Path(__file__).resolve().parents[1]
# The modules the operators import, shipped with every model: nothing else of the app is needed.
SHIPPED = (
    "models/__init__.py",
    "models/features.py",
    "models/feature_repo.py",
    "models/index.py",
    "models/inputs.py",
    "models/onnx_export.py",
    "models/recommender.py",
    "models/workflow.py",
    "serving/__init__.py",
    "serving/graph.py",
    "serving/operators.py",
    "serving/state.py",
)

MODEL_PY = '''\
"""Triton Python-backend model for the streamrec operator `{name}` (generated)."""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "code"))

import triton_python_backend_utils as pb_utils  # noqa: E402

from serving.operators import {cls}  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = json.loads(config["parameters"]["config"]["string_value"])
        self.op = {cls}(HERE / "artifacts", params)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensors = {{
                    name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                    for name in self.op.inputs
                }}
                out = self.op(tensors)
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, value) for name, value in out.items()]))
            except Exception as e:  # the error travels back to the client with the stage name
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{{self.op.name}}: {{type(e).__name__}}: {{e}}")))
        return responses
'''


def _tensor(name: str, spec: Tensor) -> str:
    dims = ", ".join(str(d) for d in spec.dims)
    return f'  {{ name: "{name}" data_type: {spec.dtype} dims: [ {dims} ] }}'


def _tensors(kind: str, tensors: dict[str, Tensor]) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(n, s) for n, s in tensors.items()) + "\n]\n"


def operator_config(op: type[Operator], config: dict[str, Any], instances: int) -> str:
    quoted = json.dumps(json.dumps(config))  # a JSON document as one pbtxt string
    return (
        f'name: "{op.name}"\nbackend: "python"\nmax_batch_size: 0\n'
        + _tensors("input", op.inputs)
        + _tensors("output", op.all_outputs())
        + f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]\n"
        + f'parameters {{ key: "config" value {{ string_value: {quoted} }} }}\n'
    )


def ensemble_config(graph: Graph, version: str) -> str:
    steps = []
    for op in graph.operators:
        inputs = "".join(f' input_map {{ key: "{n}" value: "{n}" }}' for n in op.inputs)
        outputs = "".join(f' output_map {{ key: "{n}" value: "{n}" }}' for n in op.all_outputs())
        steps.append(f'  {{ model_name: "{op.name}" model_version: -1{inputs}{outputs} }}')
    response = {name: graph.tensors[name] for name in graph.response}
    return (
        f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
        + _tensors("input", graph.request)
        + _tensors("output", response)
        + "ensemble_scheduling {\n step [\n"
        + ",\n".join(steps)
        + "\n ]\n}\n"
        + f'parameters {{ key: "artifact_version" value {{ string_value: "{version}" }} }}\n'
    )


def export_repository(
    artifacts: Path,
    repository: Path,
    config: dict[str, Any],
    instances: int = 1,
    graph: Graph = GRAPH,
) -> Path:
    """(Re)write the graph's models into `repository`; other models there are left alone."""
    version = json.loads((artifacts / "manifest.json").read_text())["version"]
    repository.mkdir(parents=True, exist_ok=True)
    for op in graph.operators:
        model = repository / op.name
        shutil.rmtree(model, ignore_errors=True)
        folder = model / "1"
        for rel in SHIPPED:
            (folder / "code" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, folder / "code" / rel)
        (folder / "artifacts").mkdir(parents=True)
        for name in op.files:
            _link_or_copy(artifacts / name, folder / "artifacts" / name)
        (folder / "model.py").write_text(MODEL_PY.format(name=op.name, cls=op.__name__))
        (model / "config.pbtxt").write_text(operator_config(op, config, instances))
    ensemble = repository / ENSEMBLE
    shutil.rmtree(ensemble, ignore_errors=True)
    (ensemble / "1").mkdir(parents=True)
    (ensemble / "config.pbtxt").write_text(ensemble_config(graph, version))
    return repository


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)
