"""Admission in front of the OpenAI routes, as one pure ASGI middleware (no per-chunk cost on
streams): request-body size (413), API-key auth (401) and the cluster-wide per-client rate
limit (429 with `Retry-After` and `X-RateLimit-*`). It runs before FastAPI parses the body,
so a client over its limit or without a key is turned away before any work is done.

The ingress replica puts its `Admission` (its `ApiKeyAuth`, `RateLimiter` and
`StatsRecorder`) on the FastAPI app Serve runs, as `app.state.admission`, once it is built
(`IngressRouter.__serve_build_asgi_app__`); the middleware reads it from the request's app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deployments.admission.auth import ApiKeyAuth
from deployments.admission.client_address import ClientAddress
from deployments.api.errors import APIError, route_path
from deployments.admission.rate_limit import RateLimiter, client_key, rate_limited_error

# Routes that cost model time: counted against the client's rate limit.
RATE_LIMITED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/classify"})


@dataclass
class Admission:
    auth: ApiKeyAuth
    limiter: RateLimiter
    trusted_proxies: list[str]
    max_request_bytes: int
    client_address: ClientAddress = field(default_factory=lambda: ClientAddress(fast_path=False))
    stats: Any = None  # StatsRecorder
    public_paths: frozenset[str] = field(default_factory=lambda: frozenset({"/health"}))


class AdmissionMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        adm: Admission | None = getattr(getattr(scope.get("app"), "state", None), "admission", None)
        path = route_path(scope)
        if adm is None or path in adm.public_paths:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        try:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > adm.max_request_bytes:
                raise APIError(413, f"Request body of {length} bytes is over the limit of "
                               f"{adm.max_request_bytes} bytes.", code="request_too_large")
            key = adm.auth.check(headers.get("authorization"))
            extra_headers: dict[str, str] = {}
            if path in RATE_LIMITED_PATHS and adm.limiter.enabled and scope.get("method") == "POST":
                client = scope.get("client")
                peer = adm.client_address.peer(client[0] if client else None, headers)
                ck = client_key(key, peer, _forwarded_for(scope), adm.trusted_proxies)
                decision = await adm.limiter.check(ck)
                if not decision.allowed:
                    raise rate_limited_error(decision)
                extra_headers = RateLimiter.headers(decision)
        except APIError as exc:
            if adm.stats is not None:
                adm.stats.record_rejection(path if path in RATE_LIMITED_PATHS else "other", exc.status, exc.code)
            return await exc.response()(scope, receive, send)

        if "content-length" not in headers:
            receive = await _buffer_body(receive, adm.max_request_bytes)
            if receive is None:
                exc = APIError(413, f"Request body is over the limit of {adm.max_request_bytes} bytes.",
                               code="request_too_large")
                if adm.stats is not None:
                    adm.stats.record_rejection(path if path in RATE_LIMITED_PATHS else "other", 413, exc.code)
                return await exc.response()(scope, _no_body, send)
        if not extra_headers:
            return await self.app(scope, receive, send)
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra_headers.items()]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + raw}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def _forwarded_for(scope) -> str | None:
    """Every `X-Forwarded-For` line of the request, in order, as one list (a proxy may add its
    own line rather than extend the client's)."""
    lines = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"x-forwarded-for"]
    return ", ".join(lines) if lines else None


async def _no_body():
    return {"type": "http.request", "body": b"", "more_body": False}


async def _buffer_body(receive, limit: int):
    """A body without Content-Length (chunked): read it up to `limit` bytes; None when over,
    else a `receive` that replays it."""
    messages, seen = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        seen += len(message.get("body", b""))
        if seen > limit:
            return None
        if not message.get("more_body"):
            break

    async def replay():
        return messages.pop(0) if messages else await receive()

    return replay
