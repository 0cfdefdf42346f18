"""Cluster-wide rate limiter: a real named Ray actor shared by independent clients (as two
ingress replicas would share it), key derivation, env overrides, headers."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from ray_helpers import ray_local  # noqa: F401  (fixture)

from deployments.admission.client_address import client_key
from deployments.admission.limit_responses import rate_limit_headers, rate_limited_error
from deployments.admission.limiter_actor import RateLimiterActor
from deployments.admission.limits import (
    AdmitSpec,
    RateDecision,
    RateLimitConfig,
    RateWindow,
    effective_limits,
    make_windows,
)
from deployments.admission.rate_limit import RateLimiter

# One limiter actor for the module (each actor is a worker process: slow to start on 2 cores);
# each test reconfigures it through its own clients and uses fresh keys, as redeploys would.
NAME = f"rl-test-{uuid.uuid4().hex[:8]}"


def _name() -> str:
    return NAME


def _key() -> str:
    return "k-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module", autouse=True)
def _cleanup_actor():
    yield
    from deployments.actors import kill_actor

    try:
        kill_actor(NAME)
    except Exception:
        pass


def _run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- through the actor


def test_two_clients_share_one_budget(ray_local):
    """12 requests from one client through two limiter clients (two ingress replicas) within a
    minute: exactly 10 allowed, 2 rejected with Retry-After; another client is unaffected."""
    name = _name()
    windows = make_windows(10, 100)
    a = RateLimiter(windows, actor_name=name)
    b = RateLimiter(windows, actor_name=name)
    key = client_key(None, "203.0.113.7", None, [])

    async def go():
        await asyncio.gather(a.ready(), b.ready())  # what each ingress replica does at start
        out = []
        for i in range(12):
            out.append(await (a if i % 2 == 0 else b).check(key))
        other = await b.check(client_key(None, "203.0.113.8", None, []))
        return out, other

    decisions, other = _run(go())
    allowed = [d for d in decisions if d.allowed]
    rejected = [d for d in decisions if not d.allowed]
    assert len(allowed) == 10 and len(rejected) == 2
    assert all(not d.degraded for d in decisions)
    assert [d.remaining for d in allowed] == list(range(9, -1, -1))
    for d in rejected:
        assert d.window == "minute" and d.limit == 10 and d.remaining == 0
        assert 1 <= d.retry_after_s <= 60
        h = rate_limit_headers(d)
        assert int(h["Retry-After"]) == d.retry_after_s
        assert h["X-RateLimit-Limit"] == "10" and h["X-RateLimit-Remaining"] == "0"
        assert abs(int(h["X-RateLimit-Reset"]) - (time.time() + d.retry_after_s)) <= 2
        err = rate_limited_error(d)
        assert err.status == 429 and err.code == "rate_limit_exceeded"
        assert err.headers["Retry-After"] == h["Retry-After"]
        assert err.body()["error"]["type"] == "rate_limit_error"
    ok_headers = rate_limit_headers(allowed[0])
    assert "Retry-After" not in ok_headers and ok_headers["X-RateLimit-Remaining"] == "9"
    assert other.allowed and other.remaining == 9

    # Rejections consumed nothing: the hour window saw exactly the 10 allowed.
    import ray

    actor = ray.get_actor(name, namespace=a.namespace)
    hour = next(w for w in rejected[-1].windows if w["window"] == "hour")
    assert hour["remaining"] == 90
    assert ray.get(actor.counters.remote()) == {"allowed": 11, "rejected": 2}


def test_get_or_create_from_many_processes_is_one_actor(ray_local):
    import ray

    from deployments.actors import get_or_create_actor

    name = f"rl-procs-{uuid.uuid4().hex[:8]}"

    @ray.remote(num_cpus=0)
    def resolve(n):
        h = get_or_create_actor(RateLimiterActor, n, "llm_serve", [RateWindow(3, 60)])
        return ray.get(h.admit.remote(AdmitSpec("k", (RateWindow(3, 60),)))).allowed

    # Two processes and this driver get-or-create concurrently: one actor, one budget of 3.
    refs = [resolve.remote(name) for _ in range(2)]
    here = get_or_create_actor(RateLimiterActor, name, "llm_serve", [RateWindow(3, 60)])
    spec = AdmitSpec("k", (RateWindow(3, 60),))
    results = [ray.get(here.admit.remote(spec)).allowed for _ in range(2)] + ray.get(refs)
    assert sorted(results) == [False, True, True, True]
    ray.kill(ray.get_actor(name, namespace="llm_serve"), no_restart=True)


def test_hour_window_rejects_independently_of_minute(ray_local):
    name = _name()
    limiter = RateLimiter(make_windows(0, 3), actor_name=name)  # minute window off
    decisions = _run(_hits(limiter, _key(), 4))
    assert [d.allowed for d in decisions] == [True, True, True, False]
    last = decisions[-1]
    assert last.window == "hour" and last.limit == 3
    assert 3500 <= last.retry_after_s <= 3600


def test_any_full_window_rejects_without_consuming(ray_local):
    """Minute 2, short window of 3 per 2 s: the 3rd request is refused by the minute window and
    must not eat the short window's budget."""
    name = _name()
    limiter = RateLimiter([RateWindow(2, 60, "minute"), RateWindow(3, 2)], actor_name=name)
    d = _run(_hits(limiter, _key(), 3))
    assert [x.allowed for x in d] == [True, True, False]
    assert d[-1].window == "minute"
    (short,) = [w for w in d[-1].windows if w["period_s"] == 2]
    assert short["remaining"] == 1


