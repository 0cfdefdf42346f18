"""Admission in front of the OpenAI routes, as one pure ASGI middleware: request-body size
(413) and its arrival in time (408: a stalled client frees its slot), API-key auth (401), the admin role on admin paths (403) and the cluster-wide budgets of
the client's tenant and of the whole service (429 with `Retry-After`, OpenAI's
`x-ratelimit-*-requests` / `-tokens` headers and `X-RateLimit-*`). It runs before FastAPI
parses the body, so a client over its budget or without a key is turned away before any work
is done. When a token budget applies it reads the body's `max_tokens` (and `n`) to reserve
them, and charges the response's `usage` when the request ends (streams: the usage chunk when
`stream_options.include_usage` asked for one, else the reservation); no per-chunk cost
otherwise. The verified `Identity` is left in `scope["state"]["identity"]` for the routes
(`/health` shows its details to admins).

The ingress replica puts its `Admission` (its `ApiKeyAuth`, `RateLimiter` and
`StatsRecorder`) on the FastAPI app Serve runs, as `app.state.admission`, once it is built
(`IngressRouter.__serve_build_asgi_app__`); the middleware reads it from the request's app.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from deployments.admission.auth import ApiKeyAuth, Identity
from deployments.admission.capacity import Tenant
from deployments.admission.client_address import ClientAddress, client_key
from deployments.admission.limit_responses import rate_limit_headers, rate_limited_error
from deployments.admission.rate_limit import RateLimiter
from deployments.api.errors import APIError, body_timed_out, overloaded, route_path

logger = logging.getLogger("ray.serve")

# Routes that cost model time: counted against the client's rate limit.
RATE_LIMITED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/classify"})


@dataclass
class Admission:
    auth: ApiKeyAuth
    limiter: RateLimiter
    trusted_proxies: list[str]
    max_request_bytes: int
    client_address: ClientAddress = field(default_factory=lambda: ClientAddress(fast_path=False))
    stats: Any = None  # StatsRecorder
    # the ingress's capacity gate: a request it would refuse anyway gets its 503 here, unparsed
    capacity: Any = None  # ModelCapacity
    retry_after_s: float = 1.0
    # a request body must arrive within this many seconds of the headers (None: no limit)
    body_timeout_s: float | None = None
    public_paths: frozenset[str] = field(default_factory=lambda: frozenset({"/health"}))
    # the most a request's choice is served (limits.max_tokens_cap): more is clamped or refused,
    # so a token budget never reserves more (None: no cap)
    max_tokens_cap: int | None = None
    # `max_tokens` when a request omits it, per path (the reservation of a token budget)
    default_max_tokens: dict[str, int] = field(
        default_factory=lambda: {"/v1/chat/completions": 100, "/v1/completions": 16, "/v1/classify": 1}
    )


def identity_of(scope) -> Identity | None:
    """The verified key's identity the middleware left on the request (None: no key / auth off)."""
    return (scope.get("state") or {}).get("identity")


def is_admin(scope, auth: ApiKeyAuth) -> bool:
    """The request carried an admin key — with auth on or off (as the admin routes: with auth
    off an anonymous caller is no admin, so `/health`'s details need an admin key too)."""
    ident = identity_of(scope)
    return ident is not None and ident.is_admin


