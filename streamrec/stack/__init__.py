"""The embedded stack (broker, Valkey, tritonserver) and where each service is reached.

A service configured by URL (`STREAMREC_KAFKA_BOOTSTRAP`, `STREAMREC_REDIS_URL`,
`STREAMREC_TRITON_URL`) is used as it is and never started; the others are started by
`EmbeddedStack.up()` and recorded in `<run_dir>/stack.json`, which later commands read.
"""

from __future__ import annotations

import json

from schemas.settings import ENDPOINTS, Settings
from streamrec.stack.servers import STARTERS, Service, stop_service

SERVICES = ("kafka", "redis", "triton")


class StackNotRunning(RuntimeError):
    pass


class EmbeddedStack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.run_dir.resolve()
        self.state_file = self.root / "stack.json"

    def external(self, name: str) -> str | None:
        return getattr(self.settings, ENDPOINTS[name])

    def services(self) -> dict[str, Service]:
        """The embedded services recorded as started (alive or not)."""
        if not self.state_file.exists():
            return {}
        return {k: Service(**v) for k, v in json.loads(self.state_file.read_text()).items()}

    def _save(self, services: dict[str, Service]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: s.to_dict() for k, s in services.items()}, indent=2))
        tmp.replace(self.state_file)

    def up(self, names: tuple[str, ...] = SERVICES, on_start=None) -> dict[str, Service]:
        """Start the named services that are neither external nor already running.

        A recorded service that died is healed in place: started again on its ports, with its
        data directory (Valkey's AOF, the broker's log) and model repository, so that every
        client and the Feast repository find it where they found it before.
        """
        recorded = self.services()
        running = {k: s for k, s in recorded.items() if s.alive()}
        for name in names:
            if self.external(name) or name in running:
                continue
            if on_start:
                on_start(name)
            timeout = getattr(self.settings, f"{name}_start_timeout")
            # Triton's stages read the stack's Redis, whatever the exported configs say.
            extra = {"redis_url": self._redis(running)} if name == "triton" else {}
            if name == "redis":
                s = self.settings
                extra = {
                    "cluster_nodes": s.redis_cluster_nodes,
                    "cluster_replicas": s.redis_cluster_replicas,
                }
            try:
                running[name] = STARTERS[name](
                    self.root / name, timeout, recorded.get(name), **extra
                )
            finally:
                self._save(running | {k: s for k, s in recorded.items() if k not in running})
        return running

    def _redis(self, running: dict[str, Service]) -> str | None:
        return self.external("redis") or (running["redis"].endpoint if "redis" in running else None)

    def restart(self, names: tuple[str, ...]) -> dict[str, Service]:
        """Stop the named services and start them again on the same ports, so that running
        workers and clients find them where they were."""
        services = self.services()
        for name in names:
            if name in services and not self.external(name):
                stop_service(services[name])
        return self.up(names)

    def down(self, names: tuple[str, ...] = SERVICES) -> list[str]:
        """Stop the named embedded services by PID; returns the names stopped."""
        services = self.services()
        stopped = []
        for name in names:
            service = services.pop(name, None)
            if service is not None:
                stop_service(service)
                stopped.append(name)
        self._save(services)
        return stopped

    def endpoint(self, name: str) -> str:
        """Where a service is reached: its configured URL, else the running embedded one."""
        if url := self.external(name):
            return url
        service = self.services().get(name)
        if service is None or not service.alive():
            env = "STREAMREC_" + ENDPOINTS[name].upper()
            raise StackNotRunning(
                f"no {name} service: run `streamrec stack up` or set {env} "
                f"(run directory: {self.root})"
            )
        return service.endpoint

    def status(self) -> list[dict[str, str]]:
        services = self.services()
        rows = []
        for name in SERVICES:
            if url := self.external(name):
                rows.append({"service": name, "state": "external", "endpoint": url, "pid": ""})
            elif name in services:
                s = services[name]
                state = "running" if s.alive() else "dead"
                rows.append(
                    {"service": name, "state": state, "endpoint": s.endpoint, "pid": str(s.pid)}
                )
            else:
                rows.append({"service": name, "state": "stopped", "endpoint": "", "pid": ""})
        return rows
