"""`ServiceStatsActor`: the one named Ray actor per app that every recorder pushes to, and the
exactly-once rules of those pushes (monitoring/README.md, "How the figures are gathered");
it joins each request's ingress and engine records and answers every query cluster-wide."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any

from deployments.actors import ActorState
from deployments.observability import exposition
from deployments.observability.config import REJECTION_REASONS
from deployments.observability.ray_mirror import RayMirror
from deployments.observability.stats import mean, percentile


class _Source:
    """One recorder as the actor knows it: its latest cumulative counters and gauges, when it
    was last heard from, and the highest event sequence number applied."""

    __slots__ = ("counters", "engine", "first_seen", "gauges", "last_seen", "role", "seq")

    def __init__(self, role: str, now: float):
        self.role = role
        self.first_seen = now
        self.last_seen = now
        self.counters: dict[tuple[str, tuple], float] = {}
        self.gauges: dict[str, Any] = {}
        self.seq = 0
        self.engine: dict[str, Any] | None = None  # a model replica's latest engine snapshot


class ServiceStatsActor:
    """Aggregates every replica's observations. Plain class: create it with
    :func:`get_or_create_actor` (named, detached, ``num_cpus=0``); methods run one at a time.

    Survives its own restart (``max_restarts=-1``): every `SNAPSHOT_INTERVAL_S` while pushes
    arrive, its counters per source (and those of retired sources), histograms, SLO samples,
    peak queue and settings are saved to Ray's GCS KV store (`ActorState`); a restarted
    incarnation loads them, and each live recorder's next push (cumulative counters) brings
    its source up to date. Lost: histogram observations and SLO samples of the last interval
    before the crash (the counters stay exact), and requests/engine records waiting to be
    joined."""

    SNAPSHOT_INTERVAL_S = 2.0

    def __init__(
        self,
        window_s: float = 300.0,
        max_samples: int = 10_000,
        gauge_ttl_s: float = 10.0,
        join_ttl_s: float = 10.0,
        retire_after_s: float = 3600.0,
        ray_metrics: bool = True,
        clock=time.monotonic,
        snapshot_interval_s: float | None = None,
    ):
        self._clock = clock
        self._lock = threading.RLock()
        self._mutations = 0  # changes so far (the snapshot thread saves when it moved)
        self._exported = 0
        self._state = ActorState("service_stats")
        self.window_s = window_s
        self.max_samples = max_samples
        self.gauge_ttl_s = gauge_ttl_s
        self.join_ttl_s = join_ttl_s
        self.retire_after_s = retire_after_s
        self._sources: dict[str, _Source] = {}
        self._retired: dict[tuple[str, tuple], float] = {}
        self._hists = exposition.new_histograms()
        self._pending_req: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self._pending_eng: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self._samples: deque[tuple[float, float | None, float | None, int, float, float]] = deque()
        self._peak_waiting = 0
        self._dropped_events = 0
        self._ray = RayMirror() if ray_metrics else None
        self._stop = threading.Event()
        saved = self._state.load()
        if saved is not None:
            self._restore(saved)
        self._state.start(self._export, snapshot_interval_s or self.SNAPSHOT_INTERVAL_S)
        if self._ray is not None and self._ray.ok:
            threading.Thread(target=self._refresh_loop, name="stats-gauges", daemon=True).start()

    # ------------------------------------------------------------------ snapshot (GCS KV)

    _SETTINGS = ("window_s", "max_samples", "gauge_ttl_s", "join_ttl_s", "retire_after_s")

    def _export(self, force: bool = False) -> dict[str, Any] | None:
        """What a restarted incarnation needs, JSON-able; None when nothing changed."""
        with self._lock:
            if not force and self._mutations == self._exported:
                return None
            now = self._clock()
            snapshot = {
                "version": 1,
                "settings": {k: getattr(self, k) for k in self._SETTINGS},
                "sources": {
                    sid: {
                        "role": src.role,
                        "seq": src.seq,
                        "age_s": now - src.last_seen,
                        "counters": [[n, list(labels), v] for (n, labels), v in src.counters.items()],
                    }
                    for sid, src in self._sources.items()
                },
                "retired": [[n, list(labels), v] for (n, labels), v in self._retired.items()],
                "hists": {
                    k: {"counts": list(h.counts), "sum": h.sum, "count": h.count} for k, h in self._hists.items()
                },
                "samples": [[None if x is None else round(x, 6) for x in sample] for sample in self._samples],
                "peak_waiting": self._peak_waiting,
            }
            self._exported = self._mutations
            return snapshot

    def _restore(self, saved: Mapping[str, Any]) -> None:
        with self._lock:
            if saved.get("version") != 1:
                return
            for k, v in saved.get("settings", {}).items():
                if k in self._SETTINGS and v is not None:
                    setattr(self, k, type(getattr(self, k))(v))
            now = self._clock()
            for sid, data in saved.get("sources", {}).items():
                src = _Source(str(data["role"]), now)
                # not live until it pushes again (its gauges are not kept), retired on time
                src.last_seen = now - max(float(data.get("age_s", 0)), self.gauge_ttl_s + 1e-3)
                src.seq = int(data.get("seq", 0))
                src.counters = {(n, tuple(labels)): float(v) for n, labels, v in data.get("counters", ())}
                self._sources[sid] = src
            self._retired = {(n, tuple(labels)): float(v) for n, labels, v in saved.get("retired", ())}
            for k, h in saved.get("hists", {}).items():
                hist = self._hists.get(k)
                if hist is not None and len(h["counts"]) == len(hist.counts):
                    hist.counts, hist.sum, hist.count = [int(c) for c in h["counts"]], float(h["sum"]), int(h["count"])
            self._samples.extend(tuple(sample) for sample in saved.get("samples", ()))
            self._peak_waiting = int(saved.get("peak_waiting", 0))

    def state(self) -> dict[str, Any]:
        """Incarnation and snapshot report, and whether changes wait for the next snapshot."""
        with self._lock:
            return {**self._state.report(), "unsaved_changes": self._mutations != self._exported}

    def configure(self, settings: Mapping[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """Update window/TTL settings (the latest deploy's config wins)."""
        with self._lock:
            self._mutations += 1
            for k, v in {**(settings or {}), **kw}.items():
                if k in ("window_s", "max_samples", "gauge_ttl_s", "join_ttl_s", "retire_after_s") and v is not None:
                    setattr(self, k, type(getattr(self, k))(v))
            return {k: getattr(self, k) for k in ("window_s", "max_samples", "gauge_ttl_s", "join_ttl_s")}

    # ------------------------------------------------------------------ ingestion

    def push(self, source: str, role: str, payload: Mapping[str, Any]) -> int:
        """Apply one recorder flush; returns the highest event sequence number applied."""
        with self._lock:
            self._mutations += 1
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
            if payload.get("engine") is not None:
                src.engine = payload["engine"]
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
                _rid, (t, rec) = next(iter(pending.items()))
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
            "waiting": waiting,
            "running": running,
            "dispatched": max(0, dispatched),
            "inflight": sum(max(0, int(s.gauges.get("inflight", 0))) for s in ingress),
            "capacity": capacity,
            "model_replicas": len(models),
            "available_slots": max(0, capacity - running),
            "ingress_replicas": len(ingress),
        }

    def _update_peak(self, src: _Source, now: float) -> None:
        g = self._gauges(now)
        peak = g["waiting"]
        if src.role == "ingress":
            extra = int(src.gauges.get("dispatched_peak", 0)) - int(src.gauges.get("dispatched", 0))
            if extra > 0:
                peak = max(peak, g["dispatched"] + extra - max(g["running"], g["capacity"]))
        self._peak_waiting = max(self._peak_waiting, peak)

    def _engines(self, now: float) -> list[dict[str, Any]]:
        """Engine snapshots of the live model replicas (a silent replica's series disappear)."""
        return [s.engine for s in self._live(now) if s.role == "model" and s.engine is not None]

    def _totals(self) -> dict[tuple[str, tuple], float]:
        out = dict(self._retired)
        for src in self._sources.values():
            for key, value in src.counters.items():
                out[key] = out.get(key, 0) + value
        return out

    @staticmethod
    def _sum(totals: Mapping[tuple[str, tuple], float], name: str, pred=lambda labels: True) -> float:
        return sum(v for (n, labels), v in totals.items() if n == name and pred(labels))

    def _current(self) -> tuple[dict[tuple[str, tuple], float], dict[str, int]]:
        """Counter totals and gauges as of now, after expiring what is due (under the lock)."""
        now = self._clock()
        self._sweep(now)
        return self._totals(), self._gauges(now)

    def _window(self) -> list[tuple]:
        cutoff = time.time() - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()
        return list(self._samples)

    # ------------------------------------------------------------------ queries

    def stats(self) -> dict[str, Any]:
        """The user's /stats fields, cluster-wide."""
        with self._lock:
            t, g = self._current()
            ok = self._sum(t, "requests", lambda lb: lb[1].startswith("2"))
            done = self._sum(t, "requests")
            rejections = {r: int(self._sum(t, "rejections", lambda lb, r=r: lb[0] == r)) for r in REJECTION_REASONS}
            statistics = {
                "total_requests": int(self._sum(t, "requests_started")),
                "successful_requests": int(ok),
                "failed_requests": int(done - ok),
                "queue_full_count": rejections["queue_full"],
                "current_queue_size": g["waiting"],
                "peak_queue_size": max(self._peak_waiting, g["waiting"]),
            }
            return {
                **statistics,
                "available_slots": g["available_slots"],
                "running_requests": g["running"],
                "in_flight_requests": g["inflight"],
                "model_replicas": g["model_replicas"],
                "ingress_replicas": g["ingress_replicas"],
                "capacity": g["capacity"],
                "rejections": rejections,
                # the replaced service's shape: these six nested (they are also top-level above)
                "statistics": statistics,
            }

    def metrics_json(self) -> dict[str, Any]:
        """The user's /metrics JSON fields, cluster-wide."""
        with self._lock:
            t, g = self._current()
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
                    "ttft_mean": mean(ttfts),
                    "ttft_p50": percentile(ttfts, 50),
                    "ttft_p95": percentile(ttfts, 95),
                    "ttft_p99": percentile(ttfts, 99),
                    "decoding_throughput_mean": mean(tps),
                    "decoding_throughput_p50": percentile(tps, 50),
                    "decoding_throughput_p95": percentile(tps, 95),
                    "total_throughput": (tokens / span) if span > 0 else None,
                    "sample_size": len(samples),
                    "window_s": self.window_s,
                },
                "engine": {
                    "replicas": {e["replica"]: exposition.engine_summary(e) for e in self._engines(self._clock())}
                },
            }

    def families(self) -> list[Any]:
        """The Prometheus metric families (prometheus_client objects)."""
        with self._lock:
            return exposition.metric_families(
                *self._current(), self._hists, self.metrics_json()
            ) + exposition.engine_families(self._engines(self._clock()))

    def prometheus_text(self) -> str:
        """Prometheus text exposition (format 0.0.4) of every family."""
        return exposition.prometheus_text(self.families())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            return {
                "stats": self.stats(),
                "metrics": self.metrics_json(),
                "sources": self.sources(),
                "pending_joins": {"requests": len(self._pending_req), "engine": len(self._pending_eng)},
                "ts": time.time(),
                "age_s": {sid: round(now - s.last_seen, 3) for sid, s in self._sources.items()},
            }

    def sources(self) -> dict[str, Any]:
        with self._lock:
            now = self._clock()
            return {
                sid: {"role": s.role, "live": now - s.last_seen <= self.gauge_ttl_s, "seq": s.seq, "gauges": s.gauges}
                for sid, s in self._sources.items()
            }

    def reset(self) -> None:
        """Forget everything (tests)."""
        with self._lock:
            self._mutations += 1
            self._sources.clear()
            self._retired.clear()
            self._hists = exposition.new_histograms()
            self._pending_req.clear()
            self._pending_eng.clear()
            self._samples.clear()
            self._peak_waiting = 0

    # ------------------------------------------------------------------ Ray mirror

    def _mirror(self, now: float) -> None:
        if self._ray is not None and self._ray.ok:
            self._ray.sync(self._totals(), self._gauges(now))

    def _refresh_loop(self) -> None:
        while not self._stop.wait(2.0):
            try:
                with self._lock:
                    now = self._clock()
                    self._sweep(now)
                    self._ray.gauges(self._gauges(now))  # type: ignore[union-attr]
            except Exception:  # pragma: no cover - never kill the actor over metrics
                pass