class AdmissionMiddleware:
    """Each request, in order: public paths (identity only, never refused) — the declared body
    size — the key and its role (`_identify`) — for the budgeted routes, who it is for
    (`_tenant`), its budgets (`_admit`) and the capacity gate's quick 503 — the body's arrival
    (`_receive_body`) — the app, with the rate-limit headers and the usage charged back
    (`_respond`). A refusal is an OpenAI error, counted, before the route runs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        adm: Admission | None = getattr(getattr(scope.get("app"), "state", None), "admission", None)
        if scope["type"] != "http" or adm is None:
            return await self.app(scope, receive, send)
        path = route_path(scope)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        state = scope.setdefault("state", {})
        if path in adm.public_paths:
            ident = adm.auth.identify_quietly(headers.get("authorization"))
            if ident is not None:
                state["identity"] = ident
            return await self.app(scope, receive, send)
        budgeted = path in RATE_LIMITED_PATHS and scope.get("method") == "POST"
        decision = None
        try:
            _check_declared_size(adm, headers)
            ident = _identify(adm, path, headers)
            if ident is not None:
                state["identity"] = ident
            if budgeted:
                state["tenant"] = tenant = _tenant(adm, scope, headers, ident)
                receive, decision = await _admit(adm, path, ident, tenant, receive)
                if adm.capacity is not None and adm.capacity.refuses(tenant.key, tenant.weight):
                    if decision is not None and decision.lease:
                        adm.limiter.release(decision.lease, 0)
                    raise overloaded(adm.retry_after_s, max_queue_size=adm.capacity.max_queued)
        except APIError as exc:
            _count(adm, path, exc)
            return await exc.response()(scope, receive if receive is not None else _no_body, send)
        lease = decision.lease if decision is not None else None
        receive, refusal = await _receive_body(adm, scope, headers, receive)
        if refusal is not None:
            _count(adm, path, refusal)
            if lease:
                adm.limiter.release(lease, 0)
            return await refusal.response()(scope, _no_body, send)
        extra = rate_limit_headers(decision) if decision is not None else {}
        return await _respond(self.app, adm, scope, receive, send, extra, lease)


def _count(adm: Admission, path: str, refusal: APIError) -> None:
    if adm.stats is not None:
        adm.stats.record_rejection(path if path in RATE_LIMITED_PATHS else "other", refusal.status, refusal.code)


def _too_large(adm: Admission, length: str | None = None) -> APIError:
    size = f"of {length} bytes " if length is not None else ""
    return APIError(
        413, f"Request body {size}is over the limit of {adm.max_request_bytes} bytes.", code="request_too_large"
    )


def _check_declared_size(adm: Admission, headers: dict[str, str]) -> None:
    """413 for a `Content-Length` over `max_request_bytes`, before a byte of the body is read."""
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > adm.max_request_bytes:
        raise _too_large(adm, length)


def _identify(adm: Admission, path: str, headers: dict[str, str]) -> Identity | None:
    """The key's identity (None: auth off and no admin path). Admin paths need an admin key on
    every bind, auth on or off (401/403); other paths a valid key when auth is on (401)."""
    if path in adm.auth.admin_paths:
        return adm.auth.admin_identity(headers.get("authorization"), path)
    return adm.auth.identify(headers.get("authorization"))


def _tenant(adm: Admission, scope, headers: dict[str, str], ident: Identity | None) -> Tenant:
    """Who the request is for — its limiter key and fair-queueing key: the key's tenant (plain
    keys are tenants `key:<digest prefix>`), else the client's address as `client_address`
    decides it (a trusted proxy's `X-Forwarded-For`, our HAProxy's vouched header)."""
    if ident is not None:
        key = ident.tenant if ident.tenant.startswith("key:") else "tenant:" + ident.tenant
        return Tenant(key, max(1, ident.priority + 1), ident.priority)
    client = scope.get("client")
    forwarded = _forwarded_for(scope)
    peer = adm.client_address.peer(client[0] if client else None, headers, client[1] if client else None, forwarded)
    return Tenant(client_key(None, peer, forwarded, adm.trusted_proxies))


async def _admit(adm: Admission, path: str, ident: Identity | None, tenant: Tenant, receive):
    """(receive, the limiter's decision or None when no budget applies); raises the 429 (or a
    fail-closed limiter's 503). When a token budget applies, the body is read first (within
    `body_timeout_s`, at most `max_request_bytes`) for the `max_tokens` × `n` to reserve."""
    if not (adm.limiter.enabled or has_own_budgets(ident)):
        return receive, None
    reserve = 0
    if getattr(adm.limiter, "counts_tokens", _no_tokens)(ident):
        try:
            receive = await _buffer_body(receive, adm.max_request_bytes, adm.body_timeout_s)
        except TimeoutError:
            raise body_timed_out(adm.body_timeout_s) from None
        if receive is None:
            raise _too_large(adm)
        reserve = _reservation(await _peek_body(receive), adm.default_max_tokens.get(path, 1), adm.max_tokens_cap)
    if not reserve and (ident is None or ident.limits is None):
        decision = await adm.limiter.check(tenant.key)  # the service's default budgets
    else:
        decision = await adm.limiter.check(tenant.key, ident, reserve)
    if not decision.allowed:
        raise rate_limited_error(decision)
    return receive, decision


async def _receive_body(adm: Admission, scope, headers: dict[str, str], receive):
    """(receive, refusal or None): a body without `Content-Length` (chunked, whose size is known
    only once read), or any body when `body_timeout_s` is set, is read here first — 413 past
    `max_request_bytes`, 408 when it has not arrived in time (a stalled client frees its slot)."""
    if getattr(receive, "buffered", False):
        return receive, None
    has_body = scope.get("method") in _BODY_METHODS
    if "content-length" in headers and not (has_body and adm.body_timeout_s):
        return receive, None
    try:
        buffered = await _buffer_body(receive, adm.max_request_bytes, adm.body_timeout_s)
    except TimeoutError:
        return receive, body_timed_out(adm.body_timeout_s)
    if buffered is None:
        return receive, _too_large(adm)
    return buffered, None


async def _respond(app, adm: Admission, scope, receive, send, extra: dict[str, str], lease: str | None):
    """Run the app; the rate-limit headers go on its response, and with a lease the response's
    `usage` (or, without one, the reservation) is charged back when it ends."""
    if not extra and not lease:
        return await app(scope, receive, send)
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    meter = _UsageMeter() if lease else None

    async def send_with_headers(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", [])) + raw}
            if meter is not None:
                meter.start(message)
        elif meter is not None and message["type"] == "http.response.body":
            meter.body(message.get("body", b""))
        await send(message)

    if lease is None or meter is None:
        return await app(scope, receive, send_with_headers)
    try:
        return await app(scope, receive, send_with_headers)
    finally:
        adm.limiter.release(lease, meter.tokens())


def has_own_budgets(ident: Identity | None) -> bool:
    """The key's tenant sets a budget of its own (it applies even with no default budget)."""
    lim = getattr(ident, "limits", None)
    return lim is not None and any(
        getattr(lim, f) for f in ("requests_per_minute", "requests_per_hour", "tokens_per_minute", "max_concurrent")
    )


