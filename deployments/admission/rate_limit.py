"""Cluster-wide per-client rate limiting, shared by every ingress replica.

One named Ray actor (:class:`RateLimiterActor`, see ``deployments/actors.py`` for why it is
detached, CPU-less and head-pinned) holds a moving window per client key for each configured
window (defaults: 10 per minute and 100 per hour, the user's limits). The window arithmetic is
the ``limits`` package (``MovingWindowRateLimiter`` over ``MemoryStorage``) inside the actor.

A request over ANY window is rejected and consumes nothing: the actor first tests every
window, and only when all have room does it take one slot from each. Actor methods run one
at a time, so test-then-consume is atomic across all ingress replicas.

Ingress side::

    limiter = RateLimiter.from_config(cfg.rate_limit, app_name)      # in __init__
    key = client_key(api_key, request.client.host, request.headers.get("x-forwarded-for"),
                     cfg.rate_limit.trusted_proxies)
    decision = await limiter.check(key)                               # one actor call
    if not decision.allowed:
        raise rate_limited_error(decision)                            # 429 + Retry-After
    response.headers.update(RateLimiter.headers(decision))

Environment overrides read once at start (``effective_limits``): ``RATE_LIMIT_PER_MINUTE`` and
``RATE_LIMIT_PER_HOUR`` replace the configured values; ``0`` turns that window off; both off
(or ``enabled: false``) means no actor call at all.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.actors import DEFAULT_NAMESPACE, ActorState, actor_failure_types, get_or_create_actor

logger = logging.getLogger("ray.serve")

ENV_PER_MINUTE = "RATE_LIMIT_PER_MINUTE"
ENV_PER_HOUR = "RATE_LIMIT_PER_HOUR"


# --------------------------------------------------------------------------- configuration


class RateLimitConfig(BaseModel):
    """Per-client rate limits (cluster-wide). `RATE_LIMIT_PER_MINUTE` / `RATE_LIMIT_PER_HOUR`
    override the two windows at start; 0 turns a window off."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Master switch. false: no rate limiting and no limiter actor.")
    per_minute: int = Field(10, ge=0, description="Requests per client per moving minute; 0: this window off.")
    per_hour: int = Field(100, ge=0, description="Requests per client per moving hour; 0: this window off.")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="IPs or CIDRs of reverse proxies / load balancers whose `X-Forwarded-For` is "
        "believed (e.g. the ingress controller's pod CIDR). Empty: the header is ignored and the "
        "direct peer address is the client.",
    )
    fail_open: bool = Field(
        True,
        description="When the limiter actor cannot answer within `timeout_s`: true lets the request "
        "through (logged), false rejects it with 503.",
    )
    timeout_s: float = Field(2.0, gt=0, description="Deadline of one limiter actor call.")
    tokens_per_minute: int = Field(
        0,
        ge=0,
        description="Default budget of prompt + completion tokens per client (tenant, key "
        "or address) per moving minute, charged with each response's usage; a request whose "
        "`max_tokens` does not fit the rest is refused up front (429). 0: off. A tenant of the keys "
        "file may set its own.",
    )
    max_concurrent: int = Field(
        0,
        ge=0,
        description="Default limit of requests in flight at once per client (tenant, key "
        "or address); 0: off. A tenant of the keys file may set its own.",
    )
    cluster: ClusterBudget = Field(
        default_factory=lambda: ClusterBudget(),
        description="Budgets shared by every client together (the whole service).",
    )
    lease_ttl_s: float = Field(
        600.0,
        gt=0,
        description="A request's concurrency slot and token reservation are given back "
        "after this long even if its ingress replica never reports its end (a killed replica).",
    )
    actor_name: str | None = Field(None, description="Name of the limiter actor; default `rate_limiter.<app name>`.")
    namespace: str = Field(DEFAULT_NAMESPACE, description="Ray namespace of the limiter actor.")

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, v: list[str]) -> list[str]:
        for entry in v:
            _parse_network(entry)
        return v

    def windows(self, env: Mapping[str, str] | None = None) -> list[RateWindow]:
        """The active windows after environment overrides (empty: limiting off)."""
        if not self.enabled:
            return []
        per_minute, per_hour = effective_limits(self.per_minute, self.per_hour, os.environ if env is None else env)
        return make_windows(per_minute, per_hour)


