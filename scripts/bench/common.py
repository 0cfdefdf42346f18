"""Paths, defaults and small helpers shared by the benchmark's modules."""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "scripts" / "benchmark.py"  # the command line (also runs the Serve child)
DEFAULT_DATASET = REPO.parent / "shared" / "data" / "tnews" / "test.json"
DEFAULT_MODEL = "models/tiny-qwen3"
DEFAULT_SERVE_CONFIG = REPO / "configs" / "serve_config.yaml"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
RUN_MARKER_ENV = "LLM_BENCH_RUN_ID"
CHILD_READY = "BENCH_SERVE_CHILD_READY"

# Issue 14's targets, evaluated wherever the matching points were measured (each client's
# points separately; the referee is vLLM's client). (stream, concurrency, metric, kind,
# threshold): kind "ratio_min" = ours/vLLM >= threshold, "ratio_max" = ours/vLLM <= threshold,
# "delta_max_ms" = ours - vLLM <= threshold (milliseconds).
TARGETS: list[dict[str, Any]] = [
    {
        "name": "c=3 streaming: output tokens/s >= 0.95x vLLM",
        "stream": True,
        "concurrency": 3,
        "metric": "output_throughput",
        "kind": "ratio_min",
        "threshold": 0.95,
    },
    {
        "name": "c=3 streaming: TTFT p50 within +8 ms of vLLM",
        "stream": True,
        "concurrency": 3,
        "metric": "ttft_ms.p50",
        "kind": "delta_max_ms",
        "threshold": 8.0,
    },
    {
        "name": "c=32 streaming: output tokens/s >= 0.90x vLLM",
        "stream": True,
        "concurrency": 32,
        "metric": "output_throughput",
        "kind": "ratio_min",
        "threshold": 0.90,
    },
    {
        "name": "c=32 streaming: TTFT p50 within +25 ms of vLLM",
        "stream": True,
        "concurrency": 32,
        "metric": "ttft_ms.p50",
        "kind": "delta_max_ms",
        "threshold": 25.0,
    },
    {
        "name": "non-streaming: requests/s >= 0.95x vLLM (every concurrency measured)",
        "stream": False,
        "concurrency": None,
        "metric": "request_throughput",
        "kind": "ratio_min",
        "threshold": 0.95,
    },
    {
        "name": "front-end CPU per request <= 2x vLLM's API server",
        "stream": None,
        "concurrency": None,
        "metric": "front_end_cpu_ms",
        "kind": "ratio_max",
        "threshold": 2.0,
    },
]


def parse_list(text: str | None, cast: Callable[[str], Any] = int) -> list[Any]:
    """'1,3, 8' -> [1, 3, 8]; '' or None -> []."""
    if text is None:
        return []
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def check_loopback(url: str) -> str:
    """Only loopback targets: this tool generates load, it must never point at someone else."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parsed.hostname
    if host not in LOOPBACK_HOSTS and not host.startswith("127."):
        raise ValueError(f"refusing non-loopback target {host!r}: benchmark loopback servers only")
    return url.rstrip("/")


def now_stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def fmt(v: Any, digits: int = 1) -> str:
    """A figure for tables: '-' for none/NaN, thousands separators for floats."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)
