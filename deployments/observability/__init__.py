"""Cluster-wide request statistics and metrics: `/stats`, `/metrics`, `/metrics/prometheus`
and the same families in Ray's own metrics export.

Shape
-----
Every ingress and model replica holds a :class:`StatsRecorder`. Recording is in-process and
synchronous (a few dict/list operations, no I/O); a background asyncio task flushes the buffer
every ``flush_interval_s`` to one named Ray actor, :class:`ServiceStatsActor` (get-or-create,
see ``deployments/actors.py``). The flush never blocks the request path: it runs on its own
task, and a slow or restarting actor only delays figures.

Exactly-once over an unreliable push:

* counters are sent **cumulative** per source (the actor keeps each source's latest values and
  sums them), so a lost or repeated push cannot skew a total, and a restarted actor recovers
  every live source's totals on its next push;
* per-request records are **events** with a per-source sequence number; the actor
  acknowledges the highest it applied and ignores repeats; the recorder drops acknowledged
  events and resends the rest;
* gauges (in flight, dispatched, running, capacity) are per source with a TTL
  (``gauge_ttl_s``): a dead replica's contribution expires, and a live idle replica refreshes
  it on every flush (heartbeat).

Definitions (cluster-wide)
--------------------------
* dispatched = requests an ingress has sent to the model deployment and not finished;
  running = engine requests started on a model replica and not finished (each model replica
  reports its own); capacity = Σ healthy model replicas' ``max_ongoing_requests``.
* waiting (``num_waiting_requests``, ``current_queue_size``, ``llm_requests_waiting``) =
  max(0, dispatched − max(running, capacity)): sent but not started. Serve never starts more
  than ``max_ongoing_requests`` on a replica, so the capacity term removes the lag between an
  ingress's and a replica's flushes. ``peak_queue_size`` is the highest waiting seen, using
  each ingress's own peak since its previous flush.
* ``available_slots`` = max(0, capacity − running).
* TTFT = first token − arrival at the ingress. Streaming: when the ingress received the
  first chunk carrying tokens; non-streaming: the engine's first output (model replica
  clock). Inter-token latency: per token, from the chunks the ingress streams (or the engine
  outputs for non-streaming requests); a chunk of k tokens after a gap g counts k × g/k.
* engine time = engine request start → end on the model replica; serving overhead =
  end-to-end − engine time (everything that is not the engine: HTTP, validation,
  tokenization, Serve routing/queueing, transport); queue time = engine start − dispatch at
  the ingress. These three join the ingress's and the replica's record of a request by its
  request id inside the actor (waiting up to ``join_ttl_s`` for the partner record).
  Times crossing processes use wall clocks (``time.time()``); across nodes they carry the
  nodes' clock offset (NTP: milliseconds), clamped at 0.
* decoding throughput of a request = (generated tokens − 1) / (last token − first token),
  engine side; ``total_throughput`` = generated tokens of the requests in the window divided
  by the span from the earliest start to the latest end among them.
* SLO percentiles are over the requests finished in the last ``window_s`` seconds (at most
  ``max_samples``); ``sample_size`` says how many; null when there are none. Times in seconds.

Integration API
---------------
Ingress replica (``role="ingress"``)::

    rec = StatsRecorder.from_config(cfg.observability, role="ingress", app_name=app)  # __init__
    t = rec.request_started("/v1/chat/completions", request_id=rid, stream=body.stream)
    ...                                   # auth, rate limit, validation
    enc = await tokenizer...; t.tokenized(len(enc.token_ids))   # tokenize time since start
    t.dispatched()                        # right before model.generate(_stream).remote(...)
    t.chunk(chunk.num_tokens)             # each chunk received from the model (stream);
                                          # the first chunk with tokens sets TTFT
    t.finished(200, completion_tokens=n)  # or t.finished(exc.status, exc.code) — once; later
                                          # calls are ignored. A client that went away: 499.
    rec.record_rejection(endpoint, 400, "invalid_json")   # errors before a trace exists

Model replica (``role="model"``, ``capacity=max_ongoing_requests``)::

    rec = StatsRecorder.from_config(cfg.observability, role="model", app_name=app, capacity=3)
    rec.start()                                    # in async __init__: heartbeats while idle
    with rec.engine_request(req.request_id, len(req.prompt_token_ids)) as e:
        async for out in engine.generate(...):
            e.output(len(out.outputs[0].token_ids))
    # an exception or cancellation inside the block marks it failed/aborted; finished anyway
    rec.set_healthy(False)                         # when the engine is found dead

Both: ``await rec.aclose()`` on shutdown flushes what is left. Queries (ingress endpoints)::

    await rec.stats()  /  await rec.metrics_json()  /  await rec.prometheus_text()

(``PROMETHEUS_CONTENT_TYPE`` is the media type for the text.)

Ray metrics mirror
------------------
The actor also records every family through ``ray.util.metrics`` (one emitter, the
cluster-wide numbers), so Prometheus scraping Ray's metrics port (KubeRay) sees them with
Ray's ``ray_`` prefix: ``ray_llm_requests_total``, ``ray_llm_rejections_total``,
``ray_llm_prompt_tokens_total``, ``ray_llm_generation_tokens_total``,
``ray_llm_requests_waiting``, ``ray_llm_requests_running``, ``ray_llm_model_replicas``,
``ray_llm_available_slots``, ``ray_llm_time_to_first_token_seconds_bucket|_sum|_count`` and
likewise ``ray_llm_inter_token_latency_seconds``, ``ray_llm_e2e_request_latency_seconds``,
``ray_llm_queue_time_seconds``, ``ray_llm_tokenize_time_seconds``,
``ray_llm_engine_time_seconds``, ``ray_llm_serving_overhead_seconds`` (plus Ray's own labels:
SessionName, NodeAddress, WorkerId, ...). ``monitoring/prometheus.yml`` shows a relabelling
that strips the prefix so the alert rules and the dashboard work on either source.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any, Iterator, Mapping

from pydantic import BaseModel, ConfigDict, Field

from deployments.actors import DEFAULT_NAMESPACE, actor_failure_types, get_or_create_actor

logger = logging.getLogger("ray.serve")

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REJECTION_REASONS = ("queue_full", "rate_limited", "invalid", "timeout", "unauthorized", "unavailable")

# Histogram buckets (seconds). TTFT has 0.5 (the user's target) and 2 (the alert threshold).
BUCKETS: dict[str, tuple[float, ...]] = {
    "ttft": (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0),
    "itl": (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5),
    "e2e": (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0),
    "queue": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    "tokenize": (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    "engine": (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0),
    "overhead": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
}
HISTOGRAMS: dict[str, tuple[str, str]] = {
    "ttft": ("llm_time_to_first_token_seconds", "Time from arrival at the ingress to the first generated token."),
    "itl": ("llm_inter_token_latency_seconds", "Time between consecutive generated tokens, per token."),
    "e2e": ("llm_e2e_request_latency_seconds", "Arrival at the ingress to the end of the response."),
    "queue": ("llm_queue_time_seconds", "Dispatch to the model deployment to the engine request's start."),
    "tokenize": ("llm_tokenize_time_seconds", "Time spent tokenizing the prompt (tokenizer deployment call)."),
    "engine": ("llm_engine_time_seconds", "Engine request start to end on the model replica."),
    "overhead": ("llm_serving_overhead_seconds",
                 "End-to-end latency minus engine time: HTTP, validation, tokenization, routing, queueing, transport."),
}


class ObservabilityConfig(BaseModel):
    """Cluster-wide statistics (`/stats`, `/metrics`, `/metrics/prometheus`, Ray metrics)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Record statistics. false: the endpoints report zeros and nothing is pushed.")
    flush_interval_s: float = Field(1.0, gt=0, le=60, description="How often each replica pushes its buffer to the stats actor.")
    window_s: float = Field(300.0, gt=0, description="SLO percentiles cover requests finished in the last `window_s` seconds.")
    max_samples: int = Field(10_000, gt=0, description="At most this many recent requests in the SLO window.")
    gauge_ttl_s: float = Field(
        10.0, gt=0, description="A replica silent for this long no longer counts in waiting/running/replicas (it died)."
    )
    join_ttl_s: float = Field(
        10.0, gt=0, description="How long the actor waits for the model replica's record of a request "
        "(queue time, engine time, overhead) before finishing it without."
    )
    ray_metrics: bool = Field(True, description="Mirror every family into Ray's metrics export (`ray_llm_*`).")
    actor_name: str | None = Field(None, description="Name of the stats actor; default `service_stats.<app name>`.")
    namespace: str = Field(DEFAULT_NAMESPACE, description="Ray namespace of the stats actor.")

    def actor_settings(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "max_samples": self.max_samples, "gauge_ttl_s": self.gauge_ttl_s,
                "join_ttl_s": self.join_ttl_s}


