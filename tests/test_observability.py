"""Cluster-wide stats: recorders (as in ingress and model replicas) → the stats actor.

Most tests drive the actor class in-process with a fake clock (exact figures); one runs the
real named Ray actor with background flushing, as the replicas do."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray_helpers import ray_local  # noqa: F401  (fixture)

from deployments.observability import (
    ObservabilityConfig,
    ServiceStatsActor,
    StatsRecorder,
    aggregator,
    recorder,
    rejection_reason,
    traces,
)

EP = "/v1/chat/completions"


class FakeTime:
    """Stands in for the `time` module inside deployments.observability."""

    def __init__(self):
        self.t = 1000.0

    def time(self) -> float:
        return 1_700_000_000.0 + self.t

    def perf_counter(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock(monkeypatch) -> FakeTime:
    fake = FakeTime()
    for module in (traces, recorder, aggregator):  # the modules that read the time
        monkeypatch.setattr(module, "time", fake)
    return fake


def _actor(clock: FakeTime, **kw) -> ServiceStatsActor:
    return ServiceStatsActor(ray_metrics=False, clock=clock.monotonic, **kw)


async def _flush(*recs: StatsRecorder) -> None:
    for r in recs:
        assert await r.flush()


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(fams: dict, family: str, sample: str, **labels) -> float:
    for s in fams[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, sample, labels))


# --------------------------------------------------------------------------- aggregation


def test_two_ingress_two_model_sources_aggregate(clock):
    """Two ingress replicas and two model replicas: totals, tokens, TTFT percentiles, the
    joined queue/engine/overhead times and the Prometheus text all agree with what was sent."""
    actor = _actor(clock)
    ing = [StatsRecorder("ingress", sink=actor, source_id=f"ingress-{i}") for i in range(2)]
    mod = [StatsRecorder("model", sink=actor, source_id=f"model-{i}", capacity=3) for i in range(2)]
    ttfts = [0.1, 0.2, 0.3, 0.4, 0.5]

    async def go():
        await _flush(*mod)  # model replicas heartbeat before traffic
        for i, ttft in enumerate(ttfts):
            stream = i % 2 == 0
            t = ing[i % 2].request_started(EP, request_id=f"r{i}", stream=stream)
            clock.advance(0.01)
            t.tokenized(7)  # tokenize 10 ms
            t.dispatched()
            clock.advance(0.02)  # queue 20 ms
            e = mod[i % 2].engine_started(f"r{i}", 7)
            clock.advance(ttft - 0.03)  # engine prefill
            for _ in range(4):  # 4 tokens, 50 ms apart
                e.output(1)
                if stream:
                    t.chunk(1)
                clock.advance(0.05)
            e.finished()
            t.finished(200, completion_tokens=4)
        ing[0].record_rejection(EP, 429)  # rate limited before dispatch
        q = ing[1].request_started(EP, request_id="rq")
        q.dispatched()
        q.finished(503, "queue_full")  # Serve backpressure
        await _flush(*ing, *mod)

    asyncio.run(go())
    stats = actor.stats()
    assert stats["total_requests"] == 7
    assert stats["successful_requests"] == 5 and stats["failed_requests"] == 2
    assert stats["queue_full_count"] == 1
    assert stats["rejections"]["rate_limited"] == 1 and stats["rejections"]["queue_full"] == 1
    assert stats["current_queue_size"] == 0 and stats["running_requests"] == 0
    assert stats["model_replicas"] == 2 and stats["ingress_replicas"] == 2
    assert stats["available_slots"] == 6

    m = actor.metrics_json()
    assert m["total_requests"] == 7 and m["total_tokens_generated"] == 20 and m["total_prompt_tokens"] == 35
    assert m["num_waiting_requests"] == 0 and m["num_running_requests"] == 0
    slo = m["slo"]
    assert slo["sample_size"] == 5
    assert slo["ttft_mean"] == pytest.approx(0.3)
    assert slo["ttft_p50"] == pytest.approx(0.3)
    assert slo["ttft_p95"] == pytest.approx(0.48)
    assert slo["ttft_p99"] == pytest.approx(0.496)
    assert slo["decoding_throughput_mean"] == pytest.approx(20.0)  # 3 tokens after the first in 150 ms
    assert slo["decoding_throughput_p95"] == pytest.approx(20.0)
    assert slo["total_throughput"] > 0

    fams = _families(actor.prometheus_text())
    assert _sample(fams, "llm_requests", "llm_requests_total", endpoint=EP, status="200") == 5
    assert _sample(fams, "llm_requests", "llm_requests_total", endpoint=EP, status="429") == 1
    assert _sample(fams, "llm_requests", "llm_requests_total", endpoint=EP, status="503") == 1
    assert _sample(fams, "llm_rejections", "llm_rejections_total", reason="queue_full") == 1
    assert _sample(fams, "llm_rejections", "llm_rejections_total", reason="timeout") == 0
    assert _sample(fams, "llm_generation_tokens", "llm_generation_tokens_total") == 20
    assert _sample(fams, "llm_prompt_tokens", "llm_prompt_tokens_total") == 35
    assert _sample(fams, "llm_model_replicas", "llm_model_replicas") == 2

    ttft = fams["llm_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in ttft.samples if s.name.endswith("_bucket")}
    assert buckets["0.1"] == 1 and buckets["0.3"] == 3 and buckets["0.5"] == 5 and buckets["2.0"] == 5
    assert buckets["+Inf"] == 5
    assert _sample(fams, "llm_time_to_first_token_seconds", "llm_time_to_first_token_seconds_count") == 5
    assert _sample(fams, "llm_time_to_first_token_seconds", "llm_time_to_first_token_seconds_sum") == pytest.approx(1.5)
    # queue 20 ms each; engine = ttft - 0.03 + 0.2; e2e = engine + 0.03: overhead = 30 ms each
    assert _sample(fams, "llm_queue_time_seconds", "llm_queue_time_seconds_sum") == pytest.approx(0.1)
    assert _sample(fams, "llm_serving_overhead_seconds", "llm_serving_overhead_seconds_sum") == pytest.approx(0.15)
    assert _sample(fams, "llm_serving_overhead_seconds", "llm_serving_overhead_seconds_count") == 5
    assert _sample(fams, "llm_tokenize_time_seconds", "llm_tokenize_time_seconds_count") == 5
    assert _sample(fams, "llm_e2e_request_latency_seconds", "llm_e2e_request_latency_seconds_count") == 5
    assert _sample(fams, "llm_engine_time_seconds", "llm_engine_time_seconds_count") == 5
    # 5 requests x 3 gaps of 50 ms (stream: ingress chunks; non-stream: engine outputs)
    assert _sample(fams, "llm_inter_token_latency_seconds", "llm_inter_token_latency_seconds_count") == 15
    assert _sample(fams, "llm_inter_token_latency_seconds", "llm_inter_token_latency_seconds_sum") == pytest.approx(
        0.75
    )
    for name in ("llm_requests_waiting", "llm_requests_running", "llm_available_slots"):
        assert fams[name].type == "gauge"


def test_waiting_running_and_gauge_expiry(clock):
    actor = _actor(clock, gauge_ttl_s=5)
    a = StatsRecorder("ingress", sink=actor, source_id="ingress-a")
    b = StatsRecorder("ingress", sink=actor, source_id="ingress-b")
    m1 = StatsRecorder("model", sink=actor, source_id="model-1", capacity=3)
    m2 = StatsRecorder("model", sink=actor, source_id="model-2", capacity=3)

    async def go():
        traces = []
        for rec, n in ((a, 5), (b, 3)):
            for _ in range(n):
                t = rec.request_started(EP)
                t.dispatched()
                traces.append(t)
        for m in (m1, m2):
            for i in range(3):
                m.engine_started(f"{m.source_id}-{i}", 1)
        await _flush(m1, m2, a, b)
        s = actor.stats()
        assert (s["current_queue_size"], s["running_requests"], s["available_slots"]) == (2, 6, 0)
        assert s["model_replicas"] == 2 and s["peak_queue_size"] == 2
        mj = actor.metrics_json()
        assert mj["num_waiting_requests"] == 2 and mj["num_running_requests"] == 6

        # model-2 dies (no more heartbeats): its running and capacity expire after the TTL.
        clock.advance(6)
        await _flush(m1, a, b)
        s = actor.stats()
        assert s["model_replicas"] == 1 and s["running_requests"] == 3
        assert s["current_queue_size"] == 5 and s["available_slots"] == 0
        assert s["peak_queue_size"] == 5
        fams = _families(actor.prometheus_text())
        assert _sample(fams, "llm_requests_waiting", "llm_requests_waiting") == 5
        assert _sample(fams, "llm_model_replicas", "llm_model_replicas") == 1

        # ingress-b dies too: its 3 dispatched requests no longer count.
        clock.advance(6)
        await _flush(m1, a)
        s = actor.stats()
        assert s["current_queue_size"] == 2 and s["running_requests"] == 3
        # ...but its counters are kept: totals never go backwards.
        assert s["total_requests"] == 8

        # everything finishes on the live replicas
        for t in traces[:5]:
            t.finished(200)
        await _flush(a)
        s = actor.stats()
        assert s["current_queue_size"] == 0 and s["running_requests"] == 0  # idle ingress bounds stale gauge

        # an unhealthy replica is no replica
        m1.set_healthy(False)
        await _flush(m1)
        assert actor.stats()["model_replicas"] == 0 and actor.stats()["available_slots"] == 0

    asyncio.run(go())


def test_peak_uses_each_ingress_peak_between_flushes(clock):
    actor = _actor(clock)
    a = StatsRecorder("ingress", sink=actor, source_id="a")
    m = StatsRecorder("model", sink=actor, source_id="m", capacity=3)

    async def go():
        await _flush(m)
        burst = [a.request_started(EP) for _ in range(7)]
        for t in burst:
            t.dispatched()
        for t in burst:  # all finished before the next flush
            t.finished(200)
        await _flush(a)
        s = actor.stats()
        assert s["current_queue_size"] == 0 and s["peak_queue_size"] == 4  # 7 dispatched - 3 slots

    asyncio.run(go())


def test_exactly_once_over_failed_and_repeated_pushes(clock):
    actor = _actor(clock)

    class Flaky:
        fail = True

        def configure(self, settings):
            return actor.configure(settings)

        def push(self, *args):
            if self.fail:
                raise ConnectionError("actor restarting")
            return actor.push(*args)

    sink = Flaky()
    rec = StatsRecorder("ingress", sink=sink, source_id="s")

    async def go():
        for i in range(3):
            t = rec.request_started(EP, request_id=f"x{i}")
            clock.advance(0.1)
            t.finished(200)
        assert not await rec.flush()  # lost: nothing acknowledged, all kept
        sink.fail = False
        assert await rec.flush()
        payload, _ = rec._payload()
        assert payload["events"] == []  # acknowledged events are dropped
        actor.push("s", "ingress", {**payload, "events": []})
        # a duplicate delivery of old events (retry after a lost ack) is ignored
        actor.push(
            "s",
            "ingress",
            {
                "counters": payload["counters"],
                "gauges": payload["gauges"],
                "events": [(1, "req", {"rid": "x0", "status": 200, "arrival": 0, "end": 1, "endpoint": EP})],
            },
        )

    asyncio.run(go())
    fams = _families(actor.prometheus_text())
    assert _sample(fams, "llm_requests", "llm_requests_total", endpoint=EP, status="200") == 3
    assert _sample(fams, "llm_e2e_request_latency_seconds", "llm_e2e_request_latency_seconds_count") == 3
    assert actor.stats()["total_requests"] == 3

    # A restarted actor (state lost) recovers the live source's totals from its next push.
    fresh = _actor(clock)
    sink2 = type("S", (), {"configure": lambda self, s: None, "push": lambda self, *a: fresh.push(*a)})()
    rec._sink = sink2
    assert asyncio.run(rec.flush())
    assert fresh.stats()["total_requests"] == 3 and fresh.stats()["successful_requests"] == 3


def test_join_waits_then_finishes_without_engine_record(clock):
    actor = _actor(clock, join_ttl_s=3)
    rec = StatsRecorder("ingress", sink=actor, source_id="i")

    async def go():
        t = rec.request_started(EP, request_id="lonely")
        t.dispatched()
        clock.advance(0.5)
        t.finished(504, "timeout")
        await _flush(rec)
        text = actor.prometheus_text()
        assert (
            _sample(_families(text), "llm_e2e_request_latency_seconds", "llm_e2e_request_latency_seconds_count") == 0
        )  # still waiting for a partner
        clock.advance(4)
        fams = _families(actor.prometheus_text())
        assert _sample(fams, "llm_queue_time_seconds", "llm_queue_time_seconds_count") == 0
        assert _sample(fams, "llm_rejections", "llm_rejections_total", reason="timeout") == 1

    asyncio.run(go())


def _nonstream_request(clock, engine_outputs, after_engine_s: float = 0.0):
    """One non-streaming request: dispatched on arrival, its engine request starts 0.1 s later
    and `engine_outputs(trace)` reports the tokens; the model replica's record is flushed
    before the ingress's. Returns (stats actor, model recorder)."""
    actor = _actor(clock)
    ing = StatsRecorder("ingress", sink=actor, source_id="i")
    mod = StatsRecorder("model", sink=actor, source_id="m", capacity=1)

    async def go():
        t = ing.request_started(EP, request_id="r", stream=False)
        t.dispatched()
        clock.advance(0.1)
        with mod.engine_request("r", 3) as e:
            engine_outputs(e)
        await _flush(mod)
        clock.advance(after_engine_s)
        t.finished(200)
        await _flush(ing)

    asyncio.run(go())
    return actor, mod


