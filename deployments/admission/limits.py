"""Rate-limit configuration and the limiter's vocabulary, a leaf the config, the limiter actor
and its client import: the config models (the environment overrides `RATE_LIMIT_PER_MINUTE` /
`RATE_LIMIT_PER_HOUR`, read once at start: an unset or empty variable keeps the configured value,
0 turns that window off), request windows, one request's admission question (`AdmitSpec`) and
the answer (`RateDecision`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.actors import DEFAULT_NAMESPACE
from deployments.admission.client_address import parse_network

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
            parse_network(entry)
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
