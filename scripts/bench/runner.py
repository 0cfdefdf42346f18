"""Running the load: the points of a sweep (closed loop at each concurrency, open loop at each
rate, streaming or not), one run per point, target and repeat; the overload phase; the
orders in which the targets are driven (one target, side by side alternating, sequential)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.bench import vllm_client
from scripts.bench.client import LoadSpec, burst, closed_loop, open_loop, run_async
from scripts.bench.common import fmt
from scripts.bench.cpu import cpu_per_request, snapshot
from scripts.bench.machine import cpu_busy, cpu_times, machine_load
from scripts.bench.prompts import load_tnews, synthetic_prompts
from scripts.bench.servers import Servers
from scripts.bench.stats import SLO, compute_stats, one_line, overload_checks, window_stats


@dataclasses.dataclass
class Point:
    """One load point: closed loop at `concurrency` or open loop at `rate` req/s."""

    mode: str  # closed | open
    stream: bool
    concurrency: int | None = None
    rate: float | None = None
    max_ongoing: int = 3
    client: str = "ours"  # the load generator: ours | vllm (vLLM's `vllm bench serve`)

    @property
    def key(self) -> str:
        load = f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.rate:g}/s"
        return f"{'stream' if self.stream else 'nostream'} {load}" + (" [vLLM client]" if self.client == "vllm" else "")

    @property
    def x(self) -> float:
        return float(self.concurrency if self.mode == "closed" else self.rate)  # type: ignore[arg-type]


def max_ongoing_for(concurrency: int | None, values: Sequence[int]) -> int:
    """The smallest configured max_ongoing_requests >= the concurrency, else the largest
    (`--max-ongoing 3,32`: c=1,3 -> 3; c=8,16,32 -> 32). Open-loop points use the first."""
    if concurrency is None:
        return values[0]
    fitting = [v for v in values if v >= concurrency]
    return min(fitting) if fitting else max(values)


def build_points(opts: argparse.Namespace) -> list[Point]:
    streams = {"on": [True], "off": [False], "both": [True, False]}[opts.stream]
    points = []
    clients = ["ours", "vllm"] if opts.client == "both" else [opts.client]
    for s in streams:
        for c in opts.concurrency:
            for client in clients:
                if client == "vllm" and not s:
                    continue  # vLLM's chat client always streams
                points.append(
                    Point("closed", s, concurrency=c, max_ongoing=max_ongoing_for(c, opts.max_ongoing), client=client)
                )
        if "ours" in clients:
            for r in opts.rate:
                points.append(Point("open", s, rate=r, max_ongoing=opts.max_ongoing[0]))
    return points


def requests_for(point: Point, opts: argparse.Namespace) -> int:
    if opts.num_requests:
        return opts.num_requests
    if point.mode == "closed":
        return max(40, 10 * int(point.concurrency or 1))
    return max(40, int(math.ceil((point.rate or 1) * 20)))


def warmup_for(point: Point, opts: argparse.Namespace) -> int:
    if opts.warmup is not None:
        return opts.warmup
    return min(max(2, int(point.concurrency or 4)), 32)


def make_prompts(opts: argparse.Namespace, n: int, seed: int) -> list[str]:
    if opts.dataset == "tnews":
        return load_tnews(opts.dataset_path, n, seed)
    tok = Path(opts.model) / "tokenizer.json"
    return synthetic_prompts(tok, opts.input_len, n, seed)


def run_point(
    target: str,
    base_url: str,
    point: Point,
    opts: argparse.Namespace,
    slo: SLO,
    repeat: int,
    point_index: int,
    session: int | None = None,
) -> dict[str, Any]:
    """One run of one point against one server; `session`: the server's session id, whose
    processes' CPU seconds per request are recorded by role (`cpu.py`)."""
    spec = LoadSpec(
        endpoint=opts.endpoint,
        model=opts.served_model_name_resolved,
        output_len=opts.output_len,
        ignore_eos=opts.ignore_eos,
        temperature=opts.temperature,
        stream=point.stream,
        timeout_s=opts.timeout,
        api_key=opts.api_key,
    )
    n = requests_for(point, opts)
    seed = opts.seed * 1000 + point_index * 17 + repeat  # identical load for every target
    prompts = make_prompts(opts, n, seed)
    desc = f"{target:>4} {point.key}"
    if point.client == "vllm":
        vllm_client.parser()  # vLLM imported before the measured window
    load_before = machine_load()
    cpu0 = cpu_times()
    procs0 = snapshot(session)
    warmups = warmup_for(point, opts)
    results = None
    if point.client == "vllm":
        stats = vllm_client.run_point(
            base_url,
            prompts,
            int(point.concurrency or 1),
            opts,
            opts.out_dir,
            f"{target}-{point_index}-{repeat}-c{point.concurrency}",
            warmups,
        )
    elif point.mode == "closed":
        results, duration = run_async(
            closed_loop(
                base_url, spec, prompts, int(point.concurrency or 1), opts.max_duration, warmups, opts.progress, desc
            )
        )
    else:
        results, duration = run_async(
            open_loop(
                base_url, spec, prompts, float(point.rate or 1), opts.max_duration, seed, warmups, opts.progress, desc
            )
        )
    if results is not None:
        stats = compute_stats(results, duration, slo)
    stats["machine"] = {**load_before, "cpu_busy_pct": cpu_busy(cpu0)}
    if session is not None:  # warm-up requests cost CPU too: counted in the divisor
        stats["server_cpu"] = cpu_per_request(procs0, snapshot(session), stats["num_requests"] + warmups)
    run = {
        "target": target,
        "point": point.key,
        "mode": point.mode,
        "stream": point.stream,
        "concurrency": point.concurrency,
        "rate": point.rate,
        "max_ongoing": point.max_ongoing,
        "repeat": repeat,
        "stats": stats,
    }
    if results is not None:
        run["_results"] = results  # pooled across repeats; written to JSON only with --save-requests
    print(f"[bench] {desc} rep{repeat}: {one_line(stats)}", file=sys.stderr, flush=True)
    return run


