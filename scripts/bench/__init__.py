"""The benchmark (`scripts/benchmark.py` is its command line; the modes, load and output are
described in `scripts/bench/cli.py`):

- `common`: paths, defaults, the issue-6 targets, small helpers;
- `client`: the load client (aiohttp, SSE) and the closed-loop, open-loop and burst drivers;
- `prompts`: TNEWS and synthetic prompts;
- `stats`: per-request results, run summaries, pooled repeats, comparison and checks;
- `servers`: vLLM's server and our Serve app, started and stopped here;
- `runner`: the load points and the order in which the targets are driven;
- `machine`: the machine's description and load;
- `report`: text tables, report.json, report.html (templates/report.html.j2) with the plots;
- `cli`: the flags and `main`.

The names below are the package's interface (tests, other tools)."""

from scripts.bench.cli import main, parse_args, resolve_model_name
from scripts.bench.client import (
    LoadSpec,
    burst,
    closed_loop,
    handle_sse_line,
    open_loop,
    poisson_arrivals,
    run_async,
    send_request,
)
from scripts.bench.common import TARGETS, check_loopback, parse_list
from scripts.bench.prompts import classification_prompt, load_tnews, synthetic_prompts
from scripts.bench.report import compare_text, cpu_rows, finish_report, make_plots, points_text, render_html
from scripts.bench.runner import Point, build_points, max_ongoing_for, requests_for, run_overload, run_point, warmup_for
from scripts.bench.servers import Servers, engine_kwargs_for, read_env_file, service_args, thread_binding, vllm_cli_args
from scripts.bench.stats import (
    SLO,
    RequestResult,
    aggregate,
    categorize,
    check_targets,
    compare_rows,
    compute_stats,
    get_metric,
    overload_checks,
    percentile,
    pool_cpu,
    summarize,
    window_stats,
)

__all__ = [
    "SLO",
    "TARGETS",
    "LoadSpec",
    "Point",
    "RequestResult",
    "Servers",
    "aggregate",
    "build_points",
    "burst",
    "categorize",
    "check_loopback",
    "check_targets",
    "classification_prompt",
    "closed_loop",
    "compare_rows",
    "compare_text",
    "compute_stats",
    "cpu_rows",
    "engine_kwargs_for",
    "finish_report",
    "get_metric",
    "handle_sse_line",
    "load_tnews",
    "main",
    "make_plots",
    "max_ongoing_for",
    "open_loop",
    "overload_checks",
    "parse_args",
    "parse_list",
    "percentile",
    "points_text",
    "poisson_arrivals",
    "pool_cpu",
    "read_env_file",
    "render_html",
    "requests_for",
    "resolve_model_name",
    "run_async",
    "run_overload",
    "run_point",
    "send_request",
    "service_args",
    "summarize",
    "synthetic_prompts",
    "thread_binding",
    "vllm_cli_args",
    "warmup_for",
    "window_stats",
]
