"""Issue 18: per-tenant and cluster-wide budgets in the limiter actor (requests, tokens,
concurrency), OpenAI's rate-limit headers, and the middleware's reservation and usage metering —
the plain logic, without Ray (the end-to-end behaviour: tests/test_admission.py)."""

from __future__ import annotations

import json

import pytest

from deployments.admission.auth import Identity, TenantConfig
from deployments.admission.limit_responses import openai_duration, rate_limit_headers, rate_limited_error
from deployments.admission.limiter_actor import RateLimiterActor
from deployments.admission.limits import AdmitSpec, ClusterBudget, RateLimitConfig, RateWindow, make_windows
from deployments.admission.middleware import _reservation, _UsageMeter
from deployments.admission.rate_limit import RateLimiter


def actor(cluster: dict | None = None) -> RateLimiterActor:
    a = RateLimiterActor(make_windows(10, 100))
    a.configure(make_windows(10, 100), cluster or {})
    return a


def test_token_budget_reserves_max_tokens_and_charges_usage():
    a = actor()
    spec = AdmitSpec("tenant:t", tokens_per_minute=100, reserve_tokens=60)
    d1 = a.admit(spec)
    assert d1.allowed and d1.lease and d1.tokens_limit == 100 and d1.tokens_remaining == 40
    # a second request whose max_tokens does not fit what is left is refused up front
    d2 = a.admit(spec)
    assert not d2.allowed and d2.reason == "tokens" and d2.tokens_remaining == 40
    err = rate_limited_error(d2)
    assert err.status == 429 and err.code == "tokens_rate_limit_exceeded" and err.param == "max_tokens"
    h = err.headers
    assert h["x-ratelimit-limit-tokens"] == "100" and h["x-ratelimit-remaining-tokens"] == "40"
    assert int(h["Retry-After"]) >= 1
    # the first ends having used 25 tokens (its usage): 75 left, the second fits now
    assert a.release(d1.lease, 25)
    assert a.usage("tenant:t") == {"in_flight": 0, "reserved_tokens": 0, "tokens_last_minute": 25}
    d3 = a.admit(spec)
    assert d3.allowed and d3.tokens_remaining == 100 - 25 - 60
    # unknown usage (a stream without include_usage): the reservation is charged
    a.release(d3.lease, None)
    assert a.usage("tenant:t")["tokens_last_minute"] == 85
    assert not a.release(d3.lease, 1)  # a lease is given back once


def test_max_tokens_over_the_whole_budget_never_fits():
    a = actor()
    d = a.admit(AdmitSpec("tenant:t", tokens_per_minute=50, reserve_tokens=51))
    assert not d.allowed and d.never_fits
    err = rate_limited_error(d)
    assert err.code == "tokens_budget_exceeded" and "lower max_tokens" in err.message


def test_tokens_retry_after_is_when_enough_leaves_the_window(monkeypatch):
    import deployments.admission.rate_limit as rl

    now = [1000.0]
    monkeypatch.setattr(rl.time, "time", lambda: now[0])
    a = actor()
    spec = AdmitSpec("tenant:t", tokens_per_minute=100, reserve_tokens=50)
    a.release(a.admit(spec).lease, 50)  # t=1000: 50 charged
    now[0] = 1030.0
    a.release(a.admit(spec).lease, 50)  # t=1030: 50 more
    now[0] = 1040.0
    d = a.admit(spec)
    assert not d.allowed and d.retry_after_s == 20  # the t=1000 charge leaves at 1060
    now[0] = 1060.5
    assert a.admit(spec).allowed


def test_concurrency_per_tenant_and_cluster():
    a = actor({"max_concurrent": 3})
    t1 = AdmitSpec("tenant:a", max_concurrent=2)
    l1, l2 = a.admit(t1), a.admit(t1)
    assert l1.allowed and l2.allowed and l1.concurrency_limit == 2
    d = a.admit(t1)
    assert not d.allowed and d.reason == "concurrency" and d.scope == "client"
    assert rate_limited_error(d).code == "concurrency_limit_exceeded"
    b = a.admit(AdmitSpec("tenant:b"))  # the cluster's third slot
    assert b.allowed
    c = a.admit(AdmitSpec("tenant:c"))
    assert not c.allowed and c.scope == "cluster" and "all clients" in rate_limited_error(c).message
    a.release(l1.lease, 0)
    assert a.admit(AdmitSpec("tenant:c")).allowed