def rejection_reason(status: int, code: str | int | None = None) -> str | None:
    """Reason label of an unsuccessful request (None: not a rejection, e.g. 2xx, 500, 499)."""
    if status < 400:
        return None
    if code == "queue_full":
        return "queue_full"
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "unauthorized"
    if status in (408, 504) or code == "timeout":
        return "timeout"
    if status == 499:
        return None  # client went away: counted in llm_requests_total{status="499"} only
    if status == 503:
        return "unavailable"
    if status < 500:
        return "invalid"
    return None


# =========================================================================== recorder side


class RequestTrace:
    """One request as the ingress sees it. Created by `StatsRecorder.request_started`."""

    __slots__ = ("_rec", "endpoint", "request_id", "stream", "_wall0", "_m0", "_tok_m", "tokenize_s",
                 "prompt_tokens", "_dispatch_m", "_first_m", "_last_m", "tokens", "_itl", "done")

    def __init__(self, rec: "StatsRecorder", endpoint: str, request_id: str | None, stream: bool):
        self._rec = rec
        self.endpoint = endpoint
        self.request_id = request_id
        self.stream = stream
        self._wall0 = time.time()
        self._m0 = time.perf_counter()
        self._tok_m: float | None = None
        self.tokenize_s: float | None = None
        self.prompt_tokens: int | None = None
        self._dispatch_m: float | None = None
        self._first_m: float | None = None
        self._last_m: float | None = None
        self.tokens = 0
        self._itl: list[tuple[float, int]] = []
        self.done = False

    def _wall(self, m: float | None) -> float | None:
        return None if m is None else self._wall0 + (m - self._m0)

    def tokenize_started(self) -> None:
        """Optional: mark the start of tokenization (default: the request's arrival)."""
        self._tok_m = time.perf_counter()

    def tokenized(self, prompt_tokens: int | None = None) -> None:
        """The tokenizer answered: records tokenize time (since `tokenize_started` or arrival)."""
        self.tokenize_s = time.perf_counter() - (self._tok_m or self._m0)
        self.prompt_tokens = prompt_tokens

    def dispatched(self) -> None:
        """About to call the model deployment: the request counts as waiting until a model
        replica starts it."""
        if self._dispatch_m is None and not self.done:
            self._dispatch_m = time.perf_counter()
            self._rec._dispatch(+1)

    def chunk(self, num_tokens: int) -> None:
        """A chunk of `num_tokens` generated tokens arrived from the model (streaming)."""
        if num_tokens <= 0 or self.done:
            return
        now = time.perf_counter()
        if self._first_m is None:
            # A coalesced first chunk: the gaps between its tokens are unknown; none observed.
            self._first_m = now
        elif len(self._itl) < _MAX_ITL_PAIRS:
            self._itl.append(((now - self._last_m) / num_tokens, num_tokens))  # type: ignore[operator]
        self._last_m = now
        self.tokens += num_tokens

    def first_token(self) -> None:
        """Explicit first-token mark (only needed when chunks are not reported)."""
        if self._first_m is None:
            self._first_m = self._last_m = time.perf_counter()

    def finished(self, status: int = 200, code: str | int | None = None,
                 completion_tokens: int | None = None, reason: str | None = None) -> None:
        """The request ended with HTTP `status` (for a stream that failed mid-way: the status
        of the error it carried). Idempotent: only the first call counts."""
        if self.done:
            return
        self.done = True
        end = time.perf_counter()
        self._rec._request_finished(self, int(status), code, reason, end, completion_tokens)

    def failed(self, exc: BaseException) -> None:
        """`finished` for an exception: APIError-like objects give their status/code, a
        timeout 504, a cancellation 499, anything else 500."""
        status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
        if isinstance(status, int):
            self.finished(status, getattr(exc, "code", None))
        elif isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            self.finished(504, "timeout")
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.finished(499, "client_closed")
        else:
            self.finished(500, "internal_error")

    def __enter__(self) -> "RequestTrace":
        return self

    def __exit__(self, et, exc, tb) -> None:
        if exc is not None:
            self.failed(exc)
        else:
            self.finished(200)


