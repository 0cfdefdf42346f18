"""What a client sees of the rate limits: the headers of every answer a limit applied to
(OpenAI's `x-ratelimit-*`, `X-RateLimit-*`, `Retry-After`) and the 429 (or a fail-closed
limiter's 503) as an OpenAI error."""

from __future__ import annotations

import math
import time

from deployments.admission.limits import RateDecision


def rate_limit_headers(decision: RateDecision, now: float | None = None) -> dict[str, str]:
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


def rate_limited_error(decision: RateDecision):
    """The 429 (or, for a fail-closed limiter outage, 503) as an OpenAI error with headers."""
    from deployments.api.errors import APIError

    headers = rate_limit_headers(decision)
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
