"""`StatsRecorder`: each ingress and model replica's in-process buffer of observations
(synchronous, no I/O on the request path), pushed to the stats actor by a background task;
also the replicas' way to query the actor's figures. How to call it: monitoring/README.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from deployments.actors import DEFAULT_NAMESPACE, actor_failure_types, get_or_create_actor
from deployments.observability.aggregator import ServiceStatsActor
from deployments.observability.config import ObservabilityConfig, rejection_reason
from deployments.observability.traces import EngineTrace, RequestTrace

logger = logging.getLogger("ray.serve")

_MAX_EVENTS = 50_000
_MAX_ENDPOINTS = 16


class StatsRecorder:
    """Per-process buffer of observations, flushed to the shared :class:`ServiceStatsActor`.

    `sink`: tests may pass the actor instance itself (or any object with `push`) instead of
    letting the recorder get-or-create the named actor.
    """

    def __init__(
        self,
        role: str,
        *,
        app_name: str = "llm",
        actor_name: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        source_id: str | None = None,
        flush_interval_s: float = 1.0,
        capacity: int = 0,
        enabled: bool = True,
        actor_settings: Mapping[str, Any] | None = None,
        ray_metrics: bool = True,
        sink: Any = None,
        push_timeout_s: float = 10.0,
        pin_to_head: bool = True,
    ):
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
        self._handle: Any = None  # the Ray actor handle, once resolved
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
        # Model replicas: a callable returning the engine's figures (engine_metrics.EngineMetrics
        # .snapshot), sent whole with every push (gauges and cumulative counters).
        self.engine_source: Callable[[], dict[str, Any]] | None = None

    @classmethod
    def from_config(
        cls,
        cfg: ObservabilityConfig | Mapping[str, Any] | None,
        role: str,
        app_name: str = "llm",
        capacity: int = 0,
        **kwargs: Any,
    ) -> StatsRecorder:
        cfg = ObservabilityConfig.model_validate(cfg or {})
        return cls(
            role,
            app_name=app_name,
            actor_name=cfg.actor_name,
            namespace=cfg.namespace,
            flush_interval_s=cfg.flush_interval_s,
            capacity=capacity,
            enabled=cfg.enabled,
            actor_settings=cfg.actor_settings(),
            ray_metrics=cfg.ray_metrics,
            **kwargs,
        )

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

    def record_rejection(
        self,
        endpoint: str,
        status: int,
        code: str | int | None = None,
        request_id: str | None = None,
        reason: str | None = None,
    ) -> None:
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

    def count(self, name: str, labels: tuple, value: float) -> None:
        with self._lock:
            self._add((name, labels), value)

    def dispatched(self, delta: int) -> None:
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

    def request_finished(self, record: dict[str, Any], was_dispatched: bool) -> None:
        """A `RequestTrace` ended (`record`: its times, tokens, status; `code` is dropped)."""
        status, code = record["status"], record.pop("code")
        record["reason"] = reason = record["reason"] or rejection_reason(status, code)
        with self._lock:
            self._inflight -= 1
            if was_dispatched:
                self._dispatched -= 1
            self._add(("requests", (record["endpoint"], str(status))), 1)
            if reason:
                self._add(("rejections", (reason,)), 1)
            self._event("req", record)

    def engine_finished(self, record: dict[str, Any]) -> None:
        """An `EngineTrace` ended (`record`: its times, tokens and outcome)."""
        with self._lock:
            self._running -= 1
            self._add(("engine_requests", (record["outcome"],)), 1)
            self._event("eng", record)

    # ------------------------------------------------------------------ flushing

    def _engine_snapshot(self) -> dict[str, Any] | None:
        if self.engine_source is None:
            return None
        try:
            return self.engine_source()
        except Exception as exc:  # never lose a push over the engine's figures
            self._warn(exc)
            return None

    def _payload(self) -> tuple[dict[str, Any], int]:
        engine = self._engine_snapshot()
        with self._lock:
            gauges = {
                "inflight": self._inflight,
                "dispatched": self._dispatched,
                "dispatched_peak": self._dispatched_peak,
                "running": self._running,
                "capacity": self._capacity if self.role == "model" else 0,
                "healthy": self._healthy,
            }
            self._dispatched_peak = self._dispatched
            payload = {
                "ts": time.time(),
                "counters": [(name, labels, value) for (name, labels), value in self._counters.items()],
                "gauges": gauges,
                "events": list(self._events),
                "dropped_events": self._dropped_events,
            }
            if engine is not None:
                payload["engine"] = engine
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
                get_or_create_actor,
                ServiceStatsActor,
                self.actor_name,
                self.namespace,
                pin_to_head=self.pin_to_head,
                **self.actor_settings,
            )
            self._configured = False
        if not self._configured:
            # The first call also waits for a new actor's process to start.
            await _maybe_await(
                self._sink_call("configure", self.actor_settings), timeout_s or max(self.push_timeout_s, 30.0)
            )
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
                acked = await _maybe_await(
                    self._sink_call("push", self.source_id, self.role, payload), self.push_timeout_s
                )
            except TimeoutError as exc:
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
            logger.warning("stats push from %s failed (%s: %s); will retry", self.source_id, type(exc).__name__, exc)

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
