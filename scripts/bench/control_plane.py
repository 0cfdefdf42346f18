"""The admission control plane's ceiling (issue 27): requests per second through the one rate
limiter actor of an app (`admit`, then `release` when the request ends, as every ingress
replica's `RateLimiter` client makes them) and through the adapter registry (`get`: one actor
call; `lookup`: what the request path uses, the ingress replica's cached copy), with 1, 4 and 16
simulated ingress replicas on a local Ray cluster.

A simulated ingress replica is an async Ray actor (`num_cpus=0`) holding the clients an ingress
replica holds, built from the same config (`RateLimiter.from_config`, `AdapterRegistry`). Its
budgets are the shipped ones (see `RATE_LIMIT`) and no request exceeds them. Each replica
runs `concurrency` closed loops (check → release, or lookup/get) for `duration_s`, each
request from a new client key. Reported per (mode, replicas): requests/s over all replicas, admit
latency p50/p99 as the ingress sees it, degraded decisions (must be 0), and the limiter's own
count of admitted requests (must equal what the replicas counted).

    .venv/bin/python -m scripts.bench.control_plane --replicas 1 4 16 --json reports/control_plane.json

The simulated replicas share this machine's cores with the actor (which lowers the figures) and
call it over loopback, not a network (which raises them): compare the modes of one run, not
runs of different machines. `tests/test_rate_limit.py` runs a short version and asserts what
batching must keep: no decision degraded, the actor's count equal to the replicas', every lease
back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from scripts.bench.stats import percentile

# The shipped request windows (10/minute, 100/hour per client) and the replaced service's 3
# requests in flight per client, so that every admitted request takes a lease and gives it back
# (admit, then release: the limiter's most expensive path). Each request comes from a new
# client (many clients, none over its budget: the shape of a large public service).
RATE_LIMIT = {"enabled": True, "per_minute": 10, "per_hour": 100, "max_concurrent": 3, "timeout_s": 30.0}


def _ingress_class():
    import ray

    @ray.remote(num_cpus=0)
    class SimulatedIngress:
        def __init__(self, app: str, batch: bool) -> None:
            from deployments.adapters import AdapterRegistry
            from deployments.admission.rate_limit import RateLimiter

            self.limiter = RateLimiter.from_config(RATE_LIMIT, app)
            self.limiter.batch = batch
            self.registry = AdapterRegistry(app)

        async def ready(self, timeout_s: float = 180.0) -> None:
            """Once the limiter and the registry answer. Their actors start with the first
            replica that asks; until they do, a call is a 503 ("briefly unavailable", as a
            client of the service would get): asked again until `timeout_s` has passed."""
            from deployments.api.errors import APIError

            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    await self.limiter.ready()
                    await self.registry.list()
                    return
                except APIError as exc:
                    if exc.status != 503 or time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.5)

        async def run(self, what: str, concurrency: int, duration_s: float, seed: int) -> dict:
            lat: list[float] = []
            degraded = 0
            stop = time.monotonic() + duration_s

            async def loop(i: int) -> None:
                nonlocal degraded
                n = 0
                while time.monotonic() < stop:
                    n += 1
                    t0 = time.perf_counter()
                    if what == "limiter":
                        d = await self.limiter.check(f"client-{seed}-{i}-{n}")
                        lat.append(time.perf_counter() - t0)
                        degraded += d.degraded
                        self.limiter.release(d.lease, 1)
                    elif what == "registry_get":
                        await self.registry.get("news-lora")
                        lat.append(time.perf_counter() - t0)
                    else:
                        await self.registry.lookup("news-lora")
                        lat.append(time.perf_counter() - t0)
                        await asyncio.sleep(0)  # a cached lookup never yields: let the others run

            t0 = time.monotonic()
            await asyncio.gather(*(loop(i) for i in range(concurrency)))
            elapsed = time.monotonic() - t0
            await asyncio.sleep(0.2)  # releases in flight reach the actor
            calls = getattr(self.limiter, "rpcs", 0) if what == "limiter" else self.registry.rpcs
            return {"n": len(lat), "elapsed_s": elapsed, "latencies": lat, "degraded": degraded, "calls": calls}

    return SimulatedIngress


def _actor_pid(handle: Any) -> int:
    import ray

    actor_id = handle._actor_id.hex()
    return int(ray._private.state.actors()[actor_id]["Pid"])


def measure(what: str, replicas: int, batch: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement on the Ray cluster this process is connected to (own actors, removed
    after it)."""
    import ray

    from deployments.actors import kill_actor
    from deployments.adapters import AdapterRegistry
    from deployments.admission.limits import CLUSTER_KEY

    app = f"cp-{uuid.uuid4().hex[:8]}"
    ingress = _ingress_class()
    actors = [ingress.remote(app, batch) for _ in range(replicas)]
    ray.get([a.ready.remote() for a in actors])
    if what != "limiter":
        asyncio.run(AdapterRegistry(app).register("news-lora", "models/tiny-qwen3-lora"))
    limiter = ray.get_actor(f"rate_limiter.{app}", namespace="llm_serve")
    served_by = limiter if what == "limiter" else ray.get_actor(f"adapters.{app}", namespace="llm_serve")
    proc = psutil.Process(_actor_pid(served_by))
    before = ray.get(limiter.counters.remote())["allowed"]
    cpu0 = sum(proc.cpu_times()[:2])
    outs = ray.get([a.run.remote(what, args.concurrency, args.duration, i) for i, a in enumerate(actors)])
    actor_cpu_s = sum(proc.cpu_times()[:2]) - cpu0
    after = ray.get(limiter.counters.remote())["allowed"]
    deadline = time.monotonic() + 10  # the last releases reach the actor: then every lease is back
    while (in_flight := ray.get(limiter.usage.remote(CLUSTER_KEY))["in_flight"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for a in actors:
        ray.kill(a)
    for name in (f"rate_limiter.{app}", f"adapters.{app}"):
        kill_actor(name)
    n = sum(o["n"] for o in outs)
    lat = [x for o in outs for x in o["latencies"]]
    elapsed = max(o["elapsed_s"] for o in outs)
    return {
        "what": what,
        "replicas": replicas,
        "batch": batch,
        "concurrency_per_replica": args.concurrency,
        "requests": n,
        "per_s": n / elapsed,
        "p50_ms": 1000 * percentile(lat, 50),
        "p99_ms": 1000 * percentile(lat, 99),
        "degraded": sum(o["degraded"] for o in outs),
        "requests_per_call": n / max(1, sum(o["calls"] for o in outs)),
        # the actor that answers (limiter or registry): its CPU per request and its busy share
        "actor_cpu_us_per_request": 1e6 * actor_cpu_s / max(1, n),
        "actor_busy": actor_cpu_s / elapsed,
        "limiter_admitted": after - before if what == "limiter" else None,
        "limiter_in_flight_after": in_flight,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--concurrency", type=int, default=16, help="closed loops per simulated ingress replica")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--what", nargs="+", default=["limiter", "registry_get", "registry_lookup"])
    ap.add_argument("--batch", choices=["on", "off", "both"], default="both", help="the limiter client's batching")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="llm_serve")
    rows = []
    try:
        for what in args.what:
            modes = [True, False] if args.batch == "both" and what == "limiter" else [args.batch != "off"]
            for replicas in args.replicas:
                for batch in modes:
                    row = measure(what, replicas, batch, args)
                    rows.append(row)
                    print(
                        f"{what:16s} replicas={replicas:3d} batch={'on ' if batch else 'off'} "
                        f"{row['per_s']:9.0f}/s  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                        f"{row['requests_per_call']:5.1f} per call, "
                        f"actor {row['actor_cpu_us_per_request']:6.0f} us/request, busy {row['actor_busy']:4.0%}  "
                        f"degraded {row['degraded']}  limiter admitted {row['limiter_admitted']} "
                        f"(replicas counted {row['requests']}), leases still out {row['limiter_in_flight_after']}",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