def test_window_slides(ray_local):
    name = _name()
    limiter = RateLimiter([RateWindow(2, 1)], actor_name=name)
    key = _key()
    first = _run(_hits(limiter, key, 3))
    assert [x.allowed for x in first] == [True, True, False]
    assert first[-1].retry_after_s == 1
    time.sleep(1.1)
    assert _run(limiter.check(key)).allowed


def test_configure_updates_existing_actor(ray_local):
    """A redeploy with other limits reconfigures the existing (detached) actor."""
    name = _name()
    _run(_hits(RateLimiter(make_windows(5, 0), actor_name=name), _key(), 1))
    again = _run(_hits(RateLimiter(make_windows(2, 0), actor_name=name), _key(), 3))
    assert [x.allowed for x in again] == [True, True, False]
    assert again[0].limit == 2


def test_disabled_limiter_makes_no_actor_call():
    limiter = RateLimiter.from_config(RateLimitConfig(per_minute=0, per_hour=0), env={})
    assert not limiter.enabled
    d = _run(limiter.check("anything"))
    assert d.allowed and rate_limit_headers(d) == {}
    assert not RateLimiter.from_config({"enabled": False}, env={}).enabled


def test_unreachable_limiter_fails_open_or_closed(monkeypatch):
    def boom(self):
        raise RuntimeError("no cluster")

    monkeypatch.setattr(RateLimiter, "_resolve", boom)
    d = _run(RateLimiter(make_windows(1, 0)).check("k"))
    assert d.allowed and d.degraded and rate_limit_headers(d) == {}
    closed = _run(RateLimiter(make_windows(1, 0), fail_open=False).check("k"))
    assert not closed.allowed and closed.degraded
    assert rate_limited_error(closed).status == 503


def test_a_concurrent_burst_is_batched_and_exact(ray_local):
    """40 requests of one client at once through two limiter clients (two ingress replicas):
    the admits of a moment travel together (fewer actor calls than requests) and the budget
    holds exactly as with one call each: 10 allowed, remaining 9..0 once each, 30 refused."""
    import ray

    name = _name()
    windows = make_windows(10, 100)
    a = RateLimiter(windows, actor_name=name)
    b = RateLimiter(windows, actor_name=name)
    key = _key()

    async def go():
        await asyncio.gather(a.ready(), b.ready())
        return await asyncio.gather(*(c.check(key) for c in (a, b) for _ in range(20)))

    actor = ray.get_actor(name, namespace=a.namespace)
    before = ray.get(actor.counters.remote())
    decisions = _run(go())
    after = ray.get(actor.counters.remote())
    allowed = [d for d in decisions if d.allowed]
    assert not any(d.degraded for d in decisions)
    assert sorted(d.remaining for d in allowed) == list(range(10))
    assert len(decisions) - len(allowed) == 30
    assert all(not d.allowed and d.retry_after_s >= 1 for d in decisions if not d.allowed)
    assert after["allowed"] - before["allowed"] == 10 and after["rejected"] - before["rejected"] == 30
    assert a.rpcs + b.rpcs < 20, (a.rpcs, b.rpcs)  # 40 admits


