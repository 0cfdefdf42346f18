"""Backpressure: a burst over capacity (3 running + 10 queued) gets only 200s and 503s."""

from __future__ import annotations

import asyncio
import collections
import time

import httpx

MODEL = "tiny-qwen3"
BURST = 30
CAPACITY = 3 + 10  # max_ongoing_requests + max_queued_requests of the model replica


async def _one(client: httpx.AsyncClient, url: str, i: int, stream: bool):
    body = {"model": MODEL, "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": f"第{i}条新闻"}]}
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
    print(f"\n[{label}] sent={len(results)} by_status={dict(by_status)} "
          f"max_latency={worst:.2f}s max_503_latency={reject_latency * 1000:.0f}ms")
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


def test_burst_over_capacity_non_streaming(base_url, client):
    results = asyncio.run(_burst(base_url, stream=False))
    _check(results, "non-streaming")
    # and the service is still there
    assert client.chat.completions.create(model=MODEL, max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}]).choices


def test_burst_over_capacity_streaming(base_url, client):
    results = asyncio.run(_burst(base_url, stream=True))
    _check(results, "streaming")
    assert client.chat.completions.create(model=MODEL, max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}]).choices


def test_model_capacity_gate():
    """The ingress's fast 503: at max_ongoing x replicas + max_queued requests in flight from
    this ingress, the next one is refused before the tokenizer hop, like Serve would."""
    import pytest

    from deployments.config import ServiceConfig
    from deployments.errors import APIError
    from deployments.ingress import ModelCapacity

    cfg = ServiceConfig.model_validate({"deployments": {"model": {
        "max_ongoing_requests": 3, "max_queued_requests": 10, "num_replicas": 2}}})
    gate = ModelCapacity.from_config(cfg)
    assert gate.limit == 16
    slots = [gate.acquire(1) for _ in range(16)]
    with pytest.raises(APIError) as exc:
        gate.acquire(2)
    assert exc.value.status == 503 and exc.value.code == "queue_full"
    slots[0].release()
    slots[0].release()  # idempotent
    assert gate.in_flight == 15
    gate.acquire(1)
    auto = ServiceConfig.model_validate({"deployments": {"model": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}}})
    assert ModelCapacity.from_config(auto).limit == 3 * 3 + 10  # the most Serve could admit
    unbounded = ServiceConfig.model_validate({"deployments": {"model": {"max_queued_requests": -1}}})
    assert ModelCapacity.from_config(unbounded).limit is None