def test_engine_record_first_then_ingress_and_nonstream_ttft(clock):
    """The model replica's record may arrive first; non-streaming TTFT comes from the engine's
    first output."""

    def outputs(e):
        clock.advance(0.2)
        e.output(1)
        clock.advance(0.1)
        e.output(2)

    actor, _ = _nonstream_request(clock, outputs, after_engine_s=0.05)
    m = actor.metrics_json()
    assert m["slo"]["ttft_p50"] == pytest.approx(0.3)
    assert m["slo"]["decoding_throughput_p50"] == pytest.approx(20.0)  # 2 tokens in 0.1 s
    fams = _families(actor.prometheus_text())
    assert _sample(fams, "llm_serving_overhead_seconds", "llm_serving_overhead_seconds_sum") == pytest.approx(0.15)


def test_nonstream_final_only_output_keeps_ttft_and_itl(clock):
    """A non-streaming request's engine sends one final output; the engine's own timings
    (first-token latency, decode time) give TTFT and the mean gap between tokens."""

    def outputs(e):
        clock.advance(0.3)
        e.completed(5, first_token_s=0.2, decode_s=0.1)

    actor, mod = _nonstream_request(clock, outputs)

    async def untimed():
        with mod.engine_request("untimed", 3) as e:
            e.completed(2, first_token_s=None, decode_s=None)
        await _flush(mod)

    asyncio.run(untimed())
    m = actor.metrics_json()
    assert m["slo"]["ttft_p50"] == pytest.approx(0.3)  # 0.1 before the engine + 0.2
    fams = _families(actor.prometheus_text())
    assert _sample(fams, "llm_inter_token_latency_seconds", "llm_inter_token_latency_seconds_count") == 4
    assert _sample(fams, "llm_inter_token_latency_seconds", "llm_inter_token_latency_seconds_sum") == pytest.approx(0.1)
    assert _sample(fams, "llm_generation_tokens", "llm_generation_tokens_total") == 7