class ClusterBudget(BaseModel):
    """Service-wide budgets, checked besides each client's; 0 turns one off."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int = Field(0, ge=0, description="Requests per moving minute, all clients together; 0: off.")
    tokens_per_minute: int = Field(
        0, ge=0, description="Prompt + completion tokens per moving minute, all clients together; 0: off."
    )
    max_concurrent: int = Field(0, ge=0, description="Requests in flight at once, all clients together; 0: off.")
    fair_share_above: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fair shares under overload (needs `max_concurrent`): once this "
        "fraction of `max_concurrent` is in flight, a client at or above its weighted share "
        "(`max_concurrent` × its weight / the weights of the clients with requests in flight and "
        "its own, plus 1 for a newcomer when it is alone; weight = tenant priority + 1) is refused with 429 "
        "`fair_share_exceeded`. 0: off; 0.6 keeps 40 % free for light clients (docs/security.md S17).",
    )

    @property
    def active(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.max_concurrent)


RateLimitConfig.model_rebuild()


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number of requests (0 turns the window off)") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r}: must be 0 or more")
    return value


def effective_limits(per_minute: int, per_hour: int, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(per_minute, per_hour) after `RATE_LIMIT_PER_MINUTE` / `RATE_LIMIT_PER_HOUR` overrides.

    An unset or empty variable keeps the configured value; 0 turns the window off; anything
    else that is not a non-negative integer raises ``ValueError`` (fail at start, not later).
    """
    m = _env_int(env, ENV_PER_MINUTE)
    h = _env_int(env, ENV_PER_HOUR)
    return (per_minute if m is None else m, per_hour if h is None else h)


@dataclass(frozen=True)
class RateWindow:
    """`limit` requests per moving `period_s` seconds."""

    limit: int
    period_s: int
    name: str = ""

    def label(self) -> str:
        return self.name or window_name(self.period_s)


def window_name(period_s: int) -> str:
    return {1: "second", 60: "minute", 3600: "hour", 86400: "day"}.get(period_s, f"{period_s}s")


def make_windows(per_minute: int, per_hour: int) -> list[RateWindow]:
    out = []
    if per_minute > 0:
        out.append(RateWindow(per_minute, 60, "minute"))
    if per_hour > 0:
        out.append(RateWindow(per_hour, 3600, "hour"))
    return out


# --------------------------------------------------------------------------- decisions


@dataclass
class RateDecision:
    """Outcome of one check. For an allowed request the figures are those of the most
    constraining window (fewest remaining); for a rejected one, of the window that rejected
    it (the one freeing up last when several are full)."""

    allowed: bool
    limit: int = 0  # requests per window (0: no limit applied)
    remaining: int = 0  # requests left in that window after this one
    reset_epoch_s: float = 0.0  # unix time at which the next slot of that window frees
    retry_after_s: int = 0  # whole seconds to wait (>= 1 when rejected, 0 when allowed)
    window: str = ""  # "minute", "hour", "<n>s"
    period_s: int = 0  # length of that window
    degraded: bool = False  # the limiter could not be asked (fail-open decision)
    windows: list[dict[str, Any]] = field(default_factory=list)  # per-window detail
    reason: str = "requests"  # what refused it: "requests", "tokens", "concurrency"
    scope: str = "client"  # whose budget: "client" (tenant, key or address) or "cluster"
    tokens_limit: int = 0  # token budget per minute applied (0: none)
    tokens_remaining: int = 0  # tokens left after this request's reservation
    tokens_reset_epoch_s: float = 0.0  # when the tokens counted now have left the window
    concurrency_limit: int = 0
    lease: str | None = None  # to give back with `RateLimiter.release` when the request ends
    never_fits: bool = False  # the request's max_tokens is over the whole per-minute budget
    epoch: str = ""  # the limiter actor incarnation that decided (a new one: it restarted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


UNLIMITED = RateDecision(allowed=True)

CLUSTER_KEY = "cluster:*"
TOKEN_WINDOW_S = 60


