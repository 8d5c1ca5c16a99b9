"""Start and stop stream workers (Faust worker processes) by PID, like the embedded servers."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from schemas.settings import Settings
from streamrec.stack import EmbeddedStack
from streamrec.stack.process import StartupError, free_port, pid_alive, spawn, stop, wait_ready
from streams import FAILED, READY


@dataclass
class Worker:
    pid: int
    log: str
    metrics_port: int
    slot: int = 0  # its static group membership is `<group>-<slot>`


def worker_env(settings: Settings) -> dict[str, str]:
    """The worker's environment: all of its settings, every endpoint and path resolved (so it
    reads no stack state)."""
    stack = EmbeddedStack(settings)
    values = settings.model_dump(exclude_none=True) | {
        "kafka_bootstrap": stack.endpoint("kafka"),
        "redis_url": stack.endpoint("redis"),
        "triton_url": stack.endpoint("triton"),
        **{d: getattr(settings, d).resolve() for d in ("run_dir", "artifact_dir", "data_dir")},
    }
    tf_level = "2" if settings.log_level not in ("debug", "info") else "0"
    env = dict(os.environ) | {"TF_CPP_MIN_LOG_LEVEL": tf_level, "PYTHONUNBUFFERED": "1"}
    for name, value in values.items():
        if isinstance(value, dict):  # nested: STREAMREC_TOPICS__REQUESTS, ...
            nested = {f"STREAMREC_{name}__{k}".upper(): v for k, v in value.items()}
            env.update({k: str(v) for k, v in nested.items() if v is not None})
        else:
            env[f"STREAMREC_{name}".upper()] = str(value)
    return env


class Workers:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.run_dir.resolve() / "workers"
        self.state_file = self.root / f"{settings.worker_group}.json"  # the group's workers

    def running(self) -> list[Worker]:
        if not self.state_file.exists():
            return []
        workers = [Worker(**w) for w in json.loads(self.state_file.read_text())]
        return [w for w in workers if pid_alive(w.pid)]

    def _save(self, workers: list[Worker]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps([asdict(w) for w in workers], indent=2))

    def start(self, n: int = 1, timeout: float = 120.0) -> list[Worker]:
        """Start `n` more workers and wait until each has built its processors.

        Each takes the lowest free slot, and with it a static group membership: a worker started
        in place of a dead one takes over the dead one's partitions at once.
        """
        env = worker_env(self.settings)
        workers = self.running()
        for _ in range(n):
            slot = min(set(range(len(workers) + 1)) - {w.slot for w in workers})
            port = free_port()
            log = self.root / f"{self.settings.worker_group}-{slot}-{port}.log"
            cmd = [
                sys.executable,
                "-m",
                "faust",
                "--quiet" if self.settings.log_level in ("warning", "error") else "--no-quiet",
                "-A",
                "streams.app",
                "worker",
                "--without-web",
                "--loglevel",
                {"warning": "warn"}.get(self.settings.log_level, self.settings.log_level),
            ]
            env_w = env | {
                "STREAMREC_METRICS_PORT": str(port),
                "STREAMREC_WORKER_INSTANCE_ID": f"{self.settings.worker_group}-{slot}",
            }
            # cwd: Faust keeps its data directory in the working directory
            pid = spawn(cmd, log, env=env_w, cwd=self.root)
            try:
                wait_ready(
                    "stream worker", pid, lambda log=log: READY in log.read_text(), timeout, log
                )
            except StartupError as e:
                raise StartupError(_failure(log) or str(e)) from None
            workers.append(Worker(pid, str(log), port, slot))
            self._save(workers)
        return workers

    def kill(self, worker: Worker) -> None:
        """SIGKILL, no clean-up: what a crash looks like to the rest of the system."""
        import signal

        os.kill(worker.pid, signal.SIGKILL)
        stop(worker.pid, grace=5)
        self._save([w for w in self.running() if w.pid != worker.pid])

    def health(self) -> list[dict]:
        """Each running worker's health, read from its Prometheus endpoint."""
        return [{"pid": w.pid, "log": w.log, **scrape(w.metrics_port)} for w in self.running()]

    def stop_all(self) -> int:
        workers = self.running()
        for w in workers:
            stop(w.pid, grace=15)
        self._save([])
        return len(workers)


def _failure(log: Path) -> str | None:
    """The reason a worker gave for not starting, from its log."""
    for line in log.read_text(errors="replace").splitlines():
        if FAILED in line:
            return "stream worker failed to start: " + line.split(FAILED, 1)[1]
    return None


def scrape(port: int, host: str = "127.0.0.1") -> dict:
    """The health figures of one worker's metrics endpoint (`up` False when it does not answer)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {
            "up": False,
            "serving_ready": None,
            "stalled": [],
            "lag": 0.0,
            "retries": 0.0,
            "dead_letters": 0.0,
        }
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def total(name: str) -> float:
        return sum(s.value for s in samples if s.name == name)

    ready = [s.value for s in samples if s.name == "streamrec_serving_ready"]
    return {
        "up": True,
        "serving_ready": ready[0] if ready else None,
        "stalled": [
            s.labels["processor"] for s in samples if s.name == "streamrec_stalled" and s.value
        ],
        "lag": total("streamrec_consumer_lag"),
        "retries": total("streamrec_retries_total"),
        "dead_letters": total("streamrec_dead_letters_total"),
    }


def log_of(worker: Worker) -> str:
    return Path(worker.log).read_text(errors="replace")