def test_percentile_window_and_bound(clock):
    actor = _actor(clock, window_s=60, max_samples=4)
    ing = StatsRecorder("ingress", sink=actor, source_id="i")

    async def go():
        for i in range(6):
            t = ing.request_started(EP, request_id=f"w{i}", stream=True)
            clock.advance(0.1 * (i + 1))
            t.chunk(1)
            t.finished(200)
        await _flush(ing)
        slo = actor.metrics_json()["slo"]
        assert slo["sample_size"] == 4  # bounded
        assert slo["ttft_p50"] == pytest.approx(0.45)  # of 0.3..0.6
        clock.advance(61)
        slo = actor.metrics_json()["slo"]
        assert slo["sample_size"] == 0 and slo["ttft_p50"] is None and slo["ttft_mean"] is None

    asyncio.run(go())


def test_engine_request_context_marks_outcomes(clock):
    actor = _actor(clock)
    mod = StatsRecorder("model", sink=actor, source_id="m", capacity=3)

    async def go():
        with pytest.raises(asyncio.CancelledError):
            with mod.engine_request("a", 2) as e:
                e.output(1)
                raise asyncio.CancelledError()
        with pytest.raises(ValueError):
            with mod.engine_request("b", 2):
                raise ValueError("bad")
        with mod.engine_request("c", 2) as e:
            e.output(5)
        assert mod._running == 0
        await _flush(mod)

    asyncio.run(go())
    assert {k[1][0]: v for k, v in mod._counters.items() if k[0] == "engine_requests"} == {
        "aborted": 1,
        "error": 1,
        "ok": 1,
    }
    assert actor.metrics_json()["total_tokens_generated"] == 6


