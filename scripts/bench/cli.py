"""OpenAI-compatible load generator and side-by-side benchmark against vLLM's own server.

Modes (see docs/performance.md for the method and how to read the report):

* one target: ``--url http://127.0.0.1:PORT`` (a server that is already running) or
  ``--start ours|vllm`` (started here, stopped at the end);
* ``--compare``: starts vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
  and our Serve app with the same model and engine arguments, drives the identical load at each
  point against both (alternating, so both share the machine's noise) and prints the ratios
  ours/vLLM;
* ``--overload``: measures capacity (closed loop at ``max_ongoing_requests``), then offers
  ``--overload-factor`` (3) × that rate as a Poisson stream and fires one simultaneous burst;
  reports status counts, 503 latency and goodput.

Load: closed loop (fixed concurrency, ``--concurrency 1,3,8,16,32``) and/or open loop (Poisson
arrivals, ``--rate 5,10``); streaming and non-streaming (``--stream on|off|both``); chat or
completions; real prompts from ``../shared/data/tnews/test.json`` or synthetic prompts of a fixed
token length; fixed output length (``ignore_eos`` + ``max_tokens``). Every run is bounded by a
request count and a wall-clock limit; targets must be loopback addresses.

Output: ``report.json`` and ``report.html`` (tables and plots) in ``--out-dir``
(default ``reports/benchmark-<time>/``, git-ignored), plus the servers' logs.

    .venv/bin/python scripts/benchmark.py --compare            # the side-by-side run
    .venv/bin/python scripts/benchmark.py --url http://127.0.0.1:8000 --concurrency 1,3
    .venv/bin/python scripts/benchmark.py --start ours --overload

Servers started here run in their own sessions; they, and every process they spawned (found by
pid and by a per-run marker in their environment), are stopped at the end, on errors and on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.haproxy_wrapper import fast_path_env
from scripts.bench.common import (
    DEFAULT_DATASET,
    DEFAULT_MODEL,
    DEFAULT_SERVE_CONFIG,
    REPO,
    check_loopback,
    now_stamp,
    parse_list,
)
from scripts.bench.machine import machine_info
from scripts.bench.report import finish_report
from scripts.bench.runner import build_points, run_compare, run_overload_phase, run_single
from scripts.bench.servers import Servers, read_env_file, serve_child, stop_all
from scripts.bench.stats import SLO


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("what to benchmark")
    g.add_argument(
        "--compare",
        action="store_true",
        help="start vLLM's OpenAI server and our Serve app, drive the same load at each point against both",
    )
    g.add_argument("--url", help="benchmark a running server (loopback only), e.g. http://127.0.0.1:8000")
    g.add_argument("--start", choices=["ours", "vllm"], help="start one server here and benchmark it")
    g.add_argument(
        "--overload",
        action="store_true",
        help="overload phase against our app (or --url): capacity, Poisson at factor x capacity, burst",
    )
    g.add_argument("--model", default=DEFAULT_MODEL, help="model directory (the same for both servers)")
    g.add_argument(
        "--served-model-name",
        default=None,
        help="model name in requests (default: the config's model_id, or /v1/models with --url)",
    )
    g.add_argument(
        "--serve-config",
        type=Path,
        default=DEFAULT_SERVE_CONFIG,
        help="Serve config whose http_options and application args our app starts from",
    )
    g.add_argument(
        "--max-ongoing",
        default="3,32",
        help="our model deployment's max_ongoing_requests; a list: each concurrency runs against the "
        "smallest value >= it, else the largest (3,32: c<=3 -> 3, c>3 -> 32)",
    )
    g.add_argument(
        "--max-queued",
        type=int,
        default=None,
        help="our max_queued_requests (default: -1 = unbounded for sweeps, so queued closed-loop "
        "requests wait as in vLLM; the config's value, 10, for --overload)",
    )
    g.add_argument(
        "--order",
        choices=["alternate", "sequential"],
        default="alternate",
        help="compare: both servers up, targets alternating at each point (shared noise); or one "
        "server at a time (isolation: no idle Ray next to vLLM)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="GPU only: engine memory fraction for both servers (default: the config's; 0.4 each when "
        "--compare --order alternate puts both on one GPU)",
    )
    g.add_argument("--vllm-args", default="", help="extra flags for vLLM's server, e.g. '--disable-uvicorn-access-log'")
    g.add_argument("--vllm-env", action="append", default=[], metavar="K=V", help="extra env for vLLM's server")
    g.add_argument("--ours-env", action="append", default=[], metavar="K=V", help="extra env for our Serve app")
    g.add_argument(
        "--ours-env-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="KEY=VALUE lines (# comments) for our Serve app's Ray cluster, over the "
        "request path's environment; --ours-env wins",
    )
    g.add_argument(
        "--ours-path",
        choices=["fast", "python-proxy"],
        default="fast",
        help="our app's request path: Serve's fast path as `make run` serves it "
        "(configs/fast-path.env + llm-serve-haproxy; default) or Serve's Python proxy",
    )
    g.add_argument(
        "--serve-override",
        default=None,
        help="JSON deep-merged over our app's ServiceConfig args (also feeds vLLM's engine args)",
    )
    g.add_argument(
        "--keep-autoscaling",
        action="store_true",
        help="keep the config's autoscaling_configs (default: fixed replicas, one model replica, "
        "so one engine is compared with one engine)",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY", "unused"),
        help="Bearer key sent with every request (for --url targets with auth on)",
    )
    g.add_argument(
        "--ray-num-cpus",
        type=int,
        default=max(2, os.cpu_count() or 2),
        help="logical CPUs of the local Ray cluster started for our app",
    )
    g.add_argument("--startup-timeout", type=float, default=600.0)

    g = p.add_argument_group("load")
    g.add_argument(
        "--client",
        choices=["ours", "vllm", "both"],
        default=None,
        help="load generator: ours, vLLM's `vllm bench serve` (streaming closed-loop points "
        "only; the referee) or both, each point run with each (default: both with "
        "--compare, else ours)",
    )
    g.add_argument(
        "--concurrency", default=None, help="closed-loop points (default 1,3,8,16,32; none with --rate only)"
    )
    g.add_argument("--rate", default="", help="open-loop Poisson points, req/s, e.g. 5,10")
    g.add_argument(
        "--stream",
        choices=["on", "off", "both"],
        default=None,
        help="streaming requests (default: both with --compare, else on)",
    )
    g.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    g.add_argument("--dataset", choices=["tnews", "synthetic"], default="tnews")
    g.add_argument("--dataset-path", type=Path, default=DEFAULT_DATASET)
    g.add_argument("--input-len", type=int, default=128, help="synthetic prompt length in tokens")
    g.add_argument("--output-len", type=int, default=64, help="max_tokens of every request")
    g.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let generation stop at EOS (default: ignore_eos, fixed output length)",
    )
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument(
        "--num-requests",
        type=int,
        default=0,
        help="requests per point and repeat (0: max(40, 10 x concurrency), or max(40, 20 s x rate))",
    )
    g.add_argument("--max-duration", type=float, default=120.0, help="wall-clock limit per point and repeat, s")
    g.add_argument(
        "--warmup", type=int, default=None, help="unrecorded requests before each point (default ~concurrency)"
    )
    g.add_argument("--repeats", type=int, default=1, help="runs per point and target (alternating order)")
    g.add_argument("--timeout", type=float, default=130.0, help="client timeout per request, s")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("goodput targets")
    g.add_argument("--slo-ttft-ms", type=float, default=500.0)
    g.add_argument("--slo-tpot-ms", type=float, default=20.0)
    g.add_argument("--slo-e2e-ms", type=float, default=None)

    g = p.add_argument_group("overload")
    g.add_argument("--overload-factor", type=float, default=3.0)
    g.add_argument("--overload-duration", type=float, default=30.0, help="seconds of Poisson arrivals")
    g.add_argument("--capacity-rps", type=float, default=None, help="skip the capacity measurement")
    g.add_argument("--capacity-concurrency", type=int, default=None, help="default: max_ongoing_requests")
    g.add_argument(
        "--burst",
        type=int,
        default=None,
        help="simultaneous requests after the overload (default 2 x (max_ongoing + max_queued); 0: none)",
    )

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, default=None, help="default reports/benchmark-<time>/")
    g.add_argument("--save-requests", action="store_true", help="keep every request's timings in report.json")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--_serve-child", dest="serve_child", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.serve_child:
        return opts
    modes = sum(bool(x) for x in (opts.compare, opts.url, opts.start))
    if modes > 1:
        p.error("choose one of --compare, --url, --start")
    if modes == 0 and not opts.overload:
        p.error("choose --compare, --url URL or --start ours|vllm (and/or --overload)")
    if opts.url:
        try:
            opts.url = check_loopback(opts.url)
        except ValueError as exc:
            p.error(str(exc))
    opts.max_ongoing = parse_list(opts.max_ongoing)
    if not opts.max_ongoing:
        p.error("--max-ongoing needs at least one value")
    opts.rate = parse_list(opts.rate, float)
    if opts.concurrency is None:
        opts.concurrency = [] if opts.rate else [1, 3, 8, 16, 32]
    else:
        opts.concurrency = parse_list(opts.concurrency)
    if opts.stream is None:
        opts.stream = "both" if opts.compare else "on"
    if opts.client is None:
        opts.client = "both" if opts.compare else "ours"
    opts.vllm_env = dict(kv.split("=", 1) for kv in opts.vllm_env)
    path_env = fast_path_env() if opts.ours_path == "fast" else {"FORWARDED_ALLOW_IPS": ""}
    opts.ours_env = {**path_env, **read_env_file(opts.ours_env_file), **dict(kv.split("=", 1) for kv in opts.ours_env)}
    opts.serve_override = json.loads(opts.serve_override) if opts.serve_override else None
    if opts.out_dir is None:
        opts.out_dir = REPO / "reports" / f"benchmark-{now_stamp()}"
    return opts


def resolve_model_name(opts: argparse.Namespace, serve_yaml: dict[str, Any] | None, url: str | None) -> str:
    if opts.served_model_name:
        return opts.served_model_name
    if url:
        import urllib.request

        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
                return json.loads(resp.read())["data"][0]["id"]
        except Exception:
            pass
    if serve_yaml:
        mid = ((serve_yaml.get("applications") or [{}])[0].get("args") or {}).get("model", {}).get("model_id")
        if mid and Path(opts.model).resolve() == (REPO / DEFAULT_MODEL).resolve():
            return mid
    return Path(opts.model).name


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.serve_child:
        return serve_child(opts.serve_child)
    os.chdir(REPO)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    slo = SLO(opts.slo_ttft_ms, opts.slo_tpot_ms, opts.slo_e2e_ms)
    run_id = uuid.uuid4().hex
    report: dict[str, Any] = {
        "meta": {
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "run_id": run_id,
            "machine": machine_info(),
        },
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "runs": [],
        "points": [],
        "compare": [],
        "targets_check": [],
        "servers": {},
    }

    def _sigterm(*_):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if started with it ignored
    servers = Servers(opts, opts.out_dir, run_id) if not opts.url else None
    if servers is not None and opts.compare and opts.order == "alternate" and opts.gpu_memory_utilization is None:
        if not servers.cpu():
            opts.gpu_memory_utilization = 0.4  # two engines share the GPU
    opts.served_model_name_resolved = resolve_model_name(opts, servers.serve_yaml if servers else None, opts.url)
    points = build_points(opts)
    status = 0
    interrupted = False
    try:
        if opts.compare:
            assert servers is not None  # --compare excludes --url
            run_compare(opts, servers, points, slo, report)
        elif opts.url or opts.start:
            run_single(opts, servers, points, slo, report)
        if opts.overload:
            report["overload"] = run_overload_phase(opts, servers, slo)
    except KeyboardInterrupt:
        interrupted = True
        status = 130
        print("\n[bench] interrupted: stopping servers, writing what was measured", file=sys.stderr)
    except Exception as exc:
        status = 1
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[bench] error: {exc}", file=sys.stderr)
    finally:
        if servers is not None:
            report["servers"] = servers.info
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # don't interrupt the shutdown
            try:
                servers.stop()
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        stop_all()
    finish_report(report, points, slo, opts, interrupted)
    return status