def test_expired_leases_are_reclaimed(monkeypatch):
    import deployments.admission.rate_limit as rl

    now = [1000.0]
    monkeypatch.setattr(rl.time, "time", lambda: now[0])
    a = actor()
    spec = AdmitSpec("tenant:a", max_concurrent=1, ttl_s=30)
    assert a.admit(spec).allowed
    assert not a.admit(spec).allowed
    now[0] = 1031.0  # the ingress replica that held it died: the lease expires
    assert a.admit(spec).allowed


def test_request_windows_per_tenant_and_cluster_take_nothing_when_refused():
    a = actor({"requests_per_minute": 4})
    light = AdmitSpec("tenant:light", windows=(RateWindow(2, 60, "minute"),))
    heavy = AdmitSpec("tenant:heavy", windows=(RateWindow(100, 60, "minute"),))
    assert [a.admit(light).allowed for _ in range(3)] == [True, True, False]
    refused = a.admit(light)
    assert refused.scope == "client" and refused.limit == 2
    assert [a.admit(heavy).allowed for _ in range(3)] == [True, True, False]  # cluster: 4 in all
    d = a.admit(heavy)
    assert d.scope == "cluster" and d.limit == 4
    assert next(w for w in d.windows if w["limit"] == 4)["remaining"] == 0  # the cluster's window


def test_openai_headers_on_success():
    a = actor({"tokens_per_minute": 1000})
    d = a.admit(AdmitSpec("tenant:t", windows=tuple(make_windows(10, 100)), tokens_per_minute=300, reserve_tokens=100))
    h = rate_limit_headers(d)
    assert h["x-ratelimit-limit-requests"] == "10" and h["x-ratelimit-remaining-requests"] == "9"
    assert h["x-ratelimit-reset-requests"].endswith("s")
    assert h["x-ratelimit-limit-tokens"] == "300" and h["x-ratelimit-remaining-tokens"] == "200"
    assert h["X-RateLimit-Limit"] == "10" and "Retry-After" not in h
    assert [openai_duration(x) for x in (0, 0.02, 6, 60, 61.2, 3723)] == ["0s", "20ms", "6s", "1m0s", "1m2s", "1h2m3s"]


def test_spec_from_identity_and_defaults():
    lim = RateLimiter(make_windows(10, 100), tokens_per_minute=0, max_concurrent=0)
    assert lim.enabled and not lim.counts_tokens(None)
    anon = lim.spec("ip:203.0.113.9")  # key-less: the replaced service's 10/min, 100/h per address
    assert anon.key == "ip:203.0.113.9" and [(w.limit, w.period_s) for w in anon.windows] == [(10, 60), (100, 3600)]
    acme = Identity(
        "acme",
        "client",
        "ab" * 16,
        TenantConfig(requests_per_minute=600, requests_per_hour=0, tokens_per_minute=5000, max_concurrent=4),
    )
    spec = lim.spec("ignored", acme, reserve_tokens=64)
    assert spec.key == "tenant:acme" and [(w.limit, w.period_s) for w in spec.windows] == [(600, 60)]
    assert (spec.tokens_per_minute, spec.max_concurrent, spec.reserve_tokens) == (5000, 4, 64)
    assert lim.counts_tokens(acme)
    plain = Identity("key:" + "cd" * 16, "client", "cd" * 16, None)
    assert lim.spec("x", plain).key == plain.tenant  # one budget per plain key, as before
    # no default budget at all, but a tenant has one: the limiter still applies to it
    off = RateLimiter([], tokens_per_minute=0)
    assert not off.enabled and off.applies(acme) and not off.applies(plain)
    assert not RateLimiter.from_config({"enabled": False, "cluster": {"max_concurrent": 2}}, env={}).applies(acme)
    cfg = RateLimitConfig(tokens_per_minute=10, cluster={"tokens_per_minute": 99})
    assert RateLimiter.from_config(cfg, env={}).cluster == ClusterBudget(tokens_per_minute=99)
    assert all(f.description for f in ClusterBudget.model_fields.values())


def test_reservation_from_the_body():
    assert _reservation(b'{"max_tokens": 40, "n": 2}', 100) == 80
    assert _reservation(b'{"max_completion_tokens": 7, "max_tokens": 40}', 100) == 7
    assert _reservation(b'{"messages": []}', 100) == 100
    assert _reservation(b"not json", 16) == 16
    assert _reservation(b'{"max_tokens": true, "n": "x"}', 16) == 16
    assert _reservation(b"[" * 5000 + b"]" * 5000, 16) == 16