def test_trace_finish_is_idempotent_and_maps_exceptions(clock):
    rec = StatsRecorder("ingress", sink=_actor(clock), source_id="i")
    t = rec.request_started(EP)
    t.failed(TimeoutError())
    t.finished(200)  # ignored
    rec.request_started(EP).failed(asyncio.CancelledError())
    from deployments.api.errors import APIError

    rec.request_started(EP).failed(APIError(400, "bad", code="invalid_value"))
    rec.request_started(EP).failed(RuntimeError("boom"))
    statuses = sorted(k[1][1] for k in rec._counters if k[0] == "requests")
    assert statuses == ["400", "499", "500", "504"]
    assert rec._inflight == 0


def test_rejection_reasons():
    assert rejection_reason(200) is None
    assert rejection_reason(503, "queue_full") == "queue_full"
    assert rejection_reason(429) == "rate_limited"
    assert rejection_reason(401) == "unauthorized"
    assert rejection_reason(400, "invalid_value") == "invalid"
    assert rejection_reason(404) == "invalid" and rejection_reason(413) == "invalid"
    assert rejection_reason(504) == "timeout" and rejection_reason(408) == "timeout"
    assert rejection_reason(503, "engine_unavailable") == "unavailable"
    assert rejection_reason(500) is None and rejection_reason(499) is None