@dataclass(frozen=True)
class AdmitSpec:
    """One request's admission question: its client key, the client's budgets (request windows,
    tokens per minute, concurrency; 0: off) and the tokens it may use (`max_tokens` × n)."""

    key: str
    windows: tuple[RateWindow, ...] = ()
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    reserve_tokens: int = 0
    ttl_s: float = 600.0
    weight: int = 1  # fair-share weight: the tenant's priority + 1


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


# --------------------------------------------------------------------------- the actor


class RateLimiterActor:
    """Moving-window limits for many keys, all windows checked together. Plain class: create
    it with :func:`get_or_create_actor` (``ray.remote`` + named, detached, ``num_cpus=0``).

    Survives its own restart (``max_restarts=-1``): its configuration, windows, token logs,
    leases and counters are saved to Ray's GCS KV store (`ActorState`) at once on
    `configure` and otherwise every `SNAPSHOT_INTERVAL_S` while they change, and a restarted
    incarnation loads them (what changed in the last interval before the crash is lost: a
    few requests less counted, leases taken then expire). Lease ids carry the incarnation's
    random id, so a release of a lease the crash lost matches nothing."""

    SNAPSHOT_INTERVAL_S = 1.0

    def __init__(
        self, windows: Iterable[RateWindow | tuple[int, int]] | None = None, snapshot_interval_s: float | None = None
    ):
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self._mutex = threading.RLock()
        self._mutations = 0  # state changes so far (the snapshot thread saves when it moved)
        self._exported = 0
        self._state = ActorState("rate_limiter")
        self._storage = MemoryStorage()
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
        self._next_reap = 0.0
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

    @_locked
    def hit(self, key: str) -> RateDecision:
        """Count one request for `key` when every window has room; otherwise reject, consuming
        nothing."""
        if not self._items:
            return RateDecision(allowed=True)
        now = time.time()
        full = [i for i, item in enumerate(self._items) if not self._limiter.test(item, key)]
        if full:
            self.rejected_total += 1
            details = self._details(key, now)
            worst = max(full, key=lambda i: details[i]["reset_epoch_s"])
            d = details[worst]
            return RateDecision(
                allowed=False,
                limit=d["limit"],
                remaining=0,
                reset_epoch_s=d["reset_epoch_s"],
                retry_after_s=max(1, math.ceil(d["reset_epoch_s"] - now)),
                window=d["window"],
                period_s=d["period_s"],
                windows=details,
            )
        for item in self._items:
            self._limiter.hit(item, key)
        self.allowed_total += 1
        details = self._details(key, now)
        tight = min(range(len(details)), key=lambda i: (details[i]["remaining"], details[i]["period_s"]))
        d = details[tight]
        return RateDecision(
            allowed=True,
            limit=d["limit"],
            remaining=d["remaining"],
            reset_epoch_s=d["reset_epoch_s"],
            retry_after_s=0,
            window=d["window"],
            period_s=d["period_s"],
            windows=details,
        )

    def _details(self, key: str, now: float) -> list[dict[str, Any]]:
        return self._details_for(key, self._windows, now)

    def peek(self, key: str) -> list[dict[str, Any]]:
        """Window state for `key` without counting anything (tests, debugging)."""
        return self._details(key, time.time())

    @_locked
    def reset(self, key: str | None = None) -> None:
        """Forget one key's history, or every key's."""
        if key is None:
            self._storage.reset()
            return
        for item in self._items:
            self._limiter.clear(item, key)

    def counters(self) -> dict[str, int]:
        return {"allowed": self.allowed_total, "rejected": self.rejected_total}


# --------------------------------------------------------------------------- the client


