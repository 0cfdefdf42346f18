"""Backpressure: a burst over capacity (3 running + 10 queued) gets only 200s and 503s."""

from __future__ import annotations

import asyncio
import collections
import time

import httpx
from conftest import ADMIN

MODEL = "tiny-qwen3"
BURST = 30
CAPACITY = 3 + 10  # max_ongoing_requests + max_queued_requests of the model replica


async def _one(client: httpx.AsyncClient, url: str, i: int, stream: bool):
    body = {
        "model": MODEL,
        "max_tokens": 500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        "messages": [{"role": "user", "content": f"第{i}条新闻"}],
    }
    t0 = time.monotonic()
    if stream:
        async with client.stream("POST", url, json=body) as r:
            text = (await r.aread()).decode()
            return r.status_code, dict(r.headers), text, time.monotonic() - t0
    r = await client.post(url, json=body)
    return r.status_code, dict(r.headers), r.text, time.monotonic() - t0


async def _burst(base_url: str, stream: bool):
    limits = httpx.Limits(max_connections=BURST + 5, max_keepalive_connections=BURST + 5)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        url = f"{base_url}/v1/chat/completions"
        return await asyncio.gather(*[_one(client, url, i, stream) for i in range(BURST)])


def _check(results, label: str):
    by_status = collections.Counter(r[0] for r in results)
    worst = max(r[3] for r in results)
    rejected = [r for r in results if r[0] == 503]
    reject_latency = max((r[3] for r in rejected), default=0.0)
    print(
        f"\n[{label}] sent={len(results)} by_status={dict(by_status)} "
        f"max_latency={worst:.2f}s max_503_latency={reject_latency * 1000:.0f}ms"
    )
    assert set(by_status) <= {200, 503}, by_status
    # Admitted = the configured capacity: the ingress gate lets exactly 13 through to Serve,
    # which holds 3 running + 10 queued.
    assert by_status[200] >= CAPACITY, by_status
    # Requests that finish while the burst is still arriving free places for others, so
    # allow a little slack over the nominal capacity.
    assert by_status[503] >= BURST - CAPACITY - 3, by_status
    for status, headers, text, _ in rejected:
        assert headers.get("retry-after", "").isdigit(), (headers, text)
        err = httpx.Response(status, content=text.encode()).json()["error"]
        assert err["code"] == "queue_full" and err["type"] == "service_unavailable_error"
    for status, _, text, _ in results:
        if status == 200 and text.startswith("data:"):
            assert text.rstrip().endswith("data: [DONE]")


def _wait_idle(base_url: str, timeout_s: float = 30.0) -> None:
    """Earlier tests share this app: start the burst only once nothing is in flight (this
    ingress's gate and the engine), so all 13 places are free. A count that never drops to 0
    is a leaked slot: the gate would then refuse requests Serve could take."""
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        h = httpx.get(f"{base_url}/health", headers=ADMIN, timeout=15).json()
        seen = (h["limits"]["admitted_in_flight"], (h.get("replica") or {}).get("num_unfinished_requests"))
        if seen == (0, 0):
            return
        time.sleep(0.2)
    raise AssertionError(f"service not idle after {timeout_s} s: (gate in flight, engine unfinished) = {seen}")


def test_burst_over_capacity_non_streaming(base_url, client):
    _wait_idle(base_url)
    results = asyncio.run(_burst(base_url, stream=False))
    _check(results, "non-streaming")
    # and the service is still there
    assert client.chat.completions.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    ).choices


def test_burst_over_capacity_streaming(base_url, client):
    _wait_idle(base_url)
    results = asyncio.run(_burst(base_url, stream=True))
    _check(results, "streaming")
    assert client.chat.completions.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    ).choices


