"""The limiter actor: one named Ray actor per app (`rate_limiter.<app>`; deployments/actors.py
says why it is detached, CPU-less and head-pinned) holds every client's budgets — moving request
windows (the `limits` package's `MovingWindowRateLimiter` over `MemoryStorage`), tokens per
minute, requests in flight — and the cluster's. Its methods run one at a time under one lock,
so test-then-take is atomic across all ingress replicas: a request over any budget is refused
and takes nothing. `settle` takes a batch (a client's admits and releases of one moment) in one
call, deciding each as the single calls would: batching changes the cost, not the decisions."""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from deployments.actors import ActorState
from deployments.admission.limits import (
    CLUSTER_KEY,
    TOKEN_WINDOW_S,
    AdmitSpec,
    ClusterBudget,
    RateDecision,
    RateWindow,
    make_windows,
)


@dataclass
class _Lease:
    key: str
    reserve: int
    expires: float
    counted_tokens: bool


def _locked(method: Callable) -> Callable:
    """Run an actor method under the actor's lock and mark its state changed (the snapshot
    thread exports under the same lock)."""

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            self._mutations += 1
            return method(self, *args, **kwargs)

    return wrapper


def _sweep_on_demand_storage() -> Any:
    """`limits`' MemoryStorage whose expired entries are removed a slice of keys at a time when
    the actor says (`sweep`, from `_reap`) instead of by the library's timer thread, which every
    hit re-arms for 10 ms later and which walks every key each time: with many clients that
    thread took most of the actor's CPU (docs/performance.md, "The admission control plane").
    Decisions do not depend on the sweep: the moving window compares entry times with now."""
    import bisect

    from limits.storage import MemoryStorage

    class SweepOnDemandStorage(MemoryStorage):
        def __init__(self) -> None:
            super().__init__()
            self._pending: list[str] = []  # keys still to visit in this pass over the storage

        def _MemoryStorage__schedule_expiry(self) -> None:  # the library's per-hit re-arm: off
            pass

        def sweep(self, max_keys: int) -> int:
            """Drop the expired entries of up to `max_keys` keys (a pass over every key goes
            on where the last call stopped) and the keys left empty; returns the keys visited."""
            if not self._pending:
                self._pending = list(self.events)
            batch, self._pending = self._pending[-max_keys:], self._pending[:-max_keys]
            now = time.time()
            for key in batch:
                with self.locks[key]:
                    events = self.events.get(key)
                    if events:  # newest first: keep those not yet expired
                        keep = bisect.bisect_left(events, -now, key=lambda e: -e.expiry)
                        if keep < len(events):
                            self.events[key] = events[:keep]
                    if not self.events.get(key):
                        self.events.pop(key, None)
                        self.locks.pop(key, None)
            return len(batch)

    return SweepOnDemandStorage()


# --------------------------------------------------------------------------- the actor


