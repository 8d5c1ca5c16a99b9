"""The client library: produce events and requests from your own service, get recommendations.

    from streamrec.client import Client

    with Client() as client:                      # the embedded stack, or STREAMREC_KAFKA_BOOTSTRAP
        client.track("196", "242", "click")       # an interaction, keyed and with an event id
        client.update_item("1683", title="New", genres=["Drama"])
        response = client.recommend("196", k=10, timeout=5.0)
        print(response.item_ids)

`AsyncClient` has the same methods for asyncio (`await client.recommend(...)`). Records are
encoded as the workers read them: Avro single-object encoding, or the Schema Registry wire
format when `STREAMREC_SCHEMA_REGISTRY_URL` is set. Responses are matched to requests by request
id through one response consumer per client, which reads the recommendations topic from the
moment the client first asks (no consumer group to join).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, ParamSpec, TypeVar

from schemas.records import (
    EventType,
    Interaction,
    ItemUpdate,
    RecommendationRequest,
    RecommendationResponse,
    now_ms,
)
from schemas.settings import Settings, get_settings
from streams.topics import role_for

__all__ = ["AsyncClient", "Client", "RecommendationTimeout"]


class RecommendationTimeout(TimeoutError):
    """No response arrived in time (the request carried that deadline, so none will)."""

    def __init__(self, request: RecommendationRequest, timeout: float):
        super().__init__(
            f"no recommendation for user {request.user_id!r} within {timeout:g} s "
            f"(request {request.request_id}): are the workers running (`streamrec serve "
            "workers`) and keeping up?"
        )
        self.request = request


class _Responses:
    """One consumer of the recommendations topic, in a thread, handing each response to whoever
    waits for its request id."""

    def __init__(self, settings: Settings, bootstrap: str):
        from streams.kafka import ResponseStream

        self._waiting: dict[str, Callable[[RecommendationResponse], None]] = {}
        self._lock = threading.Lock()
        group = f"streamrec-client-{uuid.uuid4().hex[:8]}"
        self._stream = ResponseStream(settings, bootstrap, self._hand_over, group, from_now=True)

    def expect(self, request_id: str, deliver: Callable[[RecommendationResponse], None]) -> None:
        with self._lock:
            self._waiting[request_id] = deliver

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._waiting.pop(request_id, None)

    def close(self) -> None:
        self._stream.close()

    def _hand_over(self, response: dict) -> None:
        with self._lock:
            deliver = self._waiting.pop(response["request_id"], None)
        if deliver is not None:
            deliver(RecommendationResponse.from_record(response))


class _Base:
    def __init__(
        self,
        bootstrap: str | None = None,
        settings: Settings | None = None,
        timeout: float = 5.0,
    ):
        from streams.kafka import EventProducer

        self.settings = settings or get_settings()
        self.bootstrap = bootstrap or self.settings.kafka_bootstrap or _embedded(self.settings)
        self.timeout = timeout
        self._producer = EventProducer(self.settings, self.bootstrap)
        self._responses: _Responses | None = None
        self._responses_lock = threading.Lock()

    def send(self, record: Interaction | ItemUpdate | RecommendationRequest) -> None:
        """Produce any typed record to its topic (a request's answer is not awaited)."""
        self._producer.send(role_for(record.SCHEMA), record.to_record())

    def _request(
        self,
        user: str,
        k: int,
        exclude: Iterable[str],
        timeout: float,
        temperature: float | None,
        seed: int | None,
        context: dict[str, str] | None,
        ts: int | None,
        explain: bool,
    ) -> RecommendationRequest:
        at = now_ms()
        return RecommendationRequest(
            str(user),
            k,
            [str(i) for i in exclude],
            timestamp_ms=ts if ts is not None else at,
            deadline_ms=at + int(timeout * 1000),  # wall clock: when the client stops waiting
            temperature=temperature,
            seed=seed,
            context=context or {},
            explain=explain,
        )

    def _responses_started(self) -> _Responses:
        with self._responses_lock:
            if self._responses is None:
                self._responses = _Responses(self.settings, self.bootstrap)
        return self._responses

    def _send_request(
        self, request: RecommendationRequest, deliver: Callable[[RecommendationResponse], None]
    ) -> None:
        self._responses_started().expect(request.request_id, deliver)
        self.send(request)

    def _close(self) -> None:
        try:
            self._producer.close()
        finally:
            if self._responses is not None:
                self._responses.close()


class Client(_Base):
    """Blocking client. `track` and `update_item` return at once (delivery is asynchronous;
    `flush` waits for it); `recommend` waits for the answer."""

    # `self: _Base`: AsyncClient offers these two as they are, as coroutines (neither waits).
    def track(
        self: _Base,
        user: str,
        item: str,
        event_type: EventType = "view",
        value: float | None = None,
        ts: int | None = None,
        *,
        request_id: str | None = None,
        session_id: str | None = None,
        context: dict[str, str] | None = None,
    ) -> Interaction:
        """Record that `user` interacted with `item` (at `ts`, epoch ms; default now)."""
        context = dict(context or {})
        if request_id:  # the response this interaction follows from (A/B attribution)
            context["request_id"] = request_id
        event = Interaction(
            str(user),
            str(item),
            event_type,
            value,
            ts if ts is not None else now_ms(),
            session_id=session_id,
            context=context,
        )
        self.send(event)
        return event

    def update_item(
        self: _Base,
        item: str,
        *,
        available: bool = True,
        title: str | None = None,
        year: int | None = None,
        genres: Iterable[str] = (),
        attributes: dict[str, str] | None = None,
        ts: int | None = None,
    ) -> ItemUpdate:
        """Add an item to the catalog, change its attributes, or make it (un)available."""
        update = ItemUpdate(
            str(item),
            available=available,
            title=title,
            year=year,
            genres=list(genres),
            attributes=dict(attributes or {}),
            timestamp_ms=ts if ts is not None else now_ms(),
        )
        self.send(update)
        return update

    def recommend(
        self,
        user: str,
        k: int = 10,
        *,
        exclude: Iterable[str] = (),
        timeout: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        context: dict[str, str] | None = None,
        ts: int | None = None,
        explain: bool = False,
    ) -> RecommendationResponse:
        """Ask for `k` items for `user` and wait for the answer (`status` ok, error or expired).

        `ts`: the time the request is served as of (epoch ms; default now), for replays.
        `explain`: the response also says why each item is there (`response.explanations`).
        Raises `RecommendationTimeout` when none arrives within `timeout` seconds.
        """
        timeout = self.timeout if timeout is None else timeout
        request = self._request(user, k, exclude, timeout, temperature, seed, context, ts, explain)
        answer: Future[RecommendationResponse] = Future()
        self._send_request(request, answer.set_result)
        try:
            return answer.result(timeout)
        except FutureTimeout:
            self._responses.forget(request.request_id)
            raise RecommendationTimeout(request, timeout) from None

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every event produced so far is on the broker."""
        self._producer.flush(timeout)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _coroutine(method: Callable[_P, _R]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """`method` as a coroutine function, with its signature and docstring."""

    @functools.wraps(method)
    async def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return method(*args, **kwargs)

    return call


class AsyncClient(_Base):
    """The same for asyncio: every method is a coroutine."""

    track = _coroutine(Client.track)
    update_item = _coroutine(Client.update_item)

    async def recommend(
        self,
        user: str,
        k: int = 10,
        *,
        exclude: Iterable[str] = (),
        timeout: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        context: dict[str, str] | None = None,
        ts: int | None = None,
        explain: bool = False,
    ) -> RecommendationResponse:
        timeout = self.timeout if timeout is None else timeout
        request = self._request(user, k, exclude, timeout, temperature, seed, context, ts, explain)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[RecommendationResponse] = loop.create_future()

        def deliver(response: RecommendationResponse) -> None:
            loop.call_soon_threadsafe(_resolve, answer, response)

        if self._responses is None:  # its start blocks on metadata: not on the event loop
            await asyncio.to_thread(self._responses_started)
        self._send_request(request, deliver)
        try:
            return await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            self._responses.forget(request.request_id)
            raise RecommendationTimeout(request, timeout) from None

    async def flush(self, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self._producer.flush, timeout)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _resolve(future: asyncio.Future, response: RecommendationResponse) -> None:
    if not future.done():
        future.set_result(response)


def _embedded(settings: Settings) -> str:
    from streamrec.stack import EmbeddedStack

    return EmbeddedStack(settings).endpoint("kafka")