def run_overload(
    base_url: str, opts: argparse.Namespace, slo: SLO, max_ongoing: int | None, max_queued: int | None
) -> dict[str, Any]:
    spec = LoadSpec(
        endpoint=opts.endpoint,
        model=opts.served_model_name_resolved,
        output_len=opts.output_len,
        ignore_eos=opts.ignore_eos,
        temperature=opts.temperature,
        stream=opts.stream != "off",
        timeout_s=opts.timeout,
        api_key=opts.api_key,
    )
    cap_c = opts.capacity_concurrency or max_ongoing or 3
    cap: dict[str, Any] = {"concurrency": cap_c}
    if opts.capacity_rps:
        cap["request_throughput"] = opts.capacity_rps
    else:
        n = max(40, 10 * cap_c)
        res, dur = run_async(
            closed_loop(
                base_url,
                spec,
                make_prompts(opts, n, opts.seed + 101),
                cap_c,
                opts.max_duration,
                min(cap_c, 8),
                opts.progress,
                f"capacity c={cap_c}",
            )
        )
        s = compute_stats(res, dur, slo)
        cap.update({k: s[k] for k in ("request_throughput", "output_throughput", "ttft_ms", "e2e_ms", "status_counts")})
        print(f"[bench] capacity c={cap_c}: {one_line(s)}", file=sys.stderr, flush=True)
    rate = opts.overload_factor * cap["request_throughput"]
    n = max(1, int(math.ceil(rate * opts.overload_duration)))
    res, dur = run_async(
        open_loop(
            base_url,
            spec,
            make_prompts(opts, n, opts.seed + 202),
            rate,
            opts.overload_duration,
            opts.seed + 202,
            0,
            opts.progress,
            f"overload {rate:.1f} req/s",
        )
    )
    over = compute_stats(res, dur, slo)
    over["window"] = window_stats(res, opts.overload_duration, slo)
    print(
        f"[bench] overload {rate:.2f} req/s: {one_line(over)}; 503 p99 {fmt(over['latency_503_ms']['p99'])} ms",
        file=sys.stderr,
        flush=True,
    )
    burst_n = opts.burst
    if burst_n is None and max_ongoing is not None and max_queued is not None and max_queued >= 0:
        burst_n = 2 * (max_ongoing + max_queued)
    burst_stats = None
    if burst_n:
        time.sleep(2.0)  # let the overload's tail drain
        res, dur = run_async(burst(base_url, spec, make_prompts(opts, burst_n, opts.seed + 303)))
        burst_stats = compute_stats(res, dur, slo)
        print(f"[bench] burst of {burst_n}: {burst_stats['status_counts']}", file=sys.stderr, flush=True)
    expected = (
        (max_ongoing + max_queued) if (max_ongoing is not None and max_queued is not None and max_queued >= 0) else None
    )
    return {
        "capacity": cap,
        "factor": opts.overload_factor,
        "offered_rps": rate,
        "duration_s": opts.overload_duration,
        "max_ongoing": max_ongoing,
        "max_queued": max_queued,
        "overload": over,
        "burst": burst_stats,
        "burst_size": burst_n,
        "expected_admitted": expected,
        "checks": overload_checks(cap["request_throughput"], over, burst_stats, expected),
    }