def test_batched_releases_give_every_lease_back(ray_local):
    """A concurrency budget of 3: of 10 requests at once 3 are admitted; their releases ride
    the client's next batch (or go alone) and every lease comes back, then 3 more fit."""
    import ray

    name = _name()
    limiter = RateLimiter([], actor_name=name, max_concurrent=3)
    key = _key()

    async def go():
        first = await asyncio.gather(*(limiter.check(key) for _ in range(10)))
        for d in first:
            limiter.release(d.lease, 1)
        deadline = time.monotonic() + 10
        while ray.get(actor.usage.remote(key))["in_flight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        second = await asyncio.gather(*(limiter.check(key) for _ in range(4)))
        for d in second:
            limiter.release(d.lease, 1)
        assert await limiter.drain()
        return first, second

    _run(limiter.ready())
    actor = ray.get_actor(name, namespace=limiter.namespace)
    first, second = _run(go())
    assert [d.allowed for d in first].count(True) == 3
    assert {d.reason for d in first if not d.allowed} == {"concurrency"}
    assert [d.allowed for d in second].count(True) == 3
    assert ray.get(actor.usage.remote(key))["in_flight"] == 0


def test_settle_decides_as_single_calls():
    """`settle` (a batch: releases, then admits) gives the decisions that the same releases and
    admits, one call each in that order, give."""
    w = (RateWindow(3, 60),)
    specs = [AdmitSpec(k, w, max_concurrent=2) for k in "aabaaabb"]
    one, batched = RateLimiterActor([]), RateLimiterActor([])
    singles = [one.admit(s) for s in specs]
    together = batched.settle(specs, [])
    fields = ("allowed", "remaining", "reason", "limit", "concurrency_limit")
    assert [[getattr(d, f) for f in fields] for d in together] == [[getattr(d, f) for f in fields] for d in singles]
    # the leases of the first two "a" requests come back in the next batch: two more "a" fit
    leases = [d.lease for d in together if d.allowed and d.lease][:2]
    again = batched.settle([specs[0]] * 2, [(lease, 1) for lease in leases])
    singles_again = [one.release(d.lease, 1) for d in singles if d.allowed and d.lease][:2]
    assert singles_again == [True, True]
    assert [d.allowed for d in again] == [one.admit(specs[0]).allowed for _ in range(2)]


def test_a_failed_or_late_batch_loses_no_lease(monkeypatch):
    """The batch call fails: each of its admits gets the decision its own failed call would
    (fail open here, degraded). A batch answered after the admits' deadline: the leases it
    carries are given back at once (the requests went on without them)."""

    class Method:  # an actor method: `.remote()` submits at once and returns an awaitable
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            return asyncio.ensure_future(self.fn(*args))

    released: list[str] = []
    mode = {"settle": "fail"}

    async def settle(specs, releases):
        released.extend(lease for lease, _ in releases)
        if mode["settle"] == "fail":
            raise RuntimeError("actor gone")
        await asyncio.sleep(0.5)  # later than the client's deadline (0.2 s)
        return [RateDecision(allowed=True, lease=f"lease-{i}") for i, _ in enumerate(specs)]

    async def release(lease, tokens):
        released.append(lease)

    async def nothing(*args):
        return None

    class Handle:
        def __init__(self):
            self.settle, self.release = Method(settle), Method(release)
            self.epoch, self.configure = Method(nothing), Method(nothing)

    monkeypatch.setattr(RateLimiter, "_resolve", lambda self: Handle())
    limiter = RateLimiter(make_windows(5, 0), timeout_s=0.2)

    async def go():
        failed = await asyncio.gather(*(limiter.check("k") for _ in range(3)))
        mode["settle"] = "late"
        late = await asyncio.gather(*(limiter.check("k") for _ in range(3)))
        await asyncio.sleep(0.8)  # the late answer arrives
        return failed, late

    failed, late = _run(go())
    assert all(d.allowed and d.degraded for d in failed)  # fail open: the configured outcome
    assert all(d.allowed and d.degraded for d in late)
    assert sorted(released) == ["lease-0", "lease-1", "lease-2"]


async def _hits(limiter: RateLimiter, key: str, n: int) -> list[RateDecision]:
    return [await limiter.check(key) for _ in range(n)]


# --------------------------------------------------------------------------- plain logic


def test_actor_class_without_ray():
    a = RateLimiterActor([RateWindow(1, 60)])
    spec = AdmitSpec("x", (RateWindow(1, 60),))
    assert a.admit(spec).allowed and not a.admit(spec).allowed
    assert a.admit(AdmitSpec("y", spec.windows)).allowed  # each key its own window
    with pytest.raises(ValueError):
        a.configure([(0, 60)])


def test_effective_limits_env_overrides():
    assert effective_limits(10, 100, env={}) == (10, 100)
    assert effective_limits(10, 100, env={"RATE_LIMIT_PER_MINUTE": "0"}) == (0, 100)
    assert effective_limits(10, 100, env={"RATE_LIMIT_PER_HOUR": " 5000 ", "RATE_LIMIT_PER_MINUTE": ""}) == (10, 5000)
    for bad in ("-1", "ten", "1.5"):
        with pytest.raises(ValueError, match="RATE_LIMIT_PER_MINUTE"):
            effective_limits(10, 100, env={"RATE_LIMIT_PER_MINUTE": bad})
    cfg = RateLimitConfig()
    assert [(w.limit, w.period_s) for w in cfg.windows(env={})] == [(10, 60), (100, 3600)]
    assert [(w.limit, w.period_s) for w in cfg.windows(env={"RATE_LIMIT_PER_MINUTE": "0"})] == [(100, 3600)]
    assert cfg.windows(env={"RATE_LIMIT_PER_MINUTE": "0", "RATE_LIMIT_PER_HOUR": "0"}) == []


def test_config_validates_and_documents():
    with pytest.raises(ValueError):
        RateLimitConfig(trusted_proxies=["not-an-ip"])
    with pytest.raises(ValueError):
        RateLimitConfig(per_minute=-1)
    with pytest.raises(ValueError):
        RateLimitConfig(unknown=1)
    assert all(f.description for f in RateLimitConfig.model_fields.values())


def test_client_key_api_key_is_hashed():
    k = client_key("sk-secret-123", "10.0.0.1", None, [])
    assert k.startswith("key:") and "sk-secret" not in k
    assert k == client_key("sk-secret-123", "198.51.100.1", "1.2.3.4", ["0.0.0.0/0"])  # per key, any address
    assert k != client_key("sk-secret-124", "10.0.0.1", None, [])


def test_client_key_forwarded_for_trust_rules():
    trusted = ["10.0.0.0/8", "192.0.2.1"]
    # No trusted proxies configured: the header is ignored.
    assert client_key(None, "10.1.2.3", "203.0.113.5", []) == "ip:10.1.2.3"
    # Direct peer not trusted: a client cannot spoof its address with the header.
    assert client_key(None, "198.51.100.9", "203.0.113.5", trusted) == "ip:198.51.100.9"
    # Trusted peer: the right-most untrusted hop is the client.
    assert client_key(None, "10.1.2.3", "203.0.113.5", trusted) == "ip:203.0.113.5"
    assert client_key(None, "10.1.2.3", "6.6.6.6, 203.0.113.5, 10.9.9.9", trusted) == "ip:203.0.113.5"
    assert client_key(None, "192.0.2.1", "203.0.113.5:4711", trusted) == "ip:203.0.113.5"
    # All hops trusted: the left-most.
    assert client_key(None, "10.1.2.3", "10.5.5.5, 10.6.6.6", trusted) == "ip:10.5.5.5"
    # IPv6 and IPv4-mapped forms are normalised.
    assert client_key(None, "::ffff:10.1.2.3", "[2001:db8::1]:443", trusted) == "ip:2001:db8::1"
    assert client_key(None, "2001:DB8::0:1", None, trusted) == "ip:2001:db8::1"
    # Empty header or unknown peer.
    assert client_key(None, "10.1.2.3", "", trusted) == "ip:10.1.2.3"
    assert client_key(None, None, None, []) == "ip:unknown"


@pytest.mark.parametrize("batch", [True, False])
def test_control_plane_bench_short(ray_local, batch):
    """The control-plane benchmark's short version (scripts/bench/control_plane.py): two
    simulated ingress replicas for a second through the limiter, batched or one call each. No
    decision degraded, the actor admitted exactly what the replicas counted, every lease back."""
    import argparse

    from scripts.bench.control_plane import measure

    row = measure("limiter", 2, batch, argparse.Namespace(concurrency=8, duration=1.0))
    assert row["requests"] > 0 and row["degraded"] == 0
    assert row["limiter_admitted"] == row["requests"]
    assert row["limiter_in_flight_after"] == 0


def test_expired_entries_are_swept_a_slice_at_a_time(monkeypatch):
    """The limiter's storage drops entries out of their window when the actor sweeps (the
    library's per-hit timer thread is off), a bounded number of keys per sweep; decisions never
    depend on it. Guards the pinned `limits` internals the storage relies on."""
    from limits.storage import MemoryStorage

    assert hasattr(MemoryStorage, "_MemoryStorage__schedule_expiry")  # what the storage turns off
    a = RateLimiterActor([])
    a._next_sweep = float("inf")  # this test sweeps by hand (the actor does it once a second)
    w = (RateWindow(1, 1),)
    t = [1000.0]
    monkeypatch.setattr(time, "time", lambda: t[0])
    for i in range(10):
        assert a.admit(AdmitSpec(f"c{i}", w)).allowed
    assert not a.admit(AdmitSpec("c0", w)).allowed  # 1 per second
    assert len(a._storage.events) == 10
    t[0] += 2  # every entry out of its 1-s window: allowed again before any sweep
    assert a.admit(AdmitSpec("c1", w)).allowed
    assert a._storage.sweep(4) == 4  # a slice of the keys
    assert a._storage.sweep(100) == 6  # the rest of the pass
    assert set(a._storage.events) == {next(k for k in a._storage.events if "c1" in k)}  # c1's new entry only