class RateLimiterActor:
    """Moving-window limits for many keys, all windows checked together. Plain class: create
    it with :func:`get_or_create_actor` (``ray.remote`` + named, detached, ``num_cpus=0``).

    Survives its own restart (``max_restarts=-1``): its configuration, windows, token logs,
    leases and counters are saved to Ray's GCS KV store (`ActorState`) at once on
    `configure` and otherwise every `SNAPSHOT_INTERVAL_S` while they change (less often when a
    large state takes longer to export: `ActorState.SNAPSHOT_SHARE`), and a restarted
    incarnation loads them (what changed in the last interval before the crash is lost: a
    few requests less counted, leases taken then expire). Lease ids carry the incarnation's
    random id, so a release of a lease the crash lost matches nothing."""

    SNAPSHOT_INTERVAL_S = 1.0
    SWEEP_KEYS = 5_000  # clients' expired entries looked at per second (under the lock)

    def __init__(
        self, windows: Iterable[RateWindow | tuple[int, int]] | None = None, snapshot_interval_s: float | None = None
    ):
        from limits.strategies import MovingWindowRateLimiter

        self._mutex = threading.RLock()
        self._mutations = 0  # state changes so far (the snapshot thread saves when it moved)
        self._exported = 0
        self._state = ActorState("rate_limiter")
        self._storage = _sweep_on_demand_storage()
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._windows: list[RateWindow] = []
        self._items: list[Any] = []
        self.allowed_total = 0
        self.rejected_total = 0
        self._cluster = ClusterBudget()
        self._cluster_windows: tuple[RateWindow, ...] = ()
        # tokens charged per key: (time, tokens), oldest first; reservations of open requests
        self._token_log: dict[str, Any] = {}
        self._reserved: dict[str, int] = {}
        self._inflight: dict[str, int] = {}
        self._leases: dict[str, _Lease] = {}
        self._weights: dict[str, int] = {}
        self._lease_seq = 0
        self._next_reap = self._next_sweep = 0.0
        self.configure(list(windows) if windows is not None else make_windows(10, 100), _save=False)
        saved = self._state.load()
        if saved is not None:
            self._restore(saved)
        self._state.start(self._export, snapshot_interval_s or self.SNAPSHOT_INTERVAL_S)

    @_locked
    def configure(
        self,
        windows: Iterable[RateWindow | tuple[int, int]],
        cluster: ClusterBudget | Mapping[str, Any] | None = None,
        _save: bool = True,
    ) -> list[dict[str, Any]]:
        """Replace the window set (and the cluster-wide budgets). Windows whose (limit, period)
        are unchanged keep their state (the ``limits`` storage key depends only on those).
        Saved at once: a restart right after a deploy keeps that deploy's budgets."""
        out = self._configure(windows, cluster)
        if _save:
            self._state.save_now(self._export(force=True))
        return out

    def epoch(self) -> str:
        """This incarnation's random id (changes when Ray restarts the actor)."""
        return self._state.incarnation

    def state(self) -> dict[str, Any]:
        """Incarnation and snapshot report, and whether changes wait for the next snapshot."""
        with self._mutex:
            return {**self._state.report(), "unsaved_changes": self._mutations != self._exported}

    # ------------------------------------------------------------------ snapshot (GCS KV)

    def _export(self, force: bool = False) -> dict[str, Any] | None:
        """Everything a restarted incarnation needs, JSON-able; None when unchanged."""
        with self._mutex:
            if not force and self._mutations == self._exported:
                return None
            now = time.time()
            events = {}
            for key, entries in list(self._storage.events.items()):
                live = [(e.atime, e.expiry) for e in list(entries) if e.expiry > now]
                if live:
                    events[key] = live
            snapshot = {
                "version": 1,
                "windows": [asdict(w) for w in self._windows],
                "cluster": self._cluster.model_dump(),
                "events": events,
                "token_log": {k: list(v) for k, v in self._token_log.items() if v},
                "reserved": dict(self._reserved),
                "inflight": dict(self._inflight),
                "weights": dict(self._weights),
                "leases": {k: asdict(v) for k, v in self._leases.items() if v.expires > now},
                "allowed_total": self.allowed_total,
                "rejected_total": self.rejected_total,
            }
            self._exported = self._mutations
            return snapshot

    def _restore(self, saved: Mapping[str, Any]) -> None:
        from limits.storage.memory import Entry

        with self._mutex:
            if saved.get("version") != 1:
                return
            self._configure([RateWindow(**w) for w in saved["windows"]], saved["cluster"])
            for key, entries in saved.get("events", {}).items():
                restored = []
                for atime, expiry in entries:  # newest first, as the storage keeps them
                    e = Entry.__new__(Entry)
                    e.atime, e.expiry = float(atime), float(expiry)
                    restored.append(e)
                self._storage.events[key] = restored
            self._token_log = {k: deque((float(t), int(n)) for t, n in v) for k, v in saved["token_log"].items()}
            self._reserved = {k: int(v) for k, v in saved["reserved"].items()}
            self._inflight = {k: int(v) for k, v in saved["inflight"].items()}
            self._weights = {k: int(v) for k, v in saved["weights"].items()}
            self._leases = {k: _Lease(**v) for k, v in saved["leases"].items()}
            self.allowed_total = int(saved.get("allowed_total", 0))
            self.rejected_total = int(saved.get("rejected_total", 0))

    def _configure(
        self, windows: Iterable[RateWindow | tuple[int, int]], cluster: ClusterBudget | Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        ws = [w if isinstance(w, RateWindow) else RateWindow(int(w[0]), int(w[1])) for w in windows]
        for w in ws:
            if w.limit < 1 or w.period_s < 1:
                raise ValueError(f"invalid window {w}: limit and period must be >= 1")
        self._windows = ws
        self._items = [self._item(w) for w in ws]
        if cluster is not None:
            self._cluster = ClusterBudget.model_validate(cluster)
            self._cluster_windows = (
                (RateWindow(self._cluster.requests_per_minute, 60, "minute"),)
                if self._cluster.requests_per_minute
                else ()
            )
        return [asdict(w) for w in ws]

    @staticmethod
    @lru_cache(maxsize=1024)
    def _item(w: RateWindow):
        from limits import RateLimitItemPerSecond

        return RateLimitItemPerSecond(w.limit, w.period_s)

    # ------------------------------------------------------------------ budgets (admit/release)

    def _tokens_used(self, key: str, now: float) -> int:
        from collections import deque

        log = self._token_log.get(key)
        if log is None:
            log = self._token_log[key] = deque()
        while log and log[0][0] <= now - TOKEN_WINDOW_S:
            log.popleft()
        return sum(n for _, n in log) + self._reserved.get(key, 0)

    def _tokens_free_at(self, key: str, need: int, now: float) -> float:
        """When `need` more tokens will have left `key`'s window (now + 1 s when only the
        reservations of requests still running stand in the way)."""
        freed = 0
        for t, n in self._token_log.get(key, ()):
            freed += n
            if freed >= need:
                return t + TOKEN_WINDOW_S
        return now + 1

    def _reap(self, now: float) -> None:
        if now >= self._next_sweep:
            self._next_sweep = now + 1
            self._storage.sweep(self.SWEEP_KEYS)  # entries out of their window: memory only
        if now < self._next_reap:
            return
        self._next_reap = now + 5
        for lease_id in [k for k, v in self._leases.items() if v.expires <= now]:
            self.release(lease_id, None)
        for key in [k for k, log in self._token_log.items() if not log or log[-1][0] <= now - TOKEN_WINDOW_S]:
            if not self._reserved.get(key):
                self._token_log.pop(key, None)

    def _refuse(
        self, spec: AdmitSpec, now: float, reason: str, scope: str, limit: int, retry_at: float, **extra: Any
    ) -> RateDecision:
        self.rejected_total += 1
        return RateDecision(
            allowed=False,
            limit=limit,
            remaining=0,
            reset_epoch_s=retry_at,
            retry_after_s=max(1, math.ceil(retry_at - now)),
            window="minute",
            period_s=60,
            reason=reason,
            scope=scope,
            epoch=self._state.incarnation,
            **extra,
        )

    @_locked
    def admit(self, spec: AdmitSpec) -> RateDecision:
        """Admit one request when every budget of its client and of the cluster has room —
        request windows, concurrency, tokens (`reserve_tokens` must fit what is left) — and
        then take from each; otherwise refuse, taking nothing. A lease is returned when a
        concurrency or token budget applies: give it back with `release`."""
        now = time.time()
        self._reap(now)
        checks = [(self._item(w), spec.key, w, "client") for w in spec.windows]
        checks += [(self._item(w), CLUSTER_KEY, w, "cluster") for w in self._cluster_windows]
        full = [c for c in checks if not self._limiter.test(c[0], c[1])]
        if full:
            self.rejected_total += 1
            worst, worst_reset = None, -1.0
            for item, key, w, scope in full:
                reset = float(self._limiter.get_window_stats(item, key).reset_time)
                if reset > worst_reset:
                    worst, worst_reset = (w, scope), reset
            w, scope = worst  # type: ignore[misc]
            details = self._details_for(spec.key, spec.windows, now) + self._details_for(
                CLUSTER_KEY, self._cluster_windows, now
            )
            return RateDecision(
                allowed=False,
                limit=w.limit,
                remaining=0,
                reset_epoch_s=worst_reset,
                retry_after_s=max(1, math.ceil(worst_reset - now)),
                window=w.label(),
                period_s=w.period_s,
                reason="requests",
                scope=scope,
                windows=details,
                epoch=self._state.incarnation,
            )
        for key, limit, scope in (
            (spec.key, spec.max_concurrent, "client"),
            (CLUSTER_KEY, self._cluster.max_concurrent, "cluster"),
        ):
            if limit and self._inflight.get(key, 0) >= limit:
                return self._refuse(spec, now, "concurrency", scope, limit, now + 1, concurrency_limit=limit)
        share = self._over_fair_share(spec)
        if share is not None:
            return self._refuse(
                spec, now, "fair_share", "cluster", self._cluster.max_concurrent, now + 1, concurrency_limit=share
            )
        token_budgets = [
            (k, lim, sc)
            for k, lim, sc in (
                (spec.key, spec.tokens_per_minute, "client"),
                (CLUSTER_KEY, self._cluster.tokens_per_minute, "cluster"),
            )
            if lim
        ]
        tokens_left: list[tuple[int, int, float]] = []
        for key, limit, scope in token_budgets:
            used = self._tokens_used(key, now)
            if spec.reserve_tokens > limit:
                return self._refuse(
                    spec, now, "tokens", scope, limit, now + TOKEN_WINDOW_S, tokens_limit=limit, never_fits=True
                )
            if used + spec.reserve_tokens > limit:
                retry_at = self._tokens_free_at(key, used + spec.reserve_tokens - limit, now)
                return self._refuse(
                    spec,
                    now,
                    "tokens",
                    scope,
                    limit,
                    retry_at,
                    tokens_limit=limit,
                    tokens_remaining=max(0, limit - used),
                    tokens_reset_epoch_s=retry_at,
                )
            log = self._token_log.get(key) or ()
            tokens_left.append(
                (
                    limit,
                    limit - used - spec.reserve_tokens,
                    (log[-1][0] + TOKEN_WINDOW_S) if log else now + TOKEN_WINDOW_S,
                )
            )
        # every budget has room: take from each
        for item, key, _, _ in checks:
            self._limiter.hit(item, key)
        self.allowed_total += 1
        decision = RateDecision(allowed=True)
        client_details = self._details_for(spec.key, spec.windows, now) if spec.windows else []
        cluster_details = self._details_for(CLUSTER_KEY, self._cluster_windows, now)
        details = client_details + cluster_details
        if details:
            d = min(details, key=lambda x: (x["remaining"], x["period_s"]))
            decision = RateDecision(
                allowed=True,
                limit=d["limit"],
                remaining=d["remaining"],
                reset_epoch_s=d["reset_epoch_s"],
                window=d["window"],
                period_s=d["period_s"],
                windows=details,
            )
        if tokens_left:
            limit, left, reset = min(tokens_left, key=lambda x: x[1])
            decision.tokens_limit, decision.tokens_remaining = limit, left
            decision.tokens_reset_epoch_s = reset
        concurrency = [lim for lim in (spec.max_concurrent, self._cluster.max_concurrent) if lim]
        if concurrency or token_budgets:
            self._weights[spec.key] = max(1, spec.weight)
            decision.concurrency_limit = min(concurrency) if concurrency else 0
            self._lease_seq += 1
            lease_id = f"{self._state.incarnation}-{self._lease_seq:x}"  # unique across restarts
            self._leases[lease_id] = _Lease(
                spec.key, spec.reserve_tokens if token_budgets else 0, now + spec.ttl_s, bool(token_budgets)
            )
            for key in (spec.key, CLUSTER_KEY):
                self._inflight[key] = self._inflight.get(key, 0) + 1
                if token_budgets:
                    self._reserved[key] = self._reserved.get(key, 0) + spec.reserve_tokens
            decision.lease = lease_id
        decision.epoch = self._state.incarnation
        return decision

    def _over_fair_share(self, spec: AdmitSpec) -> int | None:
        """The client's share (whole requests) when the cluster is busy and the client holds at
        least that many; None: admit."""
        c, above = self._cluster.max_concurrent, self._cluster.fair_share_above
        if not c or not above or self._inflight.get(CLUSTER_KEY, 0) < c * above:
            return None
        weights = {k: self._weights.get(k, 1) for k, n in self._inflight.items() if n > 0 and k != CLUSTER_KEY}
        weights[spec.key] = max(1, spec.weight)
        # alone, a client counts a newcomer beside it (weight 1): it cannot take the headroom
        share = c * max(1, spec.weight) / (sum(weights.values()) + (1 if len(weights) == 1 else 0))
        held = self._inflight.get(spec.key, 0)
        return max(1, math.floor(share)) if held >= share else None

    @_locked
    def release(self, lease_id: str, tokens: int | None) -> bool:
        """A request ended: give back its concurrency slot and its reservation, and charge the
        tokens it used (its response's usage; None: unknown, the reservation is charged)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        now = time.time()
        for key in (lease.key, CLUSTER_KEY):
            self._inflight[key] = max(0, self._inflight.get(key, 0) - 1)
            if not self._inflight[key]:
                self._inflight.pop(key)
                self._weights.pop(key, None)
            if lease.counted_tokens:
                self._reserved[key] = max(0, self._reserved.get(key, 0) - lease.reserve)
                charge = lease.reserve if tokens is None else max(0, int(tokens))
                if charge:
                    self._tokens_used(key, now)  # creates / prunes the log
                    self._token_log[key].append((now, charge))
        return True

    @_locked
    def settle(self, specs: list[AdmitSpec], releases: list[tuple[str, int | None]]) -> list[RateDecision]:
        """What a batching client sends (`RateLimiter`, one call per batch): the `releases`
        (lease, tokens), then the `admits`, in the order given, exactly as that many `release`
        and `admit` calls arriving in that order would decide them, under one hold of the lock.
        Releases go first: their requests had ended when the batch was sent, so the admits
        of the batch find those slots free (as they would had each release gone alone)."""
        for lease, tokens in releases:
            self.release(lease, tokens)
        return [self.admit(spec) for spec in specs]

    def usage(self, key: str) -> dict[str, int]:
        """In-flight requests, reserved and counted tokens of `key` (tests, debugging)."""
        now = time.time()
        used = self._tokens_used(key, now)
        return {
            "in_flight": self._inflight.get(key, 0),
            "reserved_tokens": self._reserved.get(key, 0),
            "tokens_last_minute": used,
        }

    def _details_for(self, key: str, windows: Iterable[RateWindow], now: float) -> list[dict[str, Any]]:
        out = []
        for w in windows:
            stats = self._limiter.get_window_stats(self._item(w), key)
            remaining = max(0, int(stats.remaining))
            # `reset_time` is when the oldest request in the window leaves it; with nothing in
            # the window it is "now + period".
            reset = float(stats.reset_time) if remaining < w.limit else now + w.period_s
            out.append(
                {
                    "window": w.label(),
                    "limit": w.limit,
                    "period_s": w.period_s,
                    "remaining": remaining,
                    "reset_epoch_s": reset,
                }
            )
        return out

    def windows(self) -> list[dict[str, Any]]:
        return [asdict(w) for w in self._windows]

    def counters(self) -> dict[str, int]:
        return {"allowed": self.allowed_total, "rejected": self.rejected_total}