def run_overload_phase(opts, servers: Servers | None, slo: SLO) -> dict[str, Any]:
    """`run_overload` against --url, vLLM's server (--start vllm) or our app (the default)."""
    if opts.url:
        url, mo, mq = opts.url, (opts.capacity_concurrency or opts.max_ongoing[0]), opts.max_queued
    elif opts.start == "vllm":  # reference only: vLLM queues without limit, it never answers 503
        assert servers is not None  # started here unless --url
        url, mo, mq = servers.start_vllm(), (opts.capacity_concurrency or opts.max_ongoing[0]), None
    else:
        assert servers is not None  # started here unless --url
        mo = opts.max_ongoing[0]
        mq = opts.max_queued if opts.max_queued is not None else _config_max_queued(servers)
        if servers.vllm is not None and opts.order == "sequential":
            servers.stop_vllm()
        url = servers.start_ours(mo, mq)
    return run_overload(url, opts, slo, mo, mq)


def _config_max_queued(servers: Servers) -> int:
    args = (servers.serve_yaml.get("applications") or [{}])[0].get("args") or {}
    return int(((args.get("deployments") or {}).get("model") or {}).get("max_queued_requests", 10))


def _sweep_max_queued(opts: argparse.Namespace) -> int:
    return opts.max_queued if opts.max_queued is not None else -1


def run_single(opts, servers: Servers | None, points: list[Point], slo: SLO, report: dict[str, Any]) -> None:
    target = "url" if opts.url else opts.start
    order = sorted(range(len(points)), key=lambda i: points[i].max_ongoing)  # fewest restarts
    for i in order:
        p = points[i]
        if opts.url:
            url, server = opts.url, None
        else:
            assert servers is not None  # started here unless --url
            if opts.start == "vllm":
                url = servers.start_vllm()
            else:
                url = servers.start_ours(p.max_ongoing, _sweep_max_queued(opts))
            server = servers.vllm if opts.start == "vllm" else servers.ours
        for rep in range(opts.repeats):
            report["runs"].append(run_point(target, url, p, opts, slo, rep, i, _session(server)))


def _session(server) -> int | None:
    """A server started here leads its own session (cluster.processes.spawn)."""
    return server.pid if server is not None else None


def run_compare(opts, servers: Servers, points: list[Point], slo: SLO, report: dict[str, Any]) -> None:
    mq = _sweep_max_queued(opts)
    groups: dict[int, list[tuple[int, Point]]] = {}
    for i, p in enumerate(points):
        groups.setdefault(p.max_ongoing, []).append((i, p))
    if opts.order == "sequential":
        vllm_url = servers.start_vllm()
        for i, p in enumerate(points):
            for rep in range(opts.repeats):
                report["runs"].append(run_point("vllm", vllm_url, p, opts, slo, rep, i, _session(servers.vllm)))
        servers.stop_vllm()
        for mo, items in groups.items():
            url = servers.start_ours(mo, mq)
            for i, p in items:
                for rep in range(opts.repeats):
                    report["runs"].append(run_point("ours", url, p, opts, slo, rep, i, _session(servers.ours)))
        return
    vllm_url = servers.start_vllm()
    k = 0
    for mo, items in groups.items():
        url = servers.start_ours(mo, mq)
        for i, p in items:
            for rep in range(opts.repeats):
                order = ["vllm", "ours"] if k % 2 == 0 else ["ours", "vllm"]  # flip every time
                k += 1
                for target in order:
                    vllm = target == "vllm"
                    report["runs"].append(
                        run_point(
                            target,
                            vllm_url if vllm else url,
                            p,
                            opts,
                            slo,
                            rep,
                            i,
                            _session(servers.vllm if vllm else servers.ours),
                        )
                    )