class RateLimiter:
    """What an ingress replica holds: resolves (get-or-create) the shared actor lazily and
    asks it once per request. Cheap to construct; no Ray call until the first `check`."""

    def __init__(
        self,
        windows: Sequence[RateWindow],
        *,
        actor_name: str = "rate_limiter.llm",
        namespace: str = DEFAULT_NAMESPACE,
        timeout_s: float = 2.0,
        fail_open: bool = True,
        pin_to_head: bool = True,
        tokens_per_minute: int = 0,
        max_concurrent: int = 0,
        cluster: ClusterBudget | None = None,
        lease_ttl_s: float = 600.0,
        master: bool = True,
    ):
        self.windows = list(windows)
        self.master = master  # rate_limit.enabled: false turns every budget off, tenants' too
        self.tokens_per_minute = tokens_per_minute if master else 0
        self.max_concurrent = max_concurrent if master else 0
        self.cluster = (cluster or ClusterBudget()) if master else ClusterBudget()
        self.lease_ttl_s = lease_ttl_s
        by_period = {w.period_s: w.limit for w in self.windows}
        self.per_minute, self.per_hour = by_period.get(60, 0), by_period.get(3600, 0)
        self.actor_name = actor_name
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.fail_open = fail_open
        self.pin_to_head = pin_to_head
        self._handle: Any = None  # the Ray actor handle, once resolved
        self._configured = False
        self._connecting: asyncio.Task | None = None  # resolving + configuring, shared
        self._epoch: str | None = None  # the actor incarnation configured
        self._late_calls: set[asyncio.Future] = set()  # admits answered past their deadline
        self._last_warning = 0.0

    @classmethod
    def from_config(
        cls,
        cfg: RateLimitConfig | Mapping[str, Any] | None,
        app_name: str = "llm",
        env: Mapping[str, str] | None = None,
    ) -> RateLimiter:
        cfg = RateLimitConfig.model_validate(cfg or {})
        return cls(
            cfg.windows(env),
            actor_name=cfg.actor_name or f"rate_limiter.{app_name}",
            namespace=cfg.namespace,
            timeout_s=cfg.timeout_s,
            fail_open=cfg.fail_open,
            tokens_per_minute=cfg.tokens_per_minute,
            max_concurrent=cfg.max_concurrent,
            cluster=cfg.cluster,
            lease_ttl_s=cfg.lease_ttl_s,
            master=cfg.enabled,
        )

    @property
    def enabled(self) -> bool:
        """Some budget applies to every request (the defaults or the cluster's)."""
        return bool(self.windows or self.tokens_per_minute or self.max_concurrent or self.cluster.active)

    def applies(self, identity: Any = None) -> bool:
        """Some budget applies to a request of `identity` (an `auth.Identity` or None)."""
        if self.enabled:
            return True
        lim = getattr(identity, "limits", None)
        return bool(
            self.master
            and lim is not None
            and any(
                getattr(lim, f)
                for f in ("requests_per_minute", "requests_per_hour", "tokens_per_minute", "max_concurrent")
            )
        )

    def _budget(self, identity: Any, name: str, default: int) -> int:
        lim = getattr(identity, "limits", None)
        value = getattr(lim, name, None) if lim is not None else None
        return default if value is None else value

    def counts_tokens(self, identity: Any = None) -> bool:
        """A token budget applies: the request's `max_tokens` is needed up front."""
        return bool(
            self.master
            and (self.cluster.tokens_per_minute or self._budget(identity, "tokens_per_minute", self.tokens_per_minute))
        )

    def spec(self, client_key: str, identity: Any = None, reserve_tokens: int = 0) -> AdmitSpec:
        """The admission question for one request of `identity` (None: a key-less client,
        the default budgets) under the limiter key `client_key`."""
        if identity is not None:
            tenant = str(identity.tenant)
            client_key = tenant if tenant.startswith("key:") else "tenant:" + tenant
        lim = getattr(identity, "limits", None)
        if lim is None or (lim.requests_per_minute is None and lim.requests_per_hour is None):
            windows = list(self.windows)  # the service's default windows
        else:
            windows = make_windows(
                self._budget(identity, "requests_per_minute", self.per_minute),
                self._budget(identity, "requests_per_hour", self.per_hour),
            )
        tokens = self._budget(identity, "tokens_per_minute", self.tokens_per_minute)
        return AdmitSpec(
            key=client_key,
            windows=tuple(windows),
            tokens_per_minute=tokens,
            weight=max(1, int(getattr(identity, "priority", 0) or 0) + 1),
            max_concurrent=self._budget(identity, "max_concurrent", self.max_concurrent),
            reserve_tokens=reserve_tokens if (tokens or self.cluster.tokens_per_minute) else 0,
            ttl_s=self.lease_ttl_s,
        )

    def describe(self) -> dict[str, Any]:
        """For /health's limits report."""
        return {w.label(): w.limit for w in self.windows} if self.windows else {"enabled": False}

    def summary(self, per: str = "IP") -> str:
        """The replaced service's /health `limits.rate_limit` wording, for these windows:
        "10 requests/minute, 100 requests/hour per IP"; "disabled" without a window."""
        if not self.windows:
            return "disabled"
        return ", ".join(f"{w.limit} requests/{w.label()}" for w in self.windows) + f" per {per}"

    def _resolve(self):
        return get_or_create_actor(
            RateLimiterActor, self.actor_name, self.namespace, self.windows, pin_to_head=self.pin_to_head
        )

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Get-or-create the actor and push this deploy's windows, waiting until it answers.
        Call it once at replica start (an async ``__init__``, or before the first request) so
        the first requests do not pay for the actor's start-up — or, past `timeout_s` on a
        loaded cluster, get a fail-open decision. Raises when the actor cannot be reached."""
        if not self.enabled:
            return
        await asyncio.wait_for(self._actor(configure_timeout_s=timeout_s), timeout_s)

    async def _actor(self, configure_timeout_s: float | None = None):
        """The configured handle. Resolving and configuring run as one task shared by every
        caller, which a caller's deadline does not cancel (shielded): a request that gives up
        after `timeout_s` leaves it running, and the next request finds the actor ready."""
        if self._handle is not None and self._configured:
            return self._handle
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.get_running_loop().create_task(self._connect(configure_timeout_s))
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _connect(self, configure_timeout_s: float | None):
        try:
            handle = self._handle
            if handle is None:
                handle = self._handle = await asyncio.to_thread(self._resolve)
                self._configured = False
            limit = configure_timeout_s or max(10.0, self.timeout_s * 5)
            # The incarnation first: a restart after it shows in the next decision's epoch.
            # The first call also waits for a new actor's process to start.
            # (An actor of an older release, which kept running through an in-place upgrade,
            # has no `epoch`: no restart detection then, as before.)
            method = getattr(handle, "epoch", None)
            epoch = await asyncio.wait_for(_aw(method.remote()), limit) if method is not None else None
            # An existing actor (other replicas, an earlier deploy) takes this deploy's budgets.
            await asyncio.wait_for(_aw(handle.configure.remote(self.windows, self.cluster)), limit)
        except BaseException:
            self._handle, self._configured = None, False  # re-resolve next time
            raise
        self._handle, self._epoch, self._configured = handle, epoch, True
        return handle

    async def check(self, key: str, identity: Any = None, reserve_tokens: int = 0) -> RateDecision:
        """Admit one request of client `key` (of `identity`'s tenant when given, with its
        budgets; `reserve_tokens`: its max_tokens × n) cluster-wide; never raises for limiter
        trouble. Give `decision.lease` back with `release` when the request ends."""
        if not self.applies(identity):
            return UNLIMITED
        return await self.admit(self.spec(key, identity, reserve_tokens))

    async def admit(self, spec: AdmitSpec) -> RateDecision:
        """Ask the shared actor to admit one request (`RateLimiterActor.admit`); never raises
        for limiter trouble (fail open or closed). Everything — finding the actor, configuring
        it, its answer — within `timeout_s`. An answer that comes after that has its lease
        given back at once (the request went on without it), so a slow or restarting actor
        never leaves phantom requests in flight."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        call: asyncio.Future | None = None
        try:
            handle = await asyncio.wait_for(self._actor(), self.timeout_s)
            call = asyncio.ensure_future(_aw(handle.admit.remote(spec)))
            decision = await asyncio.wait_for(asyncio.shield(call), max(0.0, deadline - loop.time()))
        except TimeoutError as exc:
            if call is not None:
                self._late_calls.add(call)
                call.add_done_callback(functools.partial(self._release_late, handle))
            return self._degraded(exc)
        except actor_failure_types() as exc:
            self._handle, self._configured = None, False  # re-resolve next time (restarted actor)
            return self._degraded(exc)
        except Exception as exc:
            self._handle, self._configured = None, False
            return self._degraded(exc)
        if decision.epoch and self._epoch and decision.epoch != self._epoch:
            # Ray restarted the actor: it restored its snapshot; push this deploy's budgets
            # again anyway (cheap, and right even if the snapshot could not be read).
            logger.warning("rate limiter actor restarted (%s → %s); configuring it again", self._epoch, decision.epoch)
            self._epoch, self._configured = decision.epoch, False
        return decision

    def _release_late(self, handle: Any, call: asyncio.Future) -> None:
        """An admit answered after its deadline: give its lease back to the actor that took it."""
        self._late_calls.discard(call)
        if call.cancelled() or call.exception() is not None:
            return
        lease = getattr(call.result(), "lease", None)
        if lease:
            try:
                handle.release.remote(lease, 0)
            except Exception as exc:
                logger.debug("rate limiter release failed: %s", exc)

    def release(self, lease: str | None, tokens: int | None) -> None:
        """Give a lease back (fire and forget: the response is not held for it). A lost call
        is repaired by the lease's expiry (`lease_ttl_s`)."""
        if not lease or self._handle is None:
            return
        try:
            self._handle.release.remote(lease, tokens)
        except Exception as exc:  # the actor restarting: its leases are gone with it
            logger.debug("rate limiter release failed: %s", exc)

    def _degraded(self, exc: BaseException) -> RateDecision:
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            logger.warning(
                "rate limiter unavailable (%s: %s); failing %s",
                type(exc).__name__,
                exc,
                "open" if self.fail_open else "closed",
            )
        return RateDecision(allowed=self.fail_open, degraded=True, retry_after_s=0 if self.fail_open else 1)

    @staticmethod
    def headers(decision: RateDecision, now: float | None = None) -> dict[str, str]:
        """Response headers whenever a limit applied:

        * OpenAI's: `x-ratelimit-limit-requests`, `-remaining-requests`, `-reset-requests`
          (a duration, "6s", "1m0s") for the tightest request window, and the same trio with
          `-tokens` for the tightest token budget;
        * `X-RateLimit-Limit/Remaining/Reset` (reset as unix epoch seconds, GitHub's
          convention) for the tightest request window;
        * `Retry-After` on a rejection.
        """
        now = time.time() if now is None else now
        out: dict[str, str] = {}
        if decision.limit and decision.reason == "requests":
            out["X-RateLimit-Limit"] = str(decision.limit)
            out["X-RateLimit-Remaining"] = str(max(0, decision.remaining))
            out["X-RateLimit-Reset"] = str(math.ceil(decision.reset_epoch_s))
            out["x-ratelimit-limit-requests"] = str(decision.limit)
            out["x-ratelimit-remaining-requests"] = str(max(0, decision.remaining))
            out["x-ratelimit-reset-requests"] = openai_duration(decision.reset_epoch_s - now)
        if decision.tokens_limit:
            out["x-ratelimit-limit-tokens"] = str(decision.tokens_limit)
            out["x-ratelimit-remaining-tokens"] = str(max(0, decision.tokens_remaining))
            out["x-ratelimit-reset-tokens"] = openai_duration(decision.tokens_reset_epoch_s - now)
        if not decision.allowed:
            out["Retry-After"] = str(max(1, decision.retry_after_s))
        return out


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "6s", "1m0s", "1h2m3s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