class EngineTrace:
    """One engine request on a model replica. Created by `StatsRecorder.engine_started`."""

    __slots__ = ("_rec", "request_id", "prompt_tokens", "_wall0", "_m0", "_first_m", "_last_m",
                 "tokens", "_itl", "done")

    def __init__(self, rec: "StatsRecorder", request_id: str | None, prompt_tokens: int):
        self._rec = rec
        self.request_id = request_id
        self.prompt_tokens = int(prompt_tokens or 0)
        self._wall0 = time.time()
        self._m0 = time.perf_counter()
        self._first_m: float | None = None
        self._last_m: float | None = None
        self.tokens = 0
        self._itl: list[tuple[float, int]] = []
        self.done = False

    def output(self, num_tokens: int) -> None:
        """The engine produced `num_tokens` new tokens (one `RequestOutput` delta)."""
        if num_tokens <= 0 or self.done:
            return
        now = time.perf_counter()
        if self._first_m is None:
            self._first_m = now
        elif len(self._itl) < _MAX_ITL_PAIRS:
            self._itl.append(((now - self._last_m) / num_tokens, num_tokens))  # type: ignore[operator]
        self._last_m = now
        self.tokens += num_tokens
        self._rec._count("generation_tokens", (), num_tokens)

    def completed(self, num_tokens: int, first_token_s: float | None, decode_s: float | None) -> None:
        """The whole output at once (a non-streaming request, whose engine sends no per-step
        outputs): its first token `first_token_s` after the start and `decode_s` from the first
        to the last token, as the engine timed them (vLLM's `RequestOutput.metrics`); the gaps
        between tokens count as their mean. Without timings the first token counts at the end."""
        if num_tokens <= 0 or self.done:
            return
        now = time.perf_counter()
        self._first_m = now if first_token_s is None else min(now, self._m0 + max(0.0, first_token_s))
        self._last_m = now
        if num_tokens > 1 and decode_s is not None and decode_s > 0:
            self._itl.append((decode_s / (num_tokens - 1), num_tokens - 1))
        self.tokens += num_tokens
        self._rec._count("generation_tokens", (), num_tokens)

    def finished(self, outcome: str = "ok") -> None:
        """`outcome`: ok, aborted (cancelled: client gone, deadline) or error. Idempotent."""
        if self.done:
            return
        self.done = True
        self._rec._engine_finished(self, outcome, time.perf_counter())


_MAX_ITL_PAIRS = 4096
_MAX_EVENTS = 50_000
_MAX_ENDPOINTS = 16