def test_model_capacity_gate():
    """The ingress's fast 503: at max_ongoing x replicas + max_queued requests in flight from
    this ingress, the next one is refused before the tokenizer hop, like Serve would."""
    import pytest

    from deployments.admission.capacity import ModelCapacity
    from deployments.api.errors import APIError
    from deployments.config import ServiceConfig
    from serve_app import app_options

    def model_options(cfg):
        return app_options(cfg)["model"]

    cfg = ServiceConfig.model_validate(
        {"deployments": {"model": {"max_ongoing_requests": 3, "max_queued_requests": 10, "num_replicas": 2}}}
    )
    gate = ModelCapacity.from_options(model_options(cfg))
    assert gate.limit == 16
    slots = [gate.acquire(1) for _ in range(16)]
    with pytest.raises(APIError) as exc:
        gate.acquire(2)
    assert exc.value.status == 503 and exc.value.code == "queue_full"
    slots[0].release()
    slots[0].release()  # idempotent
    assert gate.in_flight == 15
    gate.acquire(1)
    auto = ServiceConfig.model_validate(
        {"deployments": {"model": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}}}
    )
    assert ModelCapacity.from_options(model_options(auto)).limit == 3 * 3 + 10  # the most Serve could admit
    assert ModelCapacity.from_options(model_options(auto)).assured == 1 * 3 + 10  # the least (min_replicas)
    assert gate.assured == gate.limit == 16
    to_zero = ServiceConfig.model_validate(
        {"deployments": {"model": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}}}}
    )
    assert ModelCapacity.from_options(model_options(to_zero)).assured == 10  # no replica yet: the queue only
    # a request for n choices takes n places (its n engine sequences)
    weighted = ModelCapacity(13)
    three = weighted.acquire(1, weight=3)
    assert weighted.in_flight == 3
    rest = [weighted.acquire(1, weight=2) for _ in range(5)]
    with pytest.raises(APIError):
        weighted.acquire(1, weight=1)
    three.release()
    assert weighted.in_flight == 10 and weighted.acquire(1, weight=3).weight == 3
    assert ModelCapacity(2).acquire(1, weight=5).weight == 2  # never more than the whole gate
    del rest
    unbounded = ServiceConfig.model_validate({"deployments": {"model": {"max_queued_requests": -1}}})
    assert ModelCapacity.from_options(model_options(unbounded)).limit is None


class _FakeResponse:
    """A model-handle response: refused by Serve's router (BackPressureError) or a result."""

    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        async def result():
            await asyncio.sleep(0)
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return result().__await__()

    def cancel(self):
        self.cancelled = True


def _router_with_gate(limit, assured=None, position=1):
    """The ingress's model calls through its capacity gate without Serve, and the slot of a
    request that arrived as the `position`-th in flight."""
    from deployments.admission.capacity import ANONYMOUS, ModelCalls, ModelCapacity

    calls = ModelCalls(ModelCapacity(limit, assured), retry_after_s=1.0)
    calls.capacity.in_flight = position - 1
    return calls, calls.admit(ANONYMOUS)


def test_router_refusal_within_capacity_is_sent_again(monkeypatch):
    """Serve's router refuses some requests of a simultaneous burst that fit its capacity; a
    request the ingress's gate admitted is sent again, and only a lasting refusal is a 503."""
    import pytest
    from ray.serve.exceptions import BackPressureError

    import deployments.admission.capacity as ingress
    from deployments.api.errors import APIError

    refused = BackPressureError(num_queued_requests=10, max_queued_requests=10)
    sent = []

    def send(outcomes):
        def one():
            sent.append(_FakeResponse(outcomes.pop(0) if outcomes else refused))
            return sent[-1]

        return one

    router, slot = _router_with_gate(13, position=13)
    response, out = asyncio.run(router.start(slot, send([refused, refused, "ok"])))
    assert out == "ok" and len(sent) == 3 and response is sent[-1]

    # a refusal that lasts: 503 queue_full once ADMISSION_RETRY_S has passed
    monkeypatch.setattr(ingress, "ADMISSION_RETRY_S", 0.05)
    sent.clear()
    with pytest.raises(APIError) as exc:
        asyncio.run(router.start(slot, send([])))
    assert exc.value.status == 503 and exc.value.code == "queue_full" and 2 <= len(sent) < 20

    # no gate (unbounded queue or "auto" replicas): Serve alone decides, no second send
    sent.clear()
    with pytest.raises(APIError):
        router_without, slot_without = _router_with_gate(None)
        asyncio.run(router_without.start(slot_without, send([refused, "ok"])))
    assert len(sent) == 1

    # autoscaling (at most 19, at least 13 admitted): the 14th arrival's refusal may be a full
    # queue (fewer replicas running than the most): the 503 at once; the 13th is sent again
    # even with 19 in flight by now, and the 14th too once the count is back within 13
    sent.clear()
    scaling, fourteenth = _router_with_gate(19, 13, position=14)
    with pytest.raises(APIError):
        asyncio.run(scaling.start(fourteenth, send([refused, "ok"])))
    assert len(sent) == 1
    for position, in_flight in ((13, 19), (14, 13)):
        sent.clear()
        scaling, slot_n = _router_with_gate(19, 13, position=position)
        scaling.capacity.in_flight = in_flight
        assert asyncio.run(scaling.start(slot_n, send([refused, "ok"])))[1] == "ok" and len(sent) == 2

    # a deadline while waiting cancels the call (aborts its engine request)
    sent.clear()

    class Slow(_FakeResponse):
        def __await__(self):
            return asyncio.sleep(10).__await__()

    def send_slow():
        sent.append(Slow(None))
        return sent[-1]

    async def with_deadline():
        async with asyncio.timeout(0.05):
            await router.start(slot, send_slow)

    with pytest.raises(TimeoutError):
        asyncio.run(with_deadline())
    assert len(sent) == 1 and sent[0].cancelled


