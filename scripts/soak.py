#!/usr/bin/env python
"""Soak: a fixed-rate load for N minutes; reports errors by status and the RSS growth of every
Ray worker process (Serve controller, proxy, every replica, the shared actors, and vLLM's
engine-core processes under the model replicas).

    .venv/bin/python scripts/soak.py --start-app --minutes 10            # its own local Ray + app
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:PORT --ray-address 127.0.0.1:GCS_PORT

Load: open loop at ``--rate`` requests/s (arrivals on a fixed schedule, not waiting for answers),
a mix of chat (streaming and not), completions and /v1/classify with real TNEWS titles from
``../shared/data/tnews/test.json``, short fixed-length generations. Bounded: it stops itself
after ``--minutes`` or ``--max-requests``, whichever comes first, with at most
``--concurrency`` requests in flight (arrivals beyond that are counted as ``skipped``, not sent).
Targets must be loopback addresses.

RSS: every ``--sample-s`` seconds, psutil reads the RSS of each Ray actor process (pids from the
GCS actor table: the app's Ray cluster, started here or reached with ``--ray-address``) and of
their child processes. The baseline is the first sample after ``--warmup-s`` of load; growth =
end / baseline - 1, per process and in total.

Pass/fail (exit code 1 on fail): errors <= ``--max-errors`` (default 0) and every process's and
the total RSS growth < ``--max-rss-growth`` percent (default 10). ``--out`` writes the report as
JSON (default ``reports/soak-<time>.json``; ``reports/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as _dt
import json
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cluster.processes import free_port, wait_http
from deployments.observability.stats import percentile

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tnews" / "test.json"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
MIX = {"chat": 4, "chat_stream": 4, "completion": 2, "classify": 1}


# ------------------------------------------------------------------------------ load


def load_prompts(n: int = 2000, seed: int = 0) -> list[str]:
    if DATA.is_file():
        lines = DATA.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(x)["sentence"] for x in lines[:n] if x.strip()]
        if rows:
            return rows
    rnd = random.Random(seed)
    return [f"新闻标题{rnd.randint(0, 10**6)}：央行宣布降息25个基点" for _ in range(n)]


def make_request(kind: str, text: str, model: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    if kind == "classify":
        return "/v1/classify", {"model": model, "input": text}
    if kind == "completion":
        return "/v1/completions", {
            "model": model,
            "prompt": f"新闻标题：{text}\n类别：",
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "ignore_eos": True,
        }
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": text}],
    }
    if kind == "chat_stream":
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", body


async def one_request(client, url: str, path: str, body: dict[str, Any], timeout_s: float) -> tuple[str, float]:
    """(outcome, latency): "200", "<status>:<error code>", or "stream_error" / "malformed" / "conn_error" / "timeout"."""
    import httpx

    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url + path, json=body) as r:
                raw = await r.aread()
                if r.status_code != 200:
                    try:
                        code = json.loads(raw)["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        code = "non-json"
                    return f"{r.status_code}:{code}", time.monotonic() - t0
                if body.get("stream"):
                    lines = [x for x in raw.decode("utf-8", "replace").splitlines() if x]
                    if not lines or lines[-1] != "data: [DONE]":
                        return "malformed", time.monotonic() - t0
                    if any('"error"' in x and '"choices"' not in x for x in lines):
                        return "stream_error", time.monotonic() - t0
                else:
                    obj = json.loads(raw)
                    if not (obj.get("choices") or obj.get("data")):
                        return "malformed", time.monotonic() - t0
                return "200", time.monotonic() - t0
    except TimeoutError:
        return "timeout", time.monotonic() - t0
    except (httpx.HTTPError, ValueError) as exc:
        return f"conn_error:{type(exc).__name__}", time.monotonic() - t0


# ------------------------------------------------------------------------------ processes


def ray_processes() -> dict[int, str]:
    """pid -> label for every live Ray actor process (GCS actor table) and its children."""
    import psutil
    import ray

    out: dict[int, str] = {}
    for row in ray._private.state.actors().values():
        if row.get("State") != "ALIVE" or not row.get("Pid"):
            continue
        pid = int(row["Pid"])
        label = row.get("ActorClassName") or "actor"
        if row.get("Name") and not label.startswith("ServeReplica"):
            label = f"{label}({row['Name']})"
        out[pid] = f"{label} pid={pid}"
        try:
            for child in psutil.Process(pid).children(recursive=True):
                try:
                    cname = child.name()
                except psutil.Error:
                    cname = "child"
                out[child.pid] = f"{cname} (child of {label}) pid={child.pid}"
        except psutil.Error:
            pass
    return out


def rss_sample(pids: dict[int, str]) -> dict[int, int]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return out


def rss_report(labels: dict[int, str], base: dict[int, int], end: dict[int, int]) -> dict[str, Any]:
    rows = []
    for pid, b in sorted(base.items()):
        e = end.get(pid)
        rows.append(
            {
                "pid": pid,
                "process": labels.get(pid, str(pid)),
                "rss_start_mb": round(b / 2**20, 1),
                "rss_end_mb": None if e is None else round(e / 2**20, 1),
                "growth_pct": None if e is None else round(100.0 * (e / b - 1), 2),
            }
        )
    tb = sum(base[p] for p in base if p in end)
    te = sum(end[p] for p in base if p in end)
    return {
        "processes": rows,
        "total_start_mb": round(tb / 2**20, 1),
        "total_end_mb": round(te / 2**20, 1),
        "total_growth_pct": round(100.0 * (te / tb - 1), 2) if tb else None,
        "gone": [labels.get(p, str(p)) for p in base if p not in end],
    }


# ------------------------------------------------------------------------------ the soak


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK:
        try:
            ok = all(info[4][0] in ("127.0.0.1", "::1") for info in socket.getaddrinfo(host, None))
        except OSError:
            ok = False
        if not ok:
            raise SystemExit(f"soak: refusing non-loopback target {url!r}")


async def soak(
    url: str,
    *,
    minutes: float,
    rate: float,
    warmup_s: float = 30.0,
    sample_s: float = 10.0,
    max_requests: int | None = None,
    concurrency: int = 32,
    max_tokens: int = 16,
    model: str = "tiny-qwen3",
    request_timeout_s: float = 150.0,
    mix: dict[str, int] | None = None,
    processes: Callable[[], dict[int, str]] | None = None,
    seed: int = 0,
    warmup_requests: int = 20,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Drive the load; return the report (no pass/fail here: see `verdict`)."""
    import httpx

    check_loopback(url)
    rnd = random.Random(seed)
    prompts = load_prompts()
    mix = mix or MIX
    kinds = [k for k, w in mix.items() for _ in range(w)]
    duration = minutes * 60.0
    limit = max_requests if max_requests is not None else int(duration * rate) + 1
    results: list[tuple[str, str, float, float]] = []  # kind, outcome, latency, t_end (s since start)
    in_flight = 0
    skipped = 0
    samples: list[dict[str, Any]] = []
    labels: dict[int, str] = {}
    base: dict[int, int] | None = None
    base_t = None

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=30.0), limits=limits) as client:
        # warm-up, not counted: one request of each kind at a time (first-call costs: engine
        # paths, LoRA/label tries, connection set-up), then the fixed-rate load
        warm: collections.Counter[str] = collections.Counter()
        for j in range(warmup_requests):
            kind = list(mix)[j % len(mix)]
            path, body = make_request(kind, prompts[j % len(prompts)], model, max_tokens)
            warm[(await one_request(client, url, path, body, request_timeout_s))[0]] += 1
        if warmup_requests:
            log(f"[soak] warm-up requests (not counted): {dict(warm)}")
        t_start = time.monotonic()

        async def fire(kind: str, text: str) -> None:
            nonlocal in_flight
            path, body = make_request(kind, text, model, max_tokens)
            try:
                outcome, latency = await one_request(client, url, path, body, request_timeout_s)
            finally:
                in_flight -= 1
            results.append((kind, outcome, latency, time.monotonic() - t_start))

        async def sampler() -> None:
            nonlocal base, base_t, labels
            while True:
                await asyncio.sleep(sample_s)
                now = time.monotonic() - t_start
                if processes is None:
                    continue
                if base is None and now >= warmup_s:
                    labels = await asyncio.to_thread(processes)
                    base = await asyncio.to_thread(rss_sample, labels)
                    base_t = now
                    log(f"[soak {now:6.0f}s] RSS baseline: {len(base)} processes, {sum(base.values()) / 2**20:.0f} MiB")
                elif base is not None:
                    cur = await asyncio.to_thread(rss_sample, labels)
                    total = sum(cur.get(p, 0) for p in base)
                    samples.append(
                        {
                            "t": round(now, 1),
                            "total_mb": round(total / 2**20, 1),
                            "mb": {str(p): round(v / 2**20, 1) for p, v in cur.items()},
                        }
                    )
                ok = sum(1 for r in results if r[1] == "200")
                log(
                    f"[soak {now:6.0f}s] sent={len(results) + in_flight} done={len(results)} ok={ok} "
                    f"errors={len(results) - ok} in_flight={in_flight} skipped={skipped}"
                )

        sampler_task = asyncio.create_task(sampler())
        tasks = []
        interval = 1.0 / rate
        i = 0
        while i < limit:
            due = t_start + i * interval
            now = time.monotonic()
            if now - t_start >= duration:
                break
            if due > now:
                await asyncio.sleep(due - now)
            if in_flight >= concurrency:
                skipped += 1
            else:
                in_flight += 1
                tasks.append(asyncio.create_task(fire(rnd.choice(kinds), rnd.choice(prompts))))
            i += 1
        load_end = time.monotonic() - t_start
        await asyncio.gather(*tasks)
        sampler_task.cancel()
        end_t = time.monotonic() - t_start

    end = rss_sample(labels) if (processes is not None and base is not None) else None
    by_outcome = collections.Counter(r[1] for r in results)
    by_kind: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for kind, outcome, _, _ in results:
        by_kind[kind][outcome] += 1
    lat = sorted(r[2] for r in results)

    def pct(q: float) -> float | None:
        p = percentile(lat, q)  # None: no requests
        return round(p, 3) if p is not None else None

    report: dict[str, Any] = {
        "url": url,
        "minutes": minutes,
        "rate_per_s": rate,
        "load_s": round(load_end, 1),
        "wall_s": round(end_t, 1),
        "sent": len(results),
        "skipped": skipped,
        "ok": by_outcome.get("200", 0),
        "errors": len(results) - by_outcome.get("200", 0),
        "by_status": dict(sorted(by_outcome.items())),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "latency_s": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "max": round(lat[-1], 3) if lat else None},
        "achieved_rate_per_s": round(len(results) / load_end, 2) if load_end else None,
        "rss": None,
        "rss_samples": samples,
        "rss_baseline_at_s": base_t,
    }
    if end is not None and base is not None:  # `end` is only sampled with a baseline
        report["rss"] = rss_report(labels, base, end)
        # the trend: growth over the second half of the measured span (a leak keeps growing,
        # warm-up growth levels off)
        if len(samples) >= 4:
            mid = samples[len(samples) // 2]
            for row in report["rss"]["processes"]:
                m = mid["mb"].get(str(row["pid"]))
                if m and row["rss_end_mb"]:
                    row["second_half_growth_pct"] = round(100.0 * (row["rss_end_mb"] / m - 1), 2)
    return report


def verdict(report: dict[str, Any], max_errors: int = 0, max_rss_growth_pct: float = 10.0) -> list[str]:
    """Reasons the soak failed (empty: passed)."""
    why = []
    if report["errors"] > max_errors:
        why.append(f"{report['errors']} errors (allowed {max_errors}): {report['by_status']}")
    if report["skipped"]:
        why.append(f"{report['skipped']} arrivals skipped: more than the concurrency limit in flight")
    rss = report.get("rss")
    if rss is None:
        why.append("no RSS measurement (no Ray address, or the run ended before the warm-up)")
    else:
        for row in rss["processes"]:
            if row["growth_pct"] is not None and row["growth_pct"] >= max_rss_growth_pct:
                why.append(
                    f"RSS of {row['process']} grew {row['growth_pct']} % "
                    f"({row['rss_start_mb']} -> {row['rss_end_mb']} MiB)"
                )
        if rss["total_growth_pct"] is not None and rss["total_growth_pct"] >= max_rss_growth_pct:
            why.append(f"total RSS grew {rss['total_growth_pct']} %")
        if rss["gone"]:
            why.append(f"processes gone during the run (crashed or replaced): {rss['gone']}")
    return why


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"soak against {report['url']}: {report['load_s']} s of load at {report['rate_per_s']}/s "
        f"(achieved {report['achieved_rate_per_s']}/s)",
        f"  sent={report['sent']} ok={report['ok']} errors={report['errors']} skipped={report['skipped']} "
        f"by_status={report['by_status']}",
        f"  by kind: {report['by_kind']}",
        f"  latency s: {report['latency_s']}",
    ]
    rss = report.get("rss")
    if rss:
        lines.append(
            f"  RSS (baseline after {report['rss_baseline_at_s']} s -> end): total "
            f"{rss['total_start_mb']} -> {rss['total_end_mb']} MiB ({rss['total_growth_pct']:+} %)"
        )
        for row in sorted(rss["processes"], key=lambda r: -(r["growth_pct"] or 0)):
            half = row.get("second_half_growth_pct")
            growth = "   gone  " if row["growth_pct"] is None else f"{row['growth_pct']:+7.2f} %"
            lines.append(
                f"    {growth}  {row['rss_start_mb']:8.1f} -> {row['rss_end_mb']} MiB  "
                f"{'' if half is None else f'(2nd half {half:+.2f} %)  '}{row['process']}"
            )
        if rss["gone"]:
            lines.append(f"  processes gone during the run: {rss['gone']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ own app


def soak_app_args(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A small fixed-size app: one replica per deployment, no autoscaling, no rate limit."""
    from deployments.config import deep_merge

    base = {
        "accelerator": "cpu",
        "model": {"model_id": "tiny-qwen3", "model_source": str(REPO / "models" / "tiny-qwen3")},
        "lora": {"adapters": {"news-lora": str(REPO / "models" / "tiny-qwen3-lora")}},
        "engine": {"max_model_len": 1024, "cpu_kvcache_space_gib": 1},
        "rate_limit": {"enabled": False},
        "deployments": {
            "tokenizer": {"ray_actor_options": {"num_cpus": 0.1}},
            "ingress": {"ray_actor_options": {"num_cpus": 0.1}},
        },
    }
    return deep_merge(base, overrides or {})


def start_own_app(name: str = "soak", num_cpus: int = 4) -> str:
    """A local Ray cluster (stopped with `stop_own_app`) and the app on a free loopback port."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only throwaway cluster
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from serve_app import build_app

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "VLLM_NO_USAGE_STATS": "1"}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(soak_app_args()), name=name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url


def stop_own_app() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    try:
        wait_http(f"{url}/health", timeout_s)
    except TimeoutError:
        raise SystemExit(f"soak: {url} not healthy within {timeout_s:.0f} s") from None


def parse_mix(text: str) -> dict[str, int]:
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        if kind not in MIX:
            raise SystemExit(f"soak: unknown request kind {kind!r} (known: {', '.join(MIX)})")
        mix[kind] = int(weight or 1)
    return {k: w for k, w in mix.items() if w > 0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--url", help="a running service (loopback only), e.g. http://127.0.0.1:8000")
    t.add_argument("--start-app", action="store_true", help="start a local Ray cluster and the app here")
    p.add_argument("--ray-address", help="with --url: the app's Ray GCS address, to find its processes (RSS)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (fixed schedule)")
    p.add_argument("--max-requests", type=int, default=None, help="stop after this many (default: rate x time)")
    p.add_argument("--concurrency", type=int, default=32, help="most requests in flight")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--mix",
        default=",".join(f"{k}={v}" for k, v in MIX.items()),
        help="request kinds and weights: chat, chat_stream, completion, classify",
    )
    p.add_argument("--warmup-requests", type=int, default=20, help="sequential requests before the load (not counted)")
    p.add_argument("--model", default="tiny-qwen3")
    p.add_argument("--warmup-s", type=float, default=30.0, help="RSS baseline after this much load")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--max-errors", type=int, default=0)
    p.add_argument("--max-rss-growth", type=float, default=10.0, help="percent, per process and in total")
    p.add_argument("--ray-num-cpus", type=int, default=4, help="with --start-app")
    p.add_argument("--out", type=Path, default=None, help="report JSON (default reports/soak-<time>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.url:
        check_loopback(opts.url)
    processes = None
    started = False
    try:
        if opts.start_app:
            url = start_own_app(num_cpus=opts.ray_num_cpus)
            started = True
            processes = ray_processes
        else:
            url = opts.url.rstrip("/")
            if opts.ray_address:
                import ray

                ray.init(address=opts.ray_address, log_to_driver=False)
                processes = ray_processes
        report = asyncio.run(
            soak(
                url,
                minutes=opts.minutes,
                rate=opts.rate,
                warmup_s=opts.warmup_s,
                sample_s=opts.sample_s,
                max_requests=opts.max_requests,
                concurrency=opts.concurrency,
                max_tokens=opts.max_tokens,
                model=opts.model,
                processes=processes,
                mix=parse_mix(opts.mix),
                warmup_requests=opts.warmup_requests,
            )
        )
    finally:
        if started:
            stop_own_app()
    why = verdict(report, opts.max_errors, opts.max_rss_growth)
    report["verdict"] = {"passed": not why, "reasons": why}
    out = opts.out or REPO / "reports" / f"soak-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(format_report(report))
    print(f"report: {out}")
    print("PASSED" if not why else "FAILED:\n  " + "\n  ".join(why))
    return 0 if not why else 1


if __name__ == "__main__":
    sys.exit(main())