class StatsRecorder:
    """Per-process buffer of observations, flushed to the shared :class:`ServiceStatsActor`.

    `sink`: tests may pass the actor instance itself (or any object with `push`) instead of
    letting the recorder get-or-create the named actor.
    """

    def __init__(self, role: str, *, app_name: str = "llm", actor_name: str | None = None,
                 namespace: str = DEFAULT_NAMESPACE, source_id: str | None = None,
                 flush_interval_s: float = 1.0, capacity: int = 0, enabled: bool = True,
                 actor_settings: Mapping[str, Any] | None = None, ray_metrics: bool = True,
                 sink: Any = None, push_timeout_s: float = 10.0, pin_to_head: bool = True):
        if role not in ("ingress", "model"):
            raise ValueError(f"role must be 'ingress' or 'model', got {role!r}")
        self.role = role
        self.enabled = enabled
        self.actor_name = actor_name or f"service_stats.{app_name}"
        self.namespace = namespace
        self.source_id = source_id or _default_source_id(role)
        self.flush_interval_s = flush_interval_s
        self.push_timeout_s = push_timeout_s
        self.pin_to_head = pin_to_head
        self.actor_settings = dict(actor_settings or {})
        self.actor_settings.setdefault("ray_metrics", ray_metrics)
        self._sink = sink
        self._handle = None
        self._configured = False
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = {}
        self._events: deque[tuple[int, str, dict[str, Any]]] = deque()
        self._seq = 0
        self._dropped_events = 0
        self._inflight = 0
        self._dispatched = 0
        self._dispatched_peak = 0
        self._running = 0
        self._capacity = int(capacity)
        self._healthy = True
        self._task: asyncio.Task | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._closed = False
        self._last_warning = 0.0
        self._endpoints: set[str] = set()

    @classmethod
    def from_config(cls, cfg: ObservabilityConfig | Mapping[str, Any] | None, role: str,
                    app_name: str = "llm", capacity: int = 0, **kwargs: Any) -> "StatsRecorder":
        cfg = ObservabilityConfig.model_validate(cfg or {})
        return cls(role, app_name=app_name, actor_name=cfg.actor_name, namespace=cfg.namespace,
                   flush_interval_s=cfg.flush_interval_s, capacity=capacity, enabled=cfg.enabled,
                   actor_settings=cfg.actor_settings(), ray_metrics=cfg.ray_metrics, **kwargs)

    # ------------------------------------------------------------------ ingress API

    def request_started(self, endpoint: str, request_id: str | None = None, stream: bool = False) -> RequestTrace:
        """A request arrived at an OpenAI endpoint (counts in `total_requests` right away)."""
        self._ensure_task()
        if endpoint not in self._endpoints:  # bounded label set: never one series per URL
            if len(self._endpoints) >= _MAX_ENDPOINTS:
                endpoint = "other"
            else:
                self._endpoints.add(endpoint)
        trace = RequestTrace(self, endpoint, request_id, stream)
        with self._lock:
            self._inflight += 1
            self._add(("requests_started", (endpoint,)), 1)
        return trace

    def record_rejection(self, endpoint: str, status: int, code: str | int | None = None,
                         request_id: str | None = None, reason: str | None = None) -> None:
        """A request refused before a trace existed (body validation, 404 model, …)."""
        self.request_started(endpoint, request_id).finished(status, code, reason=reason)

    # ------------------------------------------------------------------ model API

    def engine_started(self, request_id: str | None, prompt_tokens: int = 0) -> EngineTrace:
        """An engine request starts on this model replica (counts as running)."""
        self._ensure_task()
        trace = EngineTrace(self, request_id, prompt_tokens)
        with self._lock:
            self._running += 1
            self._add(("prompt_tokens", ()), trace.prompt_tokens)
        return trace

    @contextlib.contextmanager
    def engine_request(self, request_id: str | None, prompt_tokens: int = 0) -> Iterator[EngineTrace]:
        """`with rec.engine_request(rid, n) as e: ... e.output(k)` — finished on exit: ok,
        aborted (cancellation, GeneratorExit) or error (any other exception)."""
        trace = self.engine_started(request_id, prompt_tokens)
        try:
            yield trace
        except (asyncio.CancelledError, GeneratorExit):
            trace.finished("aborted")
            raise
        except BaseException:
            trace.finished("error")
            raise
        else:
            trace.finished("ok")

    def set_capacity(self, capacity: int) -> None:
        """This model replica's `max_ongoing_requests` (its share of `available_slots`)."""
        self._capacity = int(capacity)

    def set_healthy(self, healthy: bool) -> None:
        """An unhealthy model replica does not count as a replica nor add capacity."""
        self._healthy = bool(healthy)

    # ------------------------------------------------------------------ internals (trace callbacks)

    def _add(self, key: tuple[str, tuple], value: float) -> None:
        self._counters[key] = self._counters.get(key, 0) + value

    def _count(self, name: str, labels: tuple, value: float) -> None:
        with self._lock:
            self._add((name, labels), value)

    def _dispatch(self, delta: int) -> None:
        with self._lock:
            self._dispatched += delta
            if self._dispatched > self._dispatched_peak:
                self._dispatched_peak = self._dispatched

    def _event(self, kind: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._seq += 1
        self._events.append((self._seq, kind, record))
        if len(self._events) > _MAX_EVENTS:
            self._events.popleft()
            self._dropped_events += 1

    def _request_finished(self, t: RequestTrace, status: int, code, reason, end_m: float,
                          completion_tokens: int | None) -> None:
        reason = reason or rejection_reason(status, code)
        with self._lock:
            self._inflight -= 1
            if t._dispatch_m is not None:
                self._dispatched -= 1
            self._add(("requests", (t.endpoint, str(status))), 1)
            if reason:
                self._add(("rejections", (reason,)), 1)
            self._event("req", {
                "rid": t.request_id, "endpoint": t.endpoint, "stream": t.stream, "status": status,
                "reason": reason, "arrival": t._wall0, "end": t._wall(end_m),
                "tokenize_s": t.tokenize_s, "prompt_tokens": t.prompt_tokens,
                "dispatched": t._wall(t._dispatch_m), "first": t._wall(t._first_m), "last": t._wall(t._last_m),
                "tokens": completion_tokens if completion_tokens is not None else t.tokens, "itl": t._itl,
            })

    def _engine_finished(self, t: EngineTrace, outcome: str, end_m: float) -> None:
        with self._lock:
            self._running -= 1
            self._add(("engine_requests", (outcome,)), 1)
            self._event("eng", {
                "rid": t.request_id, "start": t._wall0, "end": t._wall0 + (end_m - t._m0),
                "first": None if t._first_m is None else t._wall0 + (t._first_m - t._m0),
                "last": None if t._last_m is None else t._wall0 + (t._last_m - t._m0),
                "tokens": t.tokens, "prompt_tokens": t.prompt_tokens, "itl": t._itl, "outcome": outcome,
            })

    # ------------------------------------------------------------------ flushing

    def _payload(self) -> tuple[dict[str, Any], int]:
        with self._lock:
            gauges = {"inflight": self._inflight, "dispatched": self._dispatched,
                      "dispatched_peak": self._dispatched_peak, "running": self._running,
                      "capacity": self._capacity if self.role == "model" else 0,
                      "healthy": self._healthy}
            self._dispatched_peak = self._dispatched
            payload = {
                "ts": time.time(),
                "counters": [(name, labels, value) for (name, labels), value in self._counters.items()],
                "gauges": gauges,
                "events": list(self._events),
                "dropped_events": self._dropped_events,
            }
            return payload, self._seq

    def _ack(self, acked: int) -> None:
        with self._lock:
            while self._events and self._events[0][0] <= acked:
                self._events.popleft()

    def _sink_call(self, method: str, *args: Any):
        """Call `method` on the sink: a Ray actor handle (→ ObjectRef) or a plain object."""
        sink = self._sink if self._sink is not None else self._handle
        remote = getattr(getattr(sink, method), "remote", None)
        return remote(*args) if remote is not None else getattr(sink, method)(*args)

    async def _resolve(self, timeout_s: float | None = None) -> None:
        if self._sink is None and self._handle is None:
            self._handle = await asyncio.to_thread(
                get_or_create_actor, ServiceStatsActor, self.actor_name, self.namespace,
                pin_to_head=self.pin_to_head, **self.actor_settings)
            self._configured = False
        if not self._configured:
            # The first call also waits for a new actor's process to start.
            await _maybe_await(self._sink_call("configure", self.actor_settings),
                               timeout_s or max(self.push_timeout_s, 30.0))
            self._configured = True

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Get-or-create the stats actor and wait until it answers (call once at replica start
        so the first flushes and queries do not wait for the actor's process)."""
        await asyncio.wait_for(self._resolve(timeout_s), timeout_s)

    async def flush(self) -> bool:
        """Push everything recorded so far; True when the actor acknowledged it."""
        if not self.enabled:
            return True
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:
            payload, seq = self._payload()
            try:
                await self._resolve()
                acked = await _maybe_await(self._sink_call("push", self.source_id, self.role, payload),
                                           self.push_timeout_s)
            except (asyncio.TimeoutError, TimeoutError) as exc:
                self._warn(exc)
                return False
            except Exception as exc:  # actor died/unreachable: re-resolve next time, keep the buffer
                if isinstance(exc, actor_failure_types()) or self._sink is None:
                    self._handle, self._configured = None, False
                self._warn(exc)
                return False
            self._ack(min(int(acked), seq))
            return True

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            logger.warning("stats push from %s failed (%s: %s); will retry", self.source_id,
                           type(exc).__name__, exc)

    async def _run(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the flusher die
                self._warn(exc)

    def _ensure_task(self) -> None:
        if self._task is not None or self._closed or not self.enabled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop here (sync caller): `start()` later, or flush manually
        self._task = loop.create_task(self._run(), name=f"stats-flush-{self.source_id}")

    def start(self) -> None:
        """Start the background flusher on the running loop (also done lazily by the first
        recorded request). Model replicas call it so they heartbeat while idle."""
        self._ensure_task()

    async def aclose(self) -> None:
        """Stop the flusher and push what is left."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.flush()

    # ------------------------------------------------------------------ queries (for endpoints)

    async def _query(self, method: str) -> Any:
        """Raises (TimeoutError, Ray actor errors) when the stats actor cannot answer: map it
        to a 503 in the endpoint. The next call re-resolves the actor."""
        try:
            await self._resolve()
            return await _maybe_await(self._sink_call(method), self.push_timeout_s)
        except Exception:
            if self._sink is None:
                self._handle, self._configured = None, False
            raise

    async def stats(self) -> dict[str, Any]:
        """The /stats body (cluster-wide)."""
        return await self._query("stats")

    async def metrics_json(self) -> dict[str, Any]:
        """The /metrics JSON body (cluster-wide)."""
        return await self._query("metrics_json")

    async def prometheus_text(self) -> str:
        """The /metrics/prometheus body; serve it with `PROMETHEUS_CONTENT_TYPE`."""
        return await self._query("prometheus_text")

    async def snapshot(self) -> dict[str, Any]:
        """stats + metrics + per-source detail, in one actor call."""
        return await self._query("snapshot")


async def _maybe_await(value: Any, timeout: float) -> Any:
    if hasattr(value, "__await__"):
        async def _aw():
            return await value
        return await asyncio.wait_for(_aw(), timeout)
    return value


def _default_source_id(role: str) -> str:
    rid = None
    try:
        serve = sys.modules.get("ray.serve")  # only inside Serve (importing it costs seconds)
        ctx = serve.get_replica_context() if serve is not None else None
        rid = getattr(getattr(ctx, "replica_id", None), "unique_id", None) or getattr(ctx, "replica_tag", None)
    except Exception:
        rid = None
    return f"{role}:{rid or os.getpid()}:{uuid.uuid4().hex[:8]}"


# =========================================================================== actor side


class _Hist:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: above the largest bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, c in zip(self.bounds, self.counts):
            acc += c
            out.append((_fmt_bound(bound), acc))
        out.append(("+Inf", self.count))
        return out


def _fmt_bound(b: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(b)


class _Source:
    __slots__ = ("role", "last_seen", "counters", "gauges", "seq", "first_seen")

    def __init__(self, role: str, now: float):
        self.role = role
        self.first_seen = now
        self.last_seen = now
        self.counters: dict[tuple[str, tuple], float] = {}
        self.gauges: dict[str, Any] = {}
        self.seq = 0


class ServiceStatsActor:
    """Aggregates every replica's observations. Plain class: create it with
    :func:`get_or_create_actor` (named, detached, ``num_cpus=0``); methods run one at a time."""

    def __init__(self, window_s: float = 300.0, max_samples: int = 10_000, gauge_ttl_s: float = 10.0,
                 join_ttl_s: float = 10.0, retire_after_s: float = 3600.0, ray_metrics: bool = True,
                 clock=time.monotonic):
        self._clock = clock
        self._lock = threading.RLock()
        self.window_s = window_s
        self.max_samples = max_samples
        self.gauge_ttl_s = gauge_ttl_s
        self.join_ttl_s = join_ttl_s
        self.retire_after_s = retire_after_s
        self._sources: dict[str, _Source] = {}
        self._retired: dict[tuple[str, tuple], float] = {}
        self._hists = {k: _Hist(BUCKETS[k]) for k in HISTOGRAMS}
        self._pending_req: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self._pending_eng: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self._samples: deque[tuple[float, float | None, float | None, int, float, float]] = deque()
        self._peak_waiting = 0
        self._dropped_events = 0
        self._ray = _RayMirror() if ray_metrics else None
        self._mirrored: dict[tuple[str, tuple], float] = {}
        self._stop = threading.Event()
        if self._ray is not None and self._ray.ok:
            threading.Thread(target=self._refresh_loop, name="stats-gauges", daemon=True).start()

    def configure(self, settings: Mapping[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """Update window/TTL settings (the latest deploy's config wins)."""
        with self._lock:
            for k, v in {**(settings or {}), **kw}.items():
                if k in ("window_s", "max_samples", "gauge_ttl_s", "join_ttl_s", "retire_after_s") and v is not None:
                    setattr(self, k, type(getattr(self, k))(v))
            return {k: getattr(self, k) for k in ("window_s", "max_samples", "gauge_ttl_s", "join_ttl_s")}

    # ------------------------------------------------------------------ ingestion

    def push(self, source: str, role: str, payload: Mapping[str, Any]) -> int:
        """Apply one recorder flush; returns the highest event sequence number applied."""
        with self._lock:
            now = self._clock()
            src = self._sources.get(source)
            if src is None:
                src = self._sources[source] = _Source(role, now)
            src.role = role
            src.last_seen = now
            for name, labels, value in payload.get("counters", ()):
                key = (name, tuple(labels))
                if value >= src.counters.get(key, 0):  # cumulative: never go backwards
                    src.counters[key] = value
            src.gauges = dict(payload.get("gauges", {}))
            for seq, kind, record in payload.get("events", ()):
                if seq <= src.seq:
                    continue
                src.seq = seq
                self._on_event(kind, record, now)
            self._sweep(now)
            self._update_peak(src, now)
            self._mirror(now)
            return src.seq

    def _on_event(self, kind: str, rec: dict[str, Any], now: float) -> None:
        rid = rec.get("rid")
        if kind == "req":
            eng = self._pending_eng.pop(rid, (0, None))[1] if rid else None
            if eng is not None or not rid or rec.get("dispatched") is None or rec.get("reason") == "queue_full":
                self._finalize(rec, eng)
            else:
                self._pending_req[rid] = (now, rec)
        elif kind == "eng":
            req = self._pending_req.pop(rid, (0, None))[1] if rid else None
            if req is not None or not rid:
                self._finalize(req, rec)
            else:
                self._pending_eng[rid] = (now, rec)

    def _sweep(self, now: float) -> None:
        for pending, is_req in ((self._pending_req, True), (self._pending_eng, False)):
            while pending:
                rid, (t, rec) = next(iter(pending.items()))
                if now - t <= self.join_ttl_s and len(pending) <= 100_000:
                    break
                pending.popitem(last=False)
                self._finalize(rec, None) if is_req else self._finalize(None, rec)
        # sources silent for very long: fold their counters into `retired` and forget them
        for sid in [s for s, src in self._sources.items() if now - src.last_seen > self.retire_after_s]:
            for key, value in self._sources.pop(sid).counters.items():
                self._retired[key] = self._retired.get(key, 0) + value

    def _observe(self, name: str, value: float | None, n: int = 1) -> None:
        if value is None or n <= 0 or math.isnan(value):
            return
        value = max(0.0, value)
        self._hists[name].observe(value, n)
        if self._ray is not None:
            self._ray.observe(name, value, n)

    def _finalize(self, req: dict | None, eng: dict | None) -> None:
        ttft = e2e = engine_s = None
        if req is not None:
            self._observe("tokenize", req.get("tokenize_s"))
            latency = eng is not None or 200 <= int(req.get("status", 0)) < 300
            if latency:
                e2e = req["end"] - req["arrival"]
                self._observe("e2e", e2e)
                first = req.get("first")
                if first is None and eng is not None and eng.get("first") is not None:
                    first = eng["first"]
                if first is not None:
                    ttft = max(0.0, first - req["arrival"])
                    self._observe("ttft", ttft)
                itl = req.get("itl") or (eng.get("itl") if eng is not None else None) or ()
                for value, n in itl:
                    self._observe("itl", value, n)
            if eng is not None and req.get("dispatched") is not None:
                self._observe("queue", eng["start"] - req["dispatched"])
        elif eng is not None:
            for value, n in eng.get("itl") or ():
                self._observe("itl", value, n)
        if eng is not None:
            engine_s = eng["end"] - eng["start"]
            self._observe("engine", engine_s)
            if e2e is not None:
                self._observe("overhead", e2e - engine_s)
        # SLO sample
        tps = None
        src_first, src_last, ntok = None, None, 0
        if eng is not None:
            src_first, src_last, ntok = eng.get("first"), eng.get("last"), int(eng.get("tokens") or 0)
        elif req is not None and req.get("stream"):
            src_first, src_last, ntok = req.get("first"), req.get("last"), int(req.get("tokens") or 0)
        if ntok >= 2 and src_first is not None and src_last is not None and src_last > src_first:
            tps = (ntok - 1) / (src_last - src_first)
        if ttft is not None or tps is not None:
            start = req["arrival"] if req is not None else eng["start"]  # type: ignore[index]
            end = req["end"] if req is not None else eng["end"]  # type: ignore[index]
            tokens = ntok if eng is not None else int((req or {}).get("tokens") or 0)
            self._samples.append((time.time(), ttft, tps, tokens, start, end))
            while len(self._samples) > self.max_samples:
                self._samples.popleft()

    # ------------------------------------------------------------------ aggregation

    def _live(self, now: float) -> list[_Source]:
        return [s for s in self._sources.values() if now - s.last_seen <= self.gauge_ttl_s]

    def _gauges(self, now: float) -> dict[str, int]:
        live = self._live(now)
        ingress = [s for s in live if s.role == "ingress"]
        models = [s for s in live if s.role == "model" and s.gauges.get("healthy", True)]
        dispatched = sum(int(s.gauges.get("dispatched", 0)) for s in ingress)
        running = sum(max(0, int(s.gauges.get("running", 0))) for s in live if s.role == "model")
        if ingress:
            running = min(running, max(dispatched, 0))  # an idle ingress bounds a stale replica gauge
        capacity = sum(int(s.gauges.get("capacity", 0)) for s in models)
        waiting = max(0, dispatched - max(running, capacity))
        return {
            "waiting": waiting, "running": running, "dispatched": max(0, dispatched),
            "inflight": sum(max(0, int(s.gauges.get("inflight", 0))) for s in ingress),
            "capacity": capacity, "model_replicas": len(models),
            "available_slots": max(0, capacity - running), "ingress_replicas": len(ingress),
        }

    def _update_peak(self, src: _Source, now: float) -> None:
        g = self._gauges(now)
        peak = g["waiting"]
        if src.role == "ingress":
            extra = int(src.gauges.get("dispatched_peak", 0)) - int(src.gauges.get("dispatched", 0))
            if extra > 0:
                peak = max(peak, g["dispatched"] + extra - max(g["running"], g["capacity"]))
        self._peak_waiting = max(self._peak_waiting, peak)

    def _totals(self) -> dict[tuple[str, tuple], float]:
        out = dict(self._retired)
        for src in self._sources.values():
            for key, value in src.counters.items():
                out[key] = out.get(key, 0) + value
        return out

    @staticmethod
    def _sum(totals: Mapping[tuple[str, tuple], float], name: str, pred=lambda labels: True) -> float:
        return sum(v for (n, labels), v in totals.items() if n == name and pred(labels))

    def _window(self) -> list[tuple]:
        cutoff = time.time() - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()
        return list(self._samples)

    # ------------------------------------------------------------------ queries

    def stats(self) -> dict[str, Any]:
        """The user's /stats fields, cluster-wide."""
        with self._lock:
            now = self._clock()
            self._sweep(now)
            t = self._totals()
            g = self._gauges(now)
            ok = self._sum(t, "requests", lambda lb: lb[1].startswith("2"))
            done = self._sum(t, "requests")
            rejections = {r: int(self._sum(t, "rejections", lambda lb, r=r: lb[0] == r)) for r in REJECTION_REASONS}
            return {
                "total_requests": int(self._sum(t, "requests_started")),
                "successful_requests": int(ok),
                "failed_requests": int(done - ok),
                "queue_full_count": rejections["queue_full"],
                "current_queue_size": g["waiting"],
                "peak_queue_size": max(self._peak_waiting, g["waiting"]),
                "available_slots": g["available_slots"],
                "running_requests": g["running"],
                "in_flight_requests": g["inflight"],
                "model_replicas": g["model_replicas"],
                "ingress_replicas": g["ingress_replicas"],
                "capacity": g["capacity"],
                "rejections": rejections,
            }

    def metrics_json(self) -> dict[str, Any]:
        """The user's /metrics JSON fields, cluster-wide."""
        with self._lock:
            now = self._clock()
            self._sweep(now)
            t = self._totals()
            g = self._gauges(now)
            samples = self._window()
            ttfts = [s[1] for s in samples if s[1] is not None]
            tps = [s[2] for s in samples if s[2] is not None]
            tokens = sum(s[3] for s in samples)
            span = (max(s[5] for s in samples) - min(s[4] for s in samples)) if samples else 0.0
            return {
                "num_waiting_requests": g["waiting"],
                "num_running_requests": g["running"],
                "total_requests": int(self._sum(t, "requests_started")),
                "total_tokens_generated": int(self._sum(t, "generation_tokens")),
                "total_prompt_tokens": int(self._sum(t, "prompt_tokens")),
                "num_model_replicas": g["model_replicas"],
                "available_slots": g["available_slots"],
                "slo": {
                    "ttft_mean": _mean(ttfts),
                    "ttft_p50": _percentile(ttfts, 50),
                    "ttft_p95": _percentile(ttfts, 95),
                    "ttft_p99": _percentile(ttfts, 99),
                    "decoding_throughput_mean": _mean(tps),
                    "decoding_throughput_p50": _percentile(tps, 50),
                    "decoding_throughput_p95": _percentile(tps, 95),
                    "total_throughput": (tokens / span) if span > 0 else None,
                    "sample_size": len(samples),
                    "window_s": self.window_s,
                },
            }

    def families(self) -> list[Any]:
        """The Prometheus metric families (prometheus_client objects)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            now = self._clock()
            self._sweep(now)
            t = self._totals()
            g = self._gauges(now)
            fams: list[Any] = []
            req = CounterMetricFamily("llm_requests", "Requests to the OpenAI endpoints by endpoint and final HTTP status.",
                                      labels=["endpoint", "status"])
            for (name, labels), v in sorted(t.items()):
                if name == "requests":
                    req.add_metric(list(labels), v)
            fams.append(req)
            rej = CounterMetricFamily("llm_rejections", "Requests refused or failed, by reason.", labels=["reason"])
            reasons = {r: 0.0 for r in REJECTION_REASONS}
            for (name, labels), v in t.items():
                if name == "rejections":
                    reasons[labels[0]] = reasons.get(labels[0], 0) + v
            for r, v in sorted(reasons.items()):
                rej.add_metric([r], v)
            fams.append(rej)
            fams.append(CounterMetricFamily("llm_prompt_tokens", "Prompt tokens processed by the engines.",
                                            value=self._sum(t, "prompt_tokens")))
            fams.append(CounterMetricFamily("llm_generation_tokens", "Tokens generated by the engines.",
                                            value=self._sum(t, "generation_tokens")))
            fams.append(GaugeMetricFamily("llm_requests_waiting",
                                          "Requests sent to the model deployment and not yet started on a replica.",
                                          value=g["waiting"]))
            fams.append(GaugeMetricFamily("llm_requests_running",
                                          "Requests started on a model replica and not finished.", value=g["running"]))
            fams.append(GaugeMetricFamily("llm_model_replicas", "Healthy model replicas reporting.",
                                          value=g["model_replicas"]))
            fams.append(GaugeMetricFamily("llm_available_slots",
                                          "Free request slots: healthy replicas x max_ongoing_requests - running.",
                                          value=g["available_slots"]))
            for key, (name, doc) in HISTOGRAMS.items():
                h = self._hists[key]
                fams.append(HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.sum))
            return fams

    def prometheus_text(self) -> str:
        """Prometheus text exposition (format 0.0.4) of every family."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        fams = self.families()

        class _Collector:
            def collect(self):
                return iter(fams)

        registry.register(_Collector())
        return generate_latest(registry).decode("utf-8")

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            return {"stats": self.stats(), "metrics": self.metrics_json(), "sources": self.sources(),
                    "pending_joins": {"requests": len(self._pending_req), "engine": len(self._pending_eng)},
                    "ts": time.time(), "age_s": {sid: round(now - s.last_seen, 3) for sid, s in self._sources.items()}}

    def sources(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            return {sid: {"role": s.role, "live": now - s.last_seen <= self.gauge_ttl_s, "seq": s.seq,
                          "gauges": s.gauges} for sid, s in self._sources.items()}

    def reset(self) -> None:
        """Forget everything (tests)."""
        with self._lock:
            self._sources.clear()
            self._retired.clear()
            self._hists = {k: _Hist(BUCKETS[k]) for k in HISTOGRAMS}
            self._pending_req.clear()
            self._pending_eng.clear()
            self._samples.clear()
            self._peak_waiting = 0

    # ------------------------------------------------------------------ Ray mirror

    def _mirror(self, now: float) -> None:
        if self._ray is None or not self._ray.ok:
            return
        totals = self._totals()
        for key, value in totals.items():
            delta = value - self._mirrored.get(key, 0)
            if delta > 0:
                self._ray.inc(key[0], key[1], delta)
                self._mirrored[key] = value
        self._ray.gauges(self._gauges(now))

    def _refresh_loop(self) -> None:
        while not self._stop.wait(2.0):
            try:
                with self._lock:
                    now = self._clock()
                    self._sweep(now)
                    self._ray.gauges(self._gauges(now))  # type: ignore[union-attr]
            except Exception:  # pragma: no cover - never kill the actor over metrics
                pass


class _RayMirror:
    """The same families through ray.util.metrics (exported as ray_<name> by Ray)."""

    COUNTERS = {  # recorder counter -> (Ray metric name, tag keys)
        "requests": ("llm_requests", ("endpoint", "status")),
        "rejections": ("llm_rejections", ("reason",)),
        "prompt_tokens": ("llm_prompt_tokens", ()),
        "generation_tokens": ("llm_generation_tokens", ()),
    }
    GAUGES = {"waiting": "llm_requests_waiting", "running": "llm_requests_running",
              "model_replicas": "llm_model_replicas", "available_slots": "llm_available_slots"}

    def __init__(self):
        self.ok = False
        try:
            import ray
            from ray.util.metrics import Counter, Gauge, Histogram

            if not ray.is_initialized():
                return
            # Ray appends `_total` to counters itself: register without the suffix.
            self.counters = {k: (Counter(n, description=f"{n} (mirror of /metrics/prometheus)", tag_keys=tags), tags)
                             for k, (n, tags) in self.COUNTERS.items()}
            self.gauge_objs = {k: Gauge(n, description=f"{n} (mirror of /metrics/prometheus)")
                               for k, n in self.GAUGES.items()}
            self.hists = {k: Histogram(name, description=doc, boundaries=list(BUCKETS[k]))
                          for k, (name, doc) in HISTOGRAMS.items()}
            self.ok = True
        except Exception as exc:  # metrics are optional; never fail the actor over them
            logger.warning("Ray metrics mirror disabled: %s", exc)

    def inc(self, name: str, labels: tuple, value: float) -> None:
        entry = self.counters.get(name) if self.ok else None
        if entry is None:
            return
        counter, tags = entry
        counter.inc(value, tags=dict(zip(tags, labels)) if tags else None)

    def gauges(self, g: Mapping[str, int]) -> None:
        if self.ok:
            for k, gauge in self.gauge_objs.items():
                gauge.set(g[k])

    def observe(self, name: str, value: float, n: int) -> None:
        if self.ok:
            h = self.hists[name]
            for _ in range(n):  # a coalesced chunk of k tokens: k equal gaps
                h.observe(value)


def _mean(values: list[float]) -> float | None:
    return (sum(values) / len(values)) if values else None


def _percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
