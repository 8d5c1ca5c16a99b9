"""Export the operator graph to a Triton model repository: Python-backend models that each run
some of the operators over dynamically batched requests (code and artifacts under the version
folder), chained by an ensemble named `streamrec`."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from schemas.artifacts import Artifacts
from serving.graph import Graph, Tensor
from serving.operators import GRAPH

ENSEMBLE = "streamrec"
# How the operators are split into Triton models (each a Python-backend process), chained by the
# ensemble. `executor`: one model runs the whole graph (no hops between stages; the default,
# fastest in bench/serving.py); `fused`: candidates | ranking; `stages`: one model per operator.
LAYOUTS: dict[str, dict[str, list[str]]] = {
    "executor": {"executor": [op.name for op in GRAPH.operators]},
    "fused": {
        "candidates": ["user_features", "retrieval", "filtering"],
        "ranking": ["item_features", "scoring", "ordering"],
    },
    "stages": {op.name: [op.name] for op in GRAPH.operators},
}
DEFAULT_LAYOUT = "executor"
ROOT = Path(__file__).resolve().parents[1]

MODEL_PY = '''\
"""Triton Python-backend model running streamrec operators {names} (generated)."""

import gc
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "code"))

import triton_python_backend_utils as pb_utils  # noqa: E402

from serving.graph import Executor  # noqa: E402
from serving.operators import GRAPH  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = json.loads(config["parameters"]["config"]["string_value"])
        self.inputs = [t["name"] for t in config["input"]]
        outputs = [t["name"] for t in config["output"]]
        self.executor = Executor(GRAPH, {names!r}, outputs, HERE / "artifacts", params)
        gc.freeze()  # the loaded models and tables are never garbage: keep them out of GC scans

    def execute(self, requests):
        batch = [
            {{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy()[0] for n in self.inputs}}
            for r in requests
        ]
        return [self._response(out) for out in self.executor.run(batch)]

    def _response(self, out):
        if isinstance(out, Exception):  # travels back to the client with the model's name
            error = f"{{Path(__file__).parent.parent.name}}: {{type(out).__name__}}: {{out}}"
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
        return pb_utils.InferenceResponse([pb_utils.Tensor(n, v[None]) for n, v in out.items()])
'''


def _inputs(tensors: dict[str, Tensor], ragged: bool = False) -> list[pb.ModelInput]:
    return [
        pb.ModelInput(
            name=name,
            data_type=spec.wire_dtype,
            dims=spec.dims,
            allow_ragged_batch=ragged and -1 in spec.dims,
        )
        for name, spec in tensors.items()
    ]


def _outputs(tensors: dict[str, Tensor]) -> list[pb.ModelOutput]:
    return [
        pb.ModelOutput(name=name, data_type=spec.wire_dtype, dims=spec.dims)
        for name, spec in tensors.items()
    ]


def group_tensors(graph: Graph, names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """What a model running these operators reads from outside them, and what it must return
    (read by a later model or part of the response)."""
    ops = [op for op in graph.operators if op.name in names]
    later = [op for op in graph.operators[graph.operators.index(ops[-1]) + 1 :]]
    produced = {n: s for op in ops for n, s in op.all_outputs().items()}
    inputs = {n: s for op in ops for n, s in op.inputs.items() if n not in produced}
    needed = set(graph.response) | {n for op in later for n in op.inputs}
    return inputs, {n: s for n, s in produced.items() if n in needed}


def model_config(
    name: str, graph: Graph, names: list[str], config: dict[str, Any], settings: dict[str, int]
) -> pb.ModelConfig:
    inputs, outputs = group_tensors(graph, names)
    return pb.ModelConfig(
        name=name,
        backend="python",
        max_batch_size=settings["max_batch"],
        dynamic_batching=pb.ModelDynamicBatching(
            max_queue_delay_microseconds=settings["queue_delay_us"]
        ),
        input=_inputs(inputs, ragged=True),
        output=_outputs(outputs),
        instance_group=[pb.ModelInstanceGroup(kind="KIND_CPU", count=settings["instances"])],
        version_policy=_version_policy(1),
        parameters={"config": pb.ModelParameter(string_value=json.dumps(config))},
    )


def ensemble_config(
    graph: Graph, groups: dict[str, list[str]], version: str, max_batch: int
) -> pb.ModelConfig:
    steps = [_step(graph, name, names) for name, names in groups.items()]
    return pb.ModelConfig(
        name=ENSEMBLE,
        platform="ensemble",
        max_batch_size=max_batch,
        input=_inputs(graph.request),
        output=_outputs({name: graph.tensors[name] for name in graph.response}),
        ensemble_scheduling=pb.ModelEnsembling(step=steps),
        parameters={"artifact_version": pb.ModelParameter(string_value=version)},
    )


def _step(graph: Graph, name: str, names: list[str]) -> pb.ModelEnsembling.Step:
    """The ensemble's step running model `name`: the graph's tensors keep their names."""
    inputs, outputs = group_tensors(graph, names)
    return pb.ModelEnsembling.Step(
        model_name=name,
        model_version=-1,
        input_map={n: n for n in inputs},
        output_map={n: n for n in outputs},
    )


def write_config(path: Path, config: pb.ModelConfig) -> None:
    path.write_text(text_format.MessageToString(config, use_short_repeated_primitives=True))


def read_config(path: Path) -> pb.ModelConfig:
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def export_repository(
    artifacts: Path,
    repository: Path,
    config: dict[str, Any],
    instances: int = 1,
    layout: str = DEFAULT_LAYOUT,
    max_batch: int = 64,
    queue_delay_us: int = 200,
    graph: Graph = GRAPH,
) -> Path:
    """(Re)write the graph's models into `repository` in `layout`; models of other layouts
    there are removed, anything else is left alone."""
    groups = LAYOUTS[layout]
    settings = {"instances": instances, "max_batch": max_batch, "queue_delay_us": queue_delay_us}
    version = Artifacts(artifacts).version
    repository.mkdir(parents=True, exist_ok=True)
    for name in {n for groups in LAYOUTS.values() for n in groups}:
        shutil.rmtree(repository / name, ignore_errors=True)
    for name, names in groups.items():
        _write_version(artifacts, repository / name / "1", names, graph)
        write_config(
            repository / name / "config.pbtxt", model_config(name, graph, names, config, settings)
        )
    ensemble = repository / ENSEMBLE
    shutil.rmtree(ensemble, ignore_errors=True)
    (ensemble / "1").mkdir(parents=True)
    write_config(ensemble / "config.pbtxt", ensemble_config(graph, groups, version, max_batch))
    return repository


def _write_version(artifacts: Path, folder: Path, names: list[str], graph: Graph) -> None:
    """One numbered version of a model: its code and the artifacts its operators read."""
    from serving.live import FILES

    for rel in shipped_code(graph):
        (folder / "code" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, folder / "code" / rel)
    (folder / "artifacts").mkdir(parents=True)
    ops = [op for op in graph.operators if op.name in names]
    for file in sorted({*FILES, *(f for op in ops for f in op.files)}):
        _link_or_copy(artifacts / file, folder / "artifacts" / file)
    (folder / "model.py").write_text(MODEL_PY.format(names=names))


def shipped_code(graph: Graph) -> list[Path]:
    """The app's source files a model runs: the modules of the graph and its operators and all
    of the app they import, at the top or inside a function, with their packages' __init__.py
    (paths relative to ROOT)."""
    todo = [type(graph).__module__, graph.items.__module__]
    todo += [op.__module__ for op in graph.operators]
    found: set[Path] = set()
    while todo:
        path = _source(todo.pop())
        if path is not None and path not in found:
            found.add(path)
            todo += _imported(path)
    return sorted(path.relative_to(ROOT) for path in found)


def _source(module: str) -> Path | None:
    """The file of one of the app's modules or packages; None for other modules."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(path: Path) -> set[str]:
    """Every module the file names in an import, and the packages above them (`from a import b`
    gives a, a.b: b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    parts = [name.split(".") for name in names]
    return {".".join(p[:i]) for p in parts for i in range(1, len(p) + 1)}


def _version_policy(*numbers: int) -> pb.ModelVersionPolicy:
    return pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=numbers))


def pin_version(repository: Path, *numbers: int) -> None:
    """Make `numbers` the versions each model of the repository serves when (re)loaded (two
    during an A/B test; the ensemble chains the newest)."""
    for name in exported_layout(repository):
        path = repository / name / "config.pbtxt"
        config = read_config(path)
        config.version_policy.CopyFrom(_version_policy(*numbers))
        write_config(path, config)


def exported_layout(repository: Path) -> dict[str, list[str]]:
    """The layout whose models the repository holds."""
    for groups in LAYOUTS.values():
        if all((repository / name / "config.pbtxt").exists() for name in groups):
            return groups
    raise FileNotFoundError(f"no exported streamrec models in {repository}")


def versions(repository: Path) -> dict[int, str]:
    """Triton version number → artifact version, for the versions exported into `repository`
    (the first model of its layout holds the same versions as the others)."""
    model = repository / next(iter(exported_layout(repository)))
    out = {}
    for folder in model.iterdir():
        manifest = folder / "artifacts" / Artifacts.MANIFEST
        if folder.name.isdigit() and manifest.exists():
            out[int(folder.name)] = json.loads(manifest.read_text())["version"]
    return dict(sorted(out.items()))


def add_version(artifacts: Path, repository: Path, graph: Graph = GRAPH) -> int:
    """Export `artifacts` as the next numbered version of every model of the repository's
    layout (nothing is loaded); the number, or the existing one for an exported version."""
    existing = versions(repository)
    version = Artifacts(artifacts).version
    for number, name in existing.items():
        if name == version:
            return number
    number = max(existing, default=0) + 1
    for name, names in exported_layout(repository).items():
        _write_version(artifacts, repository / name / str(number), names, graph)
    return number


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)
