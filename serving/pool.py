"""Several Triton servers behind one client (`STREAMREC_TRITON_URL=host:port,host:port`).

`TritonPool` is what the stream workers send requests through: each request goes to the healthy
server with the fewest requests in flight (ties in turn). A server whose call fails because it is
unreachable (gRPC UNAVAILABLE, a refused or reset connection) is ejected at once and the request
goes to the next server within its timeout; a failed canary (a real inference, see
`serving.client`) ejects too, since Triton's ready flag misses dead stages. Ejected servers get a
canary every `probe_interval_s` and are readmitted when one passes. With no healthy server left,
each server is tried in turn, as one server is without a pool, and the caller retries.

`TritonServers` is the synchronous side (the CLI, the trainer): a read asks the first server that
answers; a change of what the servers load (promote, rollback, A/B) goes to every one of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from serving.client import AsyncTritonRecommender, CanaryResult, TritonRecommender

log = logging.getLogger("streamrec.triton")
T = TypeVar("T")


def split_urls(url: str | Sequence[str]) -> list[str]:
    """`host:port[,host:port...]` as a list (in order, without repeats)."""
    parts = url.split(",") if isinstance(url, str) else url
    urls = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not urls:
        raise ValueError(f"no Triton endpoint in {url!r}")
    return urls


def is_down(error: BaseException) -> bool:
    """The server could not be reached (not: the request failed on it)."""
    status = getattr(error, "status", lambda: None)()
    if isinstance(error, TimeoutError):  # an OSError, but a slow server is not a dead one
        return False
    return status == "StatusCode.UNAVAILABLE" or isinstance(error, OSError)


@dataclass(eq=False)
class Server:
    url: str
    client: AsyncTritonRecommender
    healthy: bool = True
    in_flight: int = 0
    answered: int = 0  # inferences it answered (requests, not canaries)
    ejected_at: float = 0.0  # time.monotonic() of the last ejection


class TritonPool:
    """`AsyncTritonRecommender`'s interface over one or more servers."""

    def __init__(
        self,
        url: str | Sequence[str],
        probe_interval_s: float = 0.5,
        probe_timeout_s: float = 2.0,
        client: Callable[[str], Any] = AsyncTritonRecommender,
    ):
        self.servers = [Server(u, client(u)) for u in split_urls(url)]
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.version = ""
        self._turn = 0
        self._probe: asyncio.Task | None = None

    async def connect(self) -> None:
        """Connect to every server; those that do not answer start ejected. Raises the first
        server's error when none answers."""
        errors = await asyncio.gather(
            *(s.client.connect() for s in self.servers), return_exceptions=True
        )
        if all(e is not None for e in errors):
            raise errors[0]
        for server, error in zip(self.servers, errors, strict=True):
            if error is not None:
                self._eject(server, str(error))
        self.version = next(s for s in self.servers if s.healthy).client.version
        if len(self.servers) > 1:
            self._probe = asyncio.create_task(self._probe_ejected())

    def _pick(self, tried: list[Server]) -> Server | None:
        untried = [s for s in self.servers if s not in tried]
        candidates = [s for s in untried if s.healthy] or untried
        if not candidates:
            return None
        self._turn += 1
        k = self._turn % len(candidates)
        return min(candidates[k:] + candidates[:k], key=lambda s: s.in_flight)

    async def run(
        self,
        tensors: dict[str, np.ndarray],
        timeout: float | None = None,
        version: int | None = None,
    ) -> dict:
        """As `AsyncTritonRecommender.run`, on the server `_pick` chooses; on the next one while
        servers turn out to be down and time is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: list[Server] = []
        error: Exception | None = None
        while (server := self._pick(tried)) is not None:
            left = None if deadline is None else deadline - time.monotonic()
            if error is not None and left is not None and left <= 0:
                break
            server.in_flight += 1
            try:
                outputs = await server.client.run(tensors, timeout=left, version=version)
            except Exception as e:
                if not is_down(e):
                    raise
                self._eject(server, str(e))
                tried.append(server)
                error = e
                continue
            finally:
                server.in_flight -= 1
            server.answered += 1
            self._admit(server)  # it answered: a server tried while all were ejected is back
            return outputs
        raise error

    async def canaries(self, timeout: float = 2.0) -> dict[str, CanaryResult]:
        """A canary through every server at once (url -> result): a server that fails its
        canary is ejected, one that passes it readmitted."""
        results = await asyncio.gather(*(s.client.canary(timeout) for s in self.servers))
        for server, result in zip(self.servers, results, strict=True):
            if result.ok:
                self._admit(server)
            else:
                self._eject(server, f"canary failed: {result.reason}")
        return {s.url: r for s, r in zip(self.servers, results, strict=True)}

    async def canary(self, timeout: float = 2.0) -> CanaryResult:
        """Every server's canary as one result: ok when all passed, else the failures (each
        reason prefixed by its server) and their suspect stages."""
        results = await self.canaries(timeout)
        failed = {url: r for url, r in results.items() if not r.ok}
        if len(results) == 1:
            return next(iter(results.values()))
        return CanaryResult(
            not failed,
            max(r.seconds for r in results.values()),
            "\n".join(f"{url}: {r.reason}" for url, r in failed.items()),
            tuple(dict.fromkeys(s for r in failed.values() for s in r.suspects)),
        )

    async def heal(
        self, stages: Sequence[str], timeout: float = 30.0, server: str | None = None
    ) -> list[str]:
        """As `AsyncTritonRecommender.heal`, on the server with url `server`, else on every one."""
        for s in self.servers:
            if server is None or s.url == server:
                await s.client.heal(stages, timeout)
        return list(stages)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await asyncio.gather(*(s.client.close() for s in self.servers), return_exceptions=True)

    async def _probe_ejected(self) -> None:
        """Readmit an ejected server as soon as a canary through it passes."""
        while True:
            await asyncio.sleep(self.probe_interval_s)
            ejected = [s for s in self.servers if not s.healthy]
            results = await asyncio.gather(
                *(s.client.canary(self.probe_timeout_s) for s in ejected)
            )
            for server, result in zip(ejected, results, strict=True):
                if result.ok:
                    self._admit(server)

    def _eject(self, server: Server, reason: str) -> None:
        """Take `server` out of the rotation (one server alone stays: nothing to fail over to)."""
        if server.healthy and len(self.servers) > 1:
            server.healthy, server.ejected_at = False, time.monotonic()
            log.warning("Triton %s ejected: %s", server.url, (reason or "?").splitlines()[0][:300])

    def _admit(self, server: Server) -> None:
        if not server.healthy:
            server.healthy = True
            seconds = time.monotonic() - server.ejected_at
            log.warning("Triton %s readmitted (%.1f s after its ejection)", server.url, seconds)


class TritonServers:
    """Several Triton servers from synchronous code: reads from the first that answers, changes
    of what they serve on every one (each must be reachable; the error names the one that is
    not). Servers share a model repository, so a pinned version is what a restarted one loads."""

    def __init__(self, url: str | Sequence[str], timeout: float | None = 10.0):
        self.urls = split_urls(url)
        self.timeout = timeout
        self._clients: dict[str, TritonRecommender] = {}

    def client(self, url: str) -> TritonRecommender:
        if url not in self._clients:
            self._clients[url] = TritonRecommender(url, self.timeout)
        return self._clients[url]

    def _first(self, call: Callable[[TritonRecommender], T]) -> T:
        for n, url in enumerate(self.urls):
            try:
                return call(self.client(url))
            except Exception:
                if n == len(self.urls) - 1:
                    raise
                log.warning("Triton %s did not answer; asking the next server", url)
        raise AssertionError("unreachable")

    def served_version(self) -> str:
        return self._first(TritonRecommender.served_version)

    def recommend(self, request: dict) -> dict:
        return self._first(lambda c: c.recommend(request))

    def serve_version(self, *numbers: int, timeout: float = 120.0) -> None:
        """`TritonRecommender.serve_version` on every server, once all of them answered."""
        clients = []
        for url in self.urls:
            try:
                clients.append(self.client(url))
            except Exception as e:
                if len(self.urls) == 1:
                    raise
                raise ConnectionError(f"Triton at {url}: {e}") from e
        for c in clients:
            c.serve_version(*numbers, timeout=timeout)

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
