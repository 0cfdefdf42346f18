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
import hashlib
import ipaddress
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.actors import DEFAULT_NAMESPACE, actor_failure_types, get_or_create_actor

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
    actor_name: str | None = Field(
        None, description="Name of the limiter actor; default `rate_limiter.<app name>`."
    )
    namespace: str = Field(DEFAULT_NAMESPACE, description="Ray namespace of the limiter actor.")

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, v: list[str]) -> list[str]:
        for entry in v:
            _parse_network(entry)
        return v

    def windows(self, env: Mapping[str, str] | None = None) -> list["RateWindow"]:
        """The active windows after environment overrides (empty: limiting off)."""
        if not self.enabled:
            return []
        per_minute, per_hour = effective_limits(self.per_minute, self.per_hour,
                                                os.environ if env is None else env)
        return make_windows(per_minute, per_hour)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


UNLIMITED = RateDecision(allowed=True)


# --------------------------------------------------------------------------- the actor


class RateLimiterActor:
    """Moving-window limits for many keys, all windows checked together. Plain class: create
    it with :func:`get_or_create_actor` (``ray.remote`` + named, detached, ``num_cpus=0``)."""

    def __init__(self, windows: Iterable[RateWindow | tuple[int, int]] | None = None):
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self._storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._windows: list[RateWindow] = []
        self._items: list[Any] = []
        self.allowed_total = 0
        self.rejected_total = 0
        self.configure(list(windows) if windows is not None else make_windows(10, 100))

    def configure(self, windows: Iterable[RateWindow | tuple[int, int]]) -> list[dict[str, Any]]:
        """Replace the window set. Windows whose (limit, period) are unchanged keep their state
        (the ``limits`` storage key depends only on those)."""
        from limits import RateLimitItemPerSecond

        ws = [w if isinstance(w, RateWindow) else RateWindow(int(w[0]), int(w[1])) for w in windows]
        for w in ws:
            if w.limit < 1 or w.period_s < 1:
                raise ValueError(f"invalid window {w}: limit and period must be >= 1")
        self._windows = ws
        self._items = [RateLimitItemPerSecond(w.limit, w.period_s) for w in ws]
        return [asdict(w) for w in ws]

    def windows(self) -> list[dict[str, Any]]:
        return [asdict(w) for w in self._windows]

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
                allowed=False, limit=d["limit"], remaining=0, reset_epoch_s=d["reset_epoch_s"],
                retry_after_s=max(1, math.ceil(d["reset_epoch_s"] - now)), window=d["window"],
                period_s=d["period_s"], windows=details,
            )
        for item in self._items:
            self._limiter.hit(item, key)
        self.allowed_total += 1
        details = self._details(key, now)
        tight = min(range(len(details)), key=lambda i: (details[i]["remaining"], details[i]["period_s"]))
        d = details[tight]
        return RateDecision(
            allowed=True, limit=d["limit"], remaining=d["remaining"], reset_epoch_s=d["reset_epoch_s"],
            retry_after_s=0, window=d["window"], period_s=d["period_s"], windows=details,
        )

    def _details(self, key: str, now: float) -> list[dict[str, Any]]:
        out = []
        for w, item in zip(self._windows, self._items):
            stats = self._limiter.get_window_stats(item, key)
            remaining = max(0, int(stats.remaining))
            # `reset_time` is when the oldest request in the window leaves it; with nothing in
            # the window it is "now + period".
            reset = float(stats.reset_time) if remaining < w.limit else now + w.period_s
            out.append({"window": w.label(), "limit": w.limit, "period_s": w.period_s,
                        "remaining": remaining, "reset_epoch_s": reset})
        return out

    def peek(self, key: str) -> list[dict[str, Any]]:
        """Window state for `key` without counting anything (tests, debugging)."""
        return self._details(key, time.time())

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

    def __init__(self, windows: Sequence[RateWindow], *, actor_name: str = "rate_limiter.llm",
                 namespace: str = DEFAULT_NAMESPACE, timeout_s: float = 2.0, fail_open: bool = True,
                 pin_to_head: bool = True):
        self.windows = list(windows)
        self.actor_name = actor_name
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.fail_open = fail_open
        self.pin_to_head = pin_to_head
        self._handle = None
        self._configured = False
        self._lock: asyncio.Lock | None = None
        self._last_warning = 0.0

    @classmethod
    def from_config(cls, cfg: RateLimitConfig | Mapping[str, Any] | None, app_name: str = "llm",
                    env: Mapping[str, str] | None = None) -> "RateLimiter":
        cfg = RateLimitConfig.model_validate(cfg or {})
        return cls(cfg.windows(env), actor_name=cfg.actor_name or f"rate_limiter.{app_name}",
                   namespace=cfg.namespace, timeout_s=cfg.timeout_s, fail_open=cfg.fail_open)

    @property
    def enabled(self) -> bool:
        return bool(self.windows)

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
        return get_or_create_actor(RateLimiterActor, self.actor_name, self.namespace, self.windows,
                                   pin_to_head=self.pin_to_head)

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Get-or-create the actor and push this deploy's windows, waiting until it answers.
        Call it once at replica start (an async ``__init__``, or before the first request) so
        the first requests do not pay for the actor's start-up — or, past `timeout_s` on a
        loaded cluster, get a fail-open decision. Raises when the actor cannot be reached."""
        if not self.windows:
            return
        await asyncio.wait_for(self._actor(configure_timeout_s=timeout_s), timeout_s)

    async def _actor(self, configure_timeout_s: float | None = None):
        if self._handle is not None and self._configured:
            return self._handle
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._handle is None:
                self._handle = await asyncio.to_thread(self._resolve)
                self._configured = False
            if not self._configured:
                # An existing actor (other replicas, an earlier deploy) takes this deploy's
                # windows. The first call also waits for a new actor's process to start.
                await asyncio.wait_for(_aw(self._handle.configure.remote(self.windows)),
                                       configure_timeout_s or max(10.0, self.timeout_s * 5))
                self._configured = True
        return self._handle

    async def check(self, key: str) -> RateDecision:
        """Count one request for `key` cluster-wide; never raises for limiter trouble."""
        if not self.windows:
            return UNLIMITED
        try:
            handle = await self._actor()
            return await asyncio.wait_for(_aw(handle.hit.remote(key)), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            return self._degraded(exc)
        except actor_failure_types() as exc:
            self._handle, self._configured = None, False  # re-resolve next time (restarted actor)
            return self._degraded(exc)
        except Exception as exc:  # GCS hiccup while resolving, etc.
            self._handle, self._configured = None, False
            return self._degraded(exc)

    def _degraded(self, exc: BaseException) -> RateDecision:
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            logger.warning("rate limiter unavailable (%s: %s); failing %s", type(exc).__name__, exc,
                           "open" if self.fail_open else "closed")
        return RateDecision(allowed=self.fail_open, degraded=True,
                            retry_after_s=0 if self.fail_open else 1)

    @staticmethod
    def headers(decision: RateDecision) -> dict[str, str]:
        """Response headers: `X-RateLimit-Limit/Remaining/Reset` (reset as unix epoch seconds,
        GitHub's convention) whenever a limit applied, plus `Retry-After` on a rejection."""
        out: dict[str, str] = {}
        if decision.limit:
            out["X-RateLimit-Limit"] = str(decision.limit)
            out["X-RateLimit-Remaining"] = str(max(0, decision.remaining))
            out["X-RateLimit-Reset"] = str(math.ceil(decision.reset_epoch_s))
        if not decision.allowed:
            out["Retry-After"] = str(max(1, decision.retry_after_s))
        return out


async def _aw(ref):
    return await ref


def rate_limited_error(decision: RateDecision):
    """The 429 (or, for a fail-closed limiter outage, 503) as an OpenAI error with headers."""
    from deployments.api.errors import APIError

    headers = RateLimiter.headers(decision)
    if decision.degraded:
        return APIError(503, "Rate limiter unavailable; retry shortly.", code="rate_limiter_unavailable",
                        headers={"Retry-After": "1"})
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


def client_key(api_key: str | None, client_host: str | None, forwarded_for: str | None,
               trusted_proxies: Sequence[str] = ()) -> str:
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