def _no_tokens(_ident) -> bool:
    return False


def _reservation(body: bytes, default_max_tokens: int, cap: int | None = None) -> int:
    """Tokens a request may use: `max_completion_tokens` or `max_tokens` (else the route's
    default), at most `cap` (`limits.max_tokens_cap`: `max_tokens_over_cap: clamp` serves no
    more, `refuse` answers 400), times `n`; a body that is not a JSON object reserves the default
    (the route will refuse it anyway)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return default_max_tokens
    if not isinstance(doc, dict):
        return default_max_tokens
    mt = doc.get("max_completion_tokens")
    if mt is None:
        mt = doc.get("max_tokens")
    if mt is None:
        mt = doc.get("max_output_tokens")  # the Responses API's
    n = doc.get("n")
    mt = mt if isinstance(mt, int) and not isinstance(mt, bool) and mt > 0 else default_max_tokens
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    if cap is not None:
        mt = min(mt, cap)
    return mt * n


class _UsageMeter:
    """The `usage.total_tokens` a response reports: the JSON body's, or an SSE stream's last
    usage object; None when there is none (e.g. a stream without `include_usage`)."""

    def __init__(self):
        self.kind = ""
        self.status = 0
        self._json = bytearray()
        self._usage: int | None = None
        self._tail = b""

    def start(self, message) -> None:
        self.status = message.get("status", 0)
        for k, v in message.get("headers", ()):
            if k.lower() == b"content-type":
                self.kind = "sse" if b"event-stream" in v else ("json" if b"json" in v else "")

    def body(self, chunk: bytes) -> None:
        if self.kind == "json":
            if len(self._json) < (1 << 22):
                self._json += chunk
        elif self.kind == "sse":
            data = self._tail + chunk
            lines = data.split(b"\n")
            self._tail = lines.pop()[-(1 << 16) :]  # an unfinished line waits for the next chunk
            for line in lines:
                if line.startswith(b"data: {") and b'"usage"' in line:
                    self._usage = _total_tokens(line[6:]) or self._usage

    def tokens(self) -> int | None:
        if self.status >= 400:
            return 0  # refused or failed before any answer: no tokens charged
        if self.kind == "json":
            return _total_tokens(bytes(self._json))
        return self._usage


def _total_tokens(raw: bytes) -> int | None:
    try:
        doc = json.loads(raw)
        usage = doc.get("usage")
        if usage is None and isinstance(doc.get("response"), dict):  # a Responses API stream event
            usage = doc["response"].get("usage")
    except (ValueError, AttributeError, RecursionError):
        return None
    if isinstance(usage, dict):
        total = usage.get("total_tokens")
        if isinstance(total, int):
            return total
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(p, int):
            return p + (c if isinstance(c, int) else 0)
    return None


def _forwarded_for(scope) -> str | None:
    """Every `X-Forwarded-For` line of the request, in order, as one list (a proxy may add its
    own line rather than extend the client's)."""
    lines = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"x-forwarded-for"]
    return ", ".join(lines) if lines else None


async def _no_body():
    return {"type": "http.request", "body": b"", "more_body": False}


async def _peek_body(receive) -> bytes:
    """The whole body a `_buffer_body` replay holds (without consuming it)."""
    return b"".join(m.get("body", b"") for m in receive.messages if m["type"] == "http.request")


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def _buffer_body(receive, limit: int, timeout_s: float | None = None):
    """Read the body up to `limit` bytes; None when over, else a `receive` that replays it.
    TimeoutError when the whole body has not arrived within `timeout_s` (a stalled client)."""
    messages, seen = [], 0
    deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
    while True:
        if deadline is None:
            message = await receive()
        else:
            async with asyncio.timeout_at(deadline):
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

    replay.messages = list(messages)  # type: ignore[attr-defined]
    replay.buffered = True  # type: ignore[attr-defined]
    return replay
