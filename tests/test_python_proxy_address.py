"""A forged `X-Forwarded-For` on Serve's Python proxy (`serve run configs/serve_config.yaml`
typed by hand, no `FORWARDED_ALLOW_IPS=`): Ray 2.60 starts the proxy's uvicorn with
`proxy_headers` on and uvicorn's default trusted peers (127.0.0.1, ::1), so a loopback client's
header replaces the ASGI client before the ingress sees the request. The ingress undoes it
(`ClientAddress.peer`): forged addresses share the loopback client's budget, and
`rate_limit.trusted_proxies` alone decides whether the header is believed.

In process through uvicorn's own ProxyHeadersMiddleware (what Serve's proxy runs), and end to end
on the session cluster's Python proxy: 12 requests with 12 forged addresses → 10 × 200 + 2 × 429.
"""

from __future__ import annotations

import asyncio
import collections
import os

import httpx
import pytest

from deployments.admission.client_address import UVICORN_DEFAULT_FORWARDED_ALLOW_IPS, ClientAddress, client_key
from deployments.admission.middleware import _forwarded_for

MODEL = "tiny-qwen3"


def through_uvicorn(peer: tuple[str, int], forwarded: list[str], trusted_proxies=(), allow=None) -> str:
    """The rate-limit key of a request from `peer` with these `X-Forwarded-For` lines, after
    uvicorn's ProxyHeadersMiddleware (FORWARDED_ALLOW_IPS `allow`, default uvicorn's) rewrote
    its scope as Serve's proxy does, decided as the admission middleware decides it."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    allow = UVICORN_DEFAULT_FORWARDED_ALLOW_IPS if allow is None else allow
    address = ClientAddress(fast_path=False, uvicorn_forwarding=allow or UVICORN_DEFAULT_FORWARDED_ALLOW_IPS)
    seen = {}

    async def app(scope, receive, send):
        client = scope.get("client")
        fwd = _forwarded_for(scope)
        host = address.peer(client[0] if client else None, {}, client[1] if client else None, fwd)
        seen["key"] = client_key(None, host, fwd, list(trusted_proxies))

    scope = {"type": "http", "client": peer, "headers": [(b"x-forwarded-for", v.encode()) for v in forwarded]}
    asyncio.run(ProxyHeadersMiddleware(app, trusted_hosts=allow)(scope, None, None))
    return seen["key"]


@pytest.mark.parametrize(
    "forwarded",
    [
        ["203.0.113.7"],
        ["203.0.113.7:8080"],
        ["198.51.100.1, 203.0.113.7"],
        ["198.51.100.1", "203.0.113.7"],  # two header lines
        ["127.0.0.1"],
        ["[2001:db8::1]:443"],
        ["not-an-address"],
        ["127.0.0.1, ::1"],
    ],
)
def test_a_forged_header_from_loopback_counts_as_loopback(forwarded):
    assert through_uvicorn(("127.0.0.1", 51234), forwarded) == "ip:127.0.0.1"
    assert through_uvicorn(("::1", 51234), forwarded) == "ip:127.0.0.1"  # the proxy's trusted peer


def test_a_header_from_an_untrusted_peer_is_ignored_as_before():
    # uvicorn does not trust the peer: the scope is the real peer, header ignored by us too
    assert through_uvicorn(("198.51.100.9", 40000), ["203.0.113.7"]) == "ip:198.51.100.9"
    # a peer naming itself (without its port) keeps its own address
    assert through_uvicorn(("198.51.100.9", 40000), ["198.51.100.9"]) == "ip:198.51.100.9"
    assert through_uvicorn(("127.0.0.1", 40000), []) == "ip:127.0.0.1"


def test_trusted_proxies_still_decide():
    """A local reverse proxy the operator vouches for (`rate_limit.trusted_proxies`): its header
    is believed, read right to left past the trusted hops, as on every other path."""
    assert through_uvicorn(("127.0.0.1", 5000), ["203.0.113.7"], ["127.0.0.1"]) == "ip:203.0.113.7"
    assert through_uvicorn(("127.0.0.1", 5000), ["203.0.113.7, 10.0.0.3"], ["127.0.0.1", "10.0.0.0/8"]) == (
        "ip:203.0.113.7"
    )
    # a remote load balancer in trusted_proxies that uvicorn does not trust: unchanged
    assert through_uvicorn(("10.0.0.3", 5000), ["203.0.113.7"], ["10.0.0.0/8"]) == "ip:203.0.113.7"


def test_a_cluster_without_uvicorn_forwarding_is_unchanged():
    """`make run-python-proxy` empties FORWARDED_ALLOW_IPS: uvicorn rewrites nothing, and the
    ingress (which then assumes uvicorn's default) changes nothing either."""
    assert through_uvicorn(("127.0.0.1", 5000), ["203.0.113.7"], allow="") == "ip:127.0.0.1"
    assert through_uvicorn(("198.51.100.9", 5000), ["203.0.113.7"], allow="") == "ip:198.51.100.9"


def test_other_trusted_settings():
    # FORWARDED_ALLOW_IPS naming the proxy host: keyed on it
    assert through_uvicorn(("10.0.0.7", 5000), ["203.0.113.7"], allow="10.0.0.7") == "ip:10.0.0.7"
    # "*" (uvicorn trusts every peer and takes the left-most hop): all forged headers share one key
    assert through_uvicorn(("198.51.100.9", 5000), ["203.0.113.7"], allow="*") == "ip:*"
    assert through_uvicorn(("198.51.100.9", 5000), ["203.0.113.8, 1.1.1.1"], allow="*") == "ip:*"


# ------------------------------------------------------------------ on the session cluster


@pytest.mark.e2e
def test_forged_forwarded_for_on_the_python_proxy_is_rate_limited(limited_app):
    """12 requests from one client on the Python proxy, each with another forged
    X-Forwarded-For: counted as one client (10 × 200, 2 × 429)."""
    if os.environ.get("FORWARDED_ALLOW_IPS") == "":
        pytest.skip("the cluster was started with FORWARDED_ALLOW_IPS=: Serve's proxy rewrites nothing here")
    limited = limited_app
    limits = httpx.get(f"{limited}/health", timeout=30).json()["limits"]
    assert limits["rate_limit"].startswith("10 requests/minute"), limits  # not the replica's 1000
    statuses = []
    for i in range(12):
        r = httpx.post(
            f"{limited}/v1/chat/completions",
            headers={"X-Forwarded-For": f"203.0.113.{i + 1}"},
            json={"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "体育新闻"}]},
            timeout=60,
        )
        statuses.append(r.status_code)
    print(f"\n12 requests, 12 forged X-Forwarded-For: {collections.Counter(statuses)}")
    assert statuses == [200] * 10 + [429] * 2