def test_slow_sink_never_blocks_recording(clock):
    """A push that hangs only delays figures: recording stays synchronous, the flush times out
    and keeps its events for the next try."""
    actor = _actor(clock)

    class Hanging:
        def configure(self, settings):
            return None

        def push(self, *args):
            return asyncio.get_running_loop().create_future()  # never resolves

    rec = StatsRecorder("ingress", sink=Hanging(), source_id="h", push_timeout_s=0.2)

    async def go():
        flushing = asyncio.ensure_future(rec.flush())
        await asyncio.sleep(0)
        for i in range(100):  # recording while a flush is stuck
            rec.request_started(EP, request_id=f"h{i}").finished(200)
        assert await flushing is False
        rec._sink = type("S", (), {"configure": lambda s, x: None, "push": lambda s, *a: actor.push(*a)})()
        assert await rec.flush()

    asyncio.run(go())
    assert actor.stats()["total_requests"] == 100


def test_config_fields_documented():
    assert all(f.description for f in ObservabilityConfig.model_fields.values())
    with pytest.raises(ValueError):
        ObservabilityConfig(flush_interval_s=0)


# --------------------------------------------------------------------------- the real actor


def test_named_actor_with_background_flush(ray_local):
    """Recorders get-or-create the named actor and flush on their own every interval; two
    ingress and one model recorder, as in a two-ingress deployment."""
    import ray

    name = f"stats-test-{uuid.uuid4().hex[:8]}"
    cfg = ObservabilityConfig(actor_name=name, flush_interval_s=0.2, ray_metrics=True)

    async def go():
        ing = [StatsRecorder.from_config(cfg, role="ingress") for _ in range(2)]
        mod = StatsRecorder.from_config(cfg, role="model", capacity=3)
        await asyncio.gather(*(r.ready() for r in (*ing, mod)))  # at replica start
        mod.start()
        for i in range(4):
            t = ing[i % 2].request_started(EP, request_id=f"n{i}", stream=True)
            t.tokenized(3)
            t.dispatched()
            with mod.engine_request(f"n{i}", 3) as e:
                await asyncio.sleep(0.01)
                e.output(1)
                t.chunk(1)
                await asyncio.sleep(0.01)
                e.output(1)
                t.chunk(1)
            t.finished(200, completion_tokens=2)
        ing[0].record_rejection(EP, 429)
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # no explicit flush: the background tasks push
            stats = await ing[1].stats()
            if stats["total_requests"] == 5 and stats["successful_requests"] == 4 and stats["model_replicas"] == 1:
                break
            assert asyncio.get_running_loop().time() < deadline, stats
            await asyncio.sleep(0.2)
        metrics = await mod.metrics_json()
        text = await ing[0].prometheus_text()
        snap = await ing[0].snapshot()
        for r in (*ing, mod):
            await r.aclose()
        return stats, metrics, text, snap

    try:
        stats, metrics, text, snap = asyncio.run(go())
    finally:
        from deployments.actors import kill_actor

        kill_actor(name)
    assert stats["failed_requests"] == 1 and stats["rejections"]["rate_limited"] == 1
    assert stats["available_slots"] == 3
    assert metrics["total_tokens_generated"] == 8
    fams = _families(text)
    assert _sample(fams, "llm_requests", "llm_requests_total", endpoint=EP, status="200") == 4
    assert "llm_time_to_first_token_seconds" in fams
    assert len([s for s in snap["sources"].values() if s["role"] == "ingress"]) == 2
    assert name not in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