async def _aw(ref):
    return await ref


def _retrieve(task: asyncio.Future) -> None:
    """Done callback: mark a shared task's exception as seen (its callers got it)."""
    if not task.cancelled():
        task.exception()


def rate_limited_error(decision: RateDecision):
    """The 429 (or, for a fail-closed limiter outage, 503) as an OpenAI error with headers."""
    from deployments.api.errors import APIError

    headers = RateLimiter.headers(decision)
    if decision.degraded:
        return APIError(
            503,
            "Rate limiter unavailable; retry shortly.",
            code="rate_limiter_unavailable",
            headers={"Retry-After": "1"},
        )
    whose = "the service's (all clients)" if decision.scope == "cluster" else "your"
    if decision.reason == "tokens":
        if decision.never_fits:
            return APIError(
                429,
                f"Rate limit exceeded: this request's max_tokens is more than {whose} whole budget "
                f"of {decision.tokens_limit} tokens per minute; lower max_tokens.",
                param="max_tokens",
                code="tokens_budget_exceeded",
                headers=headers,
            )
        return APIError(
            429,
            f"Rate limit exceeded: {whose} budget of {decision.tokens_limit} tokens per minute has "
            f"{decision.tokens_remaining} left, less than this request's max_tokens. Retry after "
            f"{max(1, decision.retry_after_s)} s or lower max_tokens.",
            param="max_tokens",
            code="tokens_rate_limit_exceeded",
            headers=headers,
        )
    if decision.reason == "fair_share":
        return APIError(
            429,
            f"Rate limit exceeded: the service is busy and you hold your fair share "
            f"({decision.concurrency_limit} concurrent requests) of it. Retry after 1 s.",
            code="fair_share_exceeded",
            headers=headers,
        )
    if decision.reason == "concurrency":
        return APIError(
            429,
            f"Rate limit exceeded: {whose} limit of {decision.concurrency_limit} concurrent requests "
            "is reached. Retry after 1 s.",
            code="concurrency_limit_exceeded",
            headers=headers,
        )
    if decision.scope == "cluster":
        return APIError(
            429,
            f"Rate limit exceeded: the service's budget of {decision.limit} requests per "
            f"{decision.window} (all clients) is spent. Retry after {max(1, decision.retry_after_s)} s.",
            code="rate_limit_exceeded",
            headers=headers,
        )
    return APIError(
        429,
        f"Rate limit exceeded: {decision.limit} requests per {decision.window}. "
        f"Retry after {max(1, decision.retry_after_s)} s.",
        code="rate_limit_exceeded",
        headers=headers,
    )