def test_health_tells_a_dead_model_replica_from_a_busy_one():
    """A /health call to the model that times out is "busy" (healthy: long generations hold
    every slot) unless a call found a model replica dead and none has answered since (Serve's
    router holds calls while no replica runs): then the service is unhealthy."""
    import pytest
    from ray.exceptions import ActorDiedError

    from deployments.api.errors import APIError
    from deployments.api.health import replica_state

    calls, _ = _router_with_gate(13)
    timeout = TimeoutError()
    assert not calls.replica_lost() and replica_state(timeout, calls.replica_lost())[1] is True

    async def raise_(exc):
        raise exc

    async def answer():
        return "ok"

    with pytest.raises(APIError) as exc:
        asyncio.run(calls.call(raise_(ActorDiedError())))
    assert exc.value.status == 503 and exc.value.code == "engine_unavailable"
    assert calls.replica_lost()
    state = replica_state(timeout, calls.replica_lost())
    assert state.ok is False and state.busy is False and "died" in state.entry["engine"]
    # the dying replica's own 503 (its engine died; it ends itself) is a loss too; a client error
    # is an answer from a live replica
    calls.answered()
    with pytest.raises(APIError):
        asyncio.run(calls.call(raise_(APIError(503, "engine died", code="engine_unavailable"))))
    assert calls.replica_lost()
    with pytest.raises(APIError):
        asyncio.run(calls.call(raise_(APIError(400, "bad", code="invalid_value"))))
    assert not calls.replica_lost()
    calls.lost()
    assert asyncio.run(calls.call(answer())) == "ok" and not calls.replica_lost()
    assert replica_state(RuntimeError("x"), False)[1] is False  # anything else: unavailable
    assert replica_state(timeout, False).busy is True


class _StreamTrace:
    def chunk(self, n: int) -> None:
        pass

    def finished(self, *args, **kwargs) -> None:
        pass


def _stream_failing_with(exc: BaseException) -> tuple[bytes, list[str]]:
    """The body `sse.stream_events` sends for a stream whose model call fails with `exc` after
    the first chunk, and what it told its hooks."""
    from deployments.api import sse
    from deployments.api.protocol import GenerationChunk

    class Stream:
        def __aiter__(self):
            return self

        async def __anext__(self):
            raise exc

        def cancel(self) -> None:
            told.append("cancel")

    told: list[str] = []
    ctx = sse.StreamContext(True, "chatcmpl-unit", "m", 1, 3, False, False, time.monotonic() + 60, 60)

    async def body() -> bytes:
        events = sse.stream_events(
            ctx,
            GenerationChunk("a", 1),
            Stream(),
            _StreamTrace(),
            lambda: told.append("release"),
            (ConnectionError,),
            lost=lambda: told.append("lost"),
        )
        return b"".join([part async for part in events])

    return asyncio.run(body()), told


def test_a_stream_whose_model_replica_dies_tells_health_and_the_client():
    """A streamed request whose model replica (or its engine) dies after the first chunk ends
    with an `engine_unavailable` error event, frees its slot, and counts as a lost replica for
    /health (`ModelCalls.lost`), as a failed unary call does; a client's error mid-stream
    (the replica answered) does not."""
    from deployments.api.errors import APIError, engine_unavailable

    for exc in (ConnectionError("replica gone"), engine_unavailable("The model engine died.")):
        data, told = _stream_failing_with(exc)
        assert data.index(b'"content":"a"') < data.index(b'"engine_unavailable"'), data
        assert told.count("lost") == 1 and "release" in told and "cancel" in told, told
    data, told = _stream_failing_with(APIError(400, "bad", code="invalid_value"))
    assert b'"invalid_value"' in data and "lost" not in told and "release" in told, (data, told)