def test_usage_meter_json_sse_and_errors():
    m = _UsageMeter()
    m.start({"status": 200, "headers": [(b"content-type", b"application/json")]})
    body = json.dumps({"usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}).encode()
    m.body(body[:10])
    m.body(body[10:])
    assert m.tokens() == 17
    s = _UsageMeter()
    s.start({"status": 200, "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
    stream = (
        b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}\n\n'
        b"data: [DONE]\n\n"
    )
    for i in range(0, len(stream), 7):  # cut anywhere
        s.body(stream[i : i + 7])
    assert s.tokens() == 12
    n = _UsageMeter()
    n.start({"status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    n.body(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
    assert n.tokens() is None  # no usage in the stream: the reservation is charged
    e = _UsageMeter()
    e.start({"status": 400, "headers": [(b"content-type", b"application/json")]})
    e.body(b'{"error": {}}')
    assert e.tokens() == 0


@pytest.mark.parametrize("field", ["tokens_per_minute", "max_concurrent", "cluster", "lease_ttl_s"])
def test_new_config_fields_documented(field):
    assert RateLimitConfig.model_fields[field].description


# --------------------------------------------------------------------------- fair shares under overload


def _simulate(
    fair: float, heavy_rate: float, light_rate: float, seconds: int = 400, slots: int = 12, seed: int = 7
) -> dict[str, float]:
    """Discrete simulation of the admission decisions: each second Poisson arrivals of two
    tenants in random order, every admitted request holds a slot for one second; slots =
    `cluster.max_concurrent` (the model's capacity). Returns each tenant's success rate."""
    import random

    import numpy as np

    rng = np.random.default_rng(seed)
    order = random.Random(seed)
    a = RateLimiterActor([])
    a.configure([], {"max_concurrent": slots, "fair_share_above": fair})
    sent = {"heavy": 0, "light": 0}
    ok = {"heavy": 0, "light": 0}
    for _ in range(seconds):
        arrivals = ["heavy"] * int(rng.poisson(heavy_rate)) + ["light"] * int(rng.poisson(light_rate))
        order.shuffle(arrivals)
        leases = []
        for t in arrivals:
            sent[t] += 1
            d = a.admit(AdmitSpec(f"tenant:{t}"))
            if d.allowed:
                ok[t] += 1
                leases.append(d.lease)
        for lease in leases:
            a.release(lease, 0)
    return {t: ok[t] / max(1, sent[t]) for t in sent}


def test_light_tenant_keeps_its_success_rate_at_3x_capacity():
    """Capacity 12 requests/s; the heavy tenant offers 10x the light one's load, 36/s in all
    (3x capacity). First come, first served, the light tenant gets about a third of its
    requests through; with fair shares (busy mark 0.6) it stays near what it gets alone."""
    alone = _simulate(0.6, 0.0, 3.3)["light"]
    fcfs = _simulate(0.0, 33.0, 3.3)
    fair = _simulate(0.6, 33.0, 3.3)
    heavy_alone = _simulate(0.6, 33.0, 0.0)["heavy"]
    print(
        f"\nlight alone {alone:.1%}; at 3x capacity FCFS light {fcfs['light']:.1%} heavy {fcfs['heavy']:.1%}; "
        f"fair shares light {fair['light']:.1%} heavy {fair['heavy']:.1%}; heavy alone {heavy_alone:.1%}"
    )
    assert alone > 0.99
    assert fcfs["light"] < 0.5
    assert fair["light"] >= 0.9 * alone
    # the heavy tenant still gets the rest of the capacity (about 12 - 3.3 of its 33 per second)
    assert fair["heavy"] * 33.0 >= 0.8 * (12 - 3.3)
    # alone it is held near the busy mark (0.6 x 12 = 7.2: 8 of 12 slots): the cost of the headroom
    assert 7.5 / 33 <= heavy_alone <= 8.5 / 33


def test_priority_weights_the_share():
    a = RateLimiterActor([])
    a.configure([], {"max_concurrent": 12, "fair_share_above": 0.5})
    hi, lo = AdmitSpec("tenant:hi", weight=3), AdmitSpec("tenant:lo", weight=1)
    got = {"hi": 0, "lo": 0}
    for _ in range(40):  # both keep asking, alternately, nothing is released
        for name, spec in (("hi", hi), ("lo", lo)):
            if a.admit(spec).allowed:
                got[name] += 1
    print(f"\nheld slots under overload: {got}")
    assert got["hi"] > got["lo"] and sum(got.values()) <= 12
    d = a.admit(lo)
    assert not d.allowed and d.reason in ("fair_share", "concurrency")
    err = rate_limited_error(a.admit(hi))
    assert err.status == 429 and err.code in ("fair_share_exceeded", "concurrency_limit_exceeded")
