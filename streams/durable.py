"""Run a batch until its effects are durable: the rule that keeps accepted events from being lost.

The stream agents ack (and so let Faust commit) a batch's offsets only after `Guard.run` returns.
Two kinds of failure are told apart:

- **Transient**: a dependency is down or slow (Redis, the broker, an fsync not confirmed). The
  batch is retried with bounded exponential backoff for as long as it takes; the agent holds the
  batch, so its partitions stop advancing and nothing behind it is committed. The stall shows in
  `streamrec_stalled` and in the log, and processing resumes by itself when the dependency
  returns. Retrying is safe because every effect is idempotent (event ids, newest-wins updates).
  Retrying beats failing fast here: a restart would cost a rebalance and the model loads, and
  the dependency would still be down.
- **Deterministic**: the same batch raises anything else `tries` times (a bug, an event that
  breaks the code). The batch is split and each event run alone; one that still fails is a
  poison event and becomes a dead letter with the error, so it cannot block its partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from streams import metrics
from streams.processors import RawEvent, dead_letter

log = logging.getLogger("streamrec.workers")
R = TypeVar("R")
# Error replies of a Redis that is alive but cannot take writes now (out of memory, a failed
# AOF or RDB write, no replicas, a cluster failover): the work is fine, the server is not.
_REDIS_BUSY = {"OOM", "MISCONF", "NOREPLICAS", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "LOADING"}


def transient(error: BaseException) -> bool:
    """Whether an error says that a dependency is unavailable, rather than that the work is bad."""
    import redis
    from aiokafka.errors import KafkaError, ProducerFenced

    from state.store import NotDurable
    from streams.processors import Contention

    if isinstance(error, ProducerFenced):  # a newer worker holds our transactional id
        return False
    if isinstance(error, redis.ResponseError) and str(error).split(" ", 1)[0] in _REDIS_BUSY:
        return True
    if isinstance(error, redis.exceptions.RedisClusterException):  # also a cross-slot bug
        return "cannot be connected" in str(error)  # no node answered the slot map's refresh
    return isinstance(
        error,
        redis.ConnectionError  # includes BusyLoadingError (a restarted server reading its AOF)
        | redis.exceptions.ClusterError  # includes ClusterDownError: a node is unreachable
        | redis.exceptions.AskError  # includes MovedError: slots moved between nodes
        | redis.exceptions.NoScriptError  # a restarted node lost the scripts (`state.store`)
        | redis.TimeoutError
        | redis.ReadOnlyError
        | OSError  # includes ConnectionError
        | TimeoutError
        | KafkaError
        | NotDurable
        | Contention,
    )


@dataclass
class Backoff:
    first_s: float = 0.05
    max_s: float = 2.0

    def delay(self, attempt: int) -> float:
        return min(self.first_s * 2**attempt, self.max_s)


class Guard:
    """Runs one processor's batches until they succeed; see the module's doc."""

    def __init__(self, processor: str, tries: int = 3, backoff: Backoff | None = None):
        self.processor = processor
        self.tries = tries
        self.backoff = backoff or Backoff()

    async def run(
        self,
        work: Callable[[list[RawEvent]], Awaitable[R]],
        events: list[RawEvent],
        poisoned: Callable[[dict], R],
    ) -> list[R]:
        """The results of `work` over `events` (one, or one per event after a split), with
        `poisoned(dead letter)` standing for each event that could not be processed."""
        failures, stalled_since, attempt = 0, None, 0
        while True:
            try:
                result = await work(events)
            except Exception as e:  # noqa: BLE001 - classified below; nothing escapes an agent
                if transient(e):
                    stalled_since = stalled_since or self._stalled(e, len(events))
                    metrics.RETRIES.labels(self.processor, "transient").inc()
                    await asyncio.sleep(self.backoff.delay(attempt))
                    attempt += 1
                    continue
                failures += 1
                metrics.RETRIES.labels(self.processor, "failed").inc()
                if failures < self.tries:
                    log.warning(
                        "%s: batch failed (%s: %s), trying again",
                        self.processor,
                        type(e).__name__,
                        e,
                    )
                    await asyncio.sleep(self.backoff.delay(failures))
                    continue
                if len(events) == 1:
                    reason = f"failed {self.tries} times: {type(e).__name__}: {e}"
                    log.error(
                        "%s: poison event %s/%s@%s dead-lettered (%s)",
                        self.processor,
                        events[0].topic,
                        events[0].partition,
                        events[0].offset,
                        reason,
                    )
                    return [poisoned(dead_letter(events[0], reason, self.processor))]
                log.warning(
                    "%s: batch of %d failed %d times; running its events one by one",
                    self.processor,
                    len(events),
                    self.tries,
                )
                results: list[R] = []
                for event in events:
                    results += await self.run(work, [event], poisoned)
                return results
            if stalled_since is not None:
                self._resumed(stalled_since, attempt)
            return [result]

    def _stalled(self, error: BaseException, n: int) -> float:
        log.warning(
            "%s: dependency unavailable (%s: %s); holding %d events uncommitted and retrying",
            self.processor,
            type(error).__name__,
            error,
            n,
        )
        metrics.STALLED.labels(self.processor).set(1)
        return time.monotonic()

    def _resumed(self, since: float, attempts: int) -> None:
        seconds = time.monotonic() - since
        log.warning("%s: resumed after %.1f s (%d retries)", self.processor, seconds, attempts)
        metrics.STALLED.labels(self.processor).set(0)
        metrics.STALL_SECONDS.labels(self.processor).inc(seconds)


async def until_sent(send: Callable[[], Awaitable[object]], what: str) -> None:
    """Produce and wait for the broker's acknowledgement, retrying while the broker is away."""
    attempt = 0
    backoff = Backoff()
    while True:
        try:
            await send()
            return
        except Exception as e:  # noqa: BLE001
            if not transient(e):
                raise
            if attempt == 0:
                log.warning("%s: broker unavailable (%s); retrying", what, e)
            metrics.RETRIES.labels(what, "transient").inc()
            await asyncio.sleep(backoff.delay(attempt))
            attempt += 1