# --------------------------------------------------------------------------- client keys


@lru_cache(maxsize=256)
def _parse_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        raise ValueError(f"trusted proxy {entry!r} is not an IP address or CIDR") from None


@lru_cache(maxsize=64)
def _networks(entries: tuple[str, ...]) -> tuple:
    return tuple(_parse_network(e) for e in entries)


def _normalize_addr(raw: str | None) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """(canonical text, parsed address or None) for a peer / X-Forwarded-For hop."""
    s = (raw or "").strip().strip('"').strip()
    if not s:
        return "unknown", None
    host = s
    if host.startswith("["):  # "[v6]" or "[v6]:port"
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:  # "v4:port"
        host = host.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return s.lower()[:64], None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), ip


def _trusted(ip, nets) -> bool:
    return ip is not None and any(ip.version == n.version and ip in n for n in nets)


def hash_api_key(api_key: str) -> str:
    """Stable, non-reversible id of an API key (raw keys are never stored or logged)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:32]


def client_key(
    api_key: str | None, client_host: str | None, forwarded_for: str | None, trusted_proxies: Sequence[str] = ()
) -> str:
    """The rate-limit key of a request.

    * ``key:<sha256 prefix>`` when an API key was presented (one budget per key, whatever the
      address);
    * else ``ip:<address>`` of the client. ``X-Forwarded-For`` is honoured only when the direct
      peer is a trusted proxy: its hops are read right to left, skipping trusted proxies, and
      the first untrusted hop is the client (a client cannot spoof its way past the proxy
      that appended its real address). When every hop is trusted, the left-most is used.
    """
    if api_key:
        return "key:" + hash_api_key(api_key)
    text, ip = _normalize_addr(client_host)
    nets = _networks(tuple(trusted_proxies)) if trusted_proxies else ()
    if forwarded_for and nets and _trusted(ip, nets):
        hops = [h for h in (p.strip() for p in forwarded_for.split(",")) if h]
        chosen = None
        for hop in reversed(hops):
            hop_text, hop_ip = _normalize_addr(hop)
            if not _trusted(hop_ip, nets):
                chosen = hop_text
                break
        if chosen is None and hops:
            chosen = _normalize_addr(hops[0])[0]
        if chosen:
            text = chosen
    return "ip:" + text
