#!/usr/bin/env python3
"""Live terminal view of the LLM service: waiting/running/total requests, TTFT p50/p95,
tokens/s and rejections by reason, from GET /metrics and GET /stats (cluster-wide figures).

    python scripts/monitor.py                          # http://127.0.0.1:8000, every 5 s
    python scripts/monitor.py --url http://llm:8000 --interval 2 --api-key $KEY
    python scripts/monitor.py --once                   # one snapshot, then exit (1 if unreachable)
    python scripts/monitor.py --once --json            # the raw figures as JSON

Uses `rich` when installed (and stdout is a terminal), else plain text (`--plain` forces it).
tokens/s and requests/s are live rates: the change in the totals between two polls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

REASONS = ("queue_full", "rate_limited", "invalid", "timeout", "unauthorized", "unavailable")


@dataclass
class Snapshot:
    url: str
    at: float = field(default_factory=time.time)
    metrics: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def fetch(client: httpx.Client, url: str, api_key: str | None = None) -> Snapshot:
    """GET /metrics and /stats of `url`; errors end up in `Snapshot.error`, never raised."""
    snap = Snapshot(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    problems = []
    for path, attr in (("/metrics", "metrics"), ("/stats", "stats")):
        try:
            r = client.get(url.rstrip("/") + path, headers=headers)
            if r.status_code != 200:
                msg = r.text[:200]
                try:
                    msg = r.json()["error"]["message"]
                except Exception:
                    pass
                problems.append(f"{path}: HTTP {r.status_code} {msg}")
                continue
            setattr(snap, attr, r.json())
        except (httpx.HTTPError, ValueError) as exc:
            problems.append(f"{path}: {type(exc).__name__}: {exc}")
    if problems:
        snap.error = "; ".join(problems)
    return snap


def rates(cur: Snapshot, prev: Snapshot | None) -> dict[str, float | None]:
    """Live rates between two snapshots (None before the second poll)."""
    out: dict[str, float | None] = {"tokens_per_s": None, "requests_per_s": None}
    if prev is None or not prev.metrics or not cur.metrics:
        return out
    dt = cur.at - prev.at
    if dt <= 0:
        return out
    for key, name in (("tokens_per_s", "total_tokens_generated"), ("requests_per_s", "total_requests")):
        a, b = prev.metrics.get(name), cur.metrics.get(name)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b >= a:
            out[key] = (b - a) / dt
    return out


def _num(v: Any, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _secs(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def rows(cur: Snapshot, prev: Snapshot | None) -> list[tuple[str, list[tuple[str, str]]]]:
    """The view as (section, [(label, value)]) — shared by the plain and rich renderers."""
    m, s = cur.metrics, cur.stats
    slo = m.get("slo") or {}
    r = rates(cur, prev)
    tps = r["tokens_per_s"]
    rej = s.get("rejections") or {}
    return [
        (
            "Requests",
            [
                ("waiting", _num(m.get("num_waiting_requests", s.get("current_queue_size")))),
                ("running", _num(m.get("num_running_requests", s.get("running_requests")))),
                ("total", _num(m.get("total_requests", s.get("total_requests")))),
                ("ok", _num(s.get("successful_requests"))),
                ("failed", _num(s.get("failed_requests"))),
                ("req/s", _num(r["requests_per_s"], "{:.2f}")),
            ],
        ),
        (
            "Capacity",
            [
                ("model replicas", _num(s.get("model_replicas", m.get("num_model_replicas")))),
                ("free slots", _num(s.get("available_slots"))),
                ("peak queue", _num(s.get("peak_queue_size"))),
                ("queue full", _num(s.get("queue_full_count"))),
            ],
        ),
        (
            "TTFT",
            [
                ("p50", _secs(slo.get("ttft_p50"))),
                ("p95", _secs(slo.get("ttft_p95"))),
                ("p99", _secs(slo.get("ttft_p99"))),
                ("mean", _secs(slo.get("ttft_mean"))),
                ("samples", _num(slo.get("sample_size"))),
            ],
        ),
        (
            "Tokens/s",
            [
                ("now", _num(tps, "{:.1f}") if tps is not None else _num(slo.get("total_throughput"), "{:.1f}")),
                ("window", _num(slo.get("total_throughput"), "{:.1f}")),
                ("decode p50/req", _num(slo.get("decoding_throughput_p50"), "{:.1f}")),
                ("decode p95/req", _num(slo.get("decoding_throughput_p95"), "{:.1f}")),
                ("generated", _num(m.get("total_tokens_generated"))),
            ],
        ),
        ("Rejections", [(reason, _num(rej.get(reason))) for reason in REASONS]),
    ]


def header(cur: Snapshot, interval: float | None) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cur.at))
    every = f"  (every {interval:g} s, Ctrl-C to quit)" if interval else ""
    return f"LLM service {cur.url}  {when}{every}"


def render_plain(cur: Snapshot, prev: Snapshot | None = None, interval: float | None = None) -> str:
    lines = [header(cur, interval)]
    if cur.error:
        lines.append(f"  ! {cur.error}")
    if cur.metrics or cur.stats:
        for section, items in rows(cur, prev):
            lines.append(f"  {section:<11}" + "   ".join(f"{k} {v}" for k, v in items))
    return "\n".join(lines)


def render_rich(cur: Snapshot, prev: Snapshot | None = None, interval: float | None = None):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(header(cur, interval), style="bold")]
    if cur.error:
        parts.append(Text(f"! {cur.error}", style="bold red"))
    if cur.metrics or cur.stats:
        table = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for section, items in rows(cur, prev):
            table.add_row(section, "   ".join(f"[dim]{k}[/dim] {v}" for k, v in items))
        parts.append(table)
    return Group(*parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--url",
        default=os.environ.get("LLM_SERVE_URL", "http://127.0.0.1:8000"),
        help="base URL of the service (default: $LLM_SERVE_URL or http://127.0.0.1:8000)",
    )
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (default 5)")
    ap.add_argument(
        "--api-key",
        default=os.environ.get("LLM_SERVE_API_KEY"),
        help="bearer key when the service requires one (default: $LLM_SERVE_API_KEY)",
    )
    ap.add_argument("--once", action="store_true", help="print one snapshot and exit (1 if unreachable)")
    ap.add_argument("--json", action="store_true", help="with --once: print the raw /metrics and /stats JSON")
    ap.add_argument("--plain", action="store_true", help="plain text even when rich is available")
    ap.add_argument("--timeout", type=float, default=5.0, help="HTTP timeout per request in seconds")
    args = ap.parse_args(argv)
    if args.interval <= 0:
        ap.error("--interval must be positive")

    use_rich = not args.plain and not args.json and sys.stdout.isatty()
    if use_rich:
        try:
            import rich  # noqa: F401
        except ImportError:
            use_rich = False

    with httpx.Client(timeout=args.timeout) as client:
        if args.once:
            snap = fetch(client, args.url, args.api_key)
            if args.json:
                print(
                    json.dumps(
                        {"url": snap.url, "metrics": snap.metrics, "stats": snap.stats, "error": snap.error}, indent=2
                    )
                )
            elif use_rich:
                from rich.console import Console

                Console().print(render_rich(snap))
            else:
                print(render_plain(snap))
            return 0 if snap.ok else 1

        prev: Snapshot | None = None
        try:
            if use_rich:
                from rich.live import Live

                with Live(auto_refresh=False, screen=False) as live:
                    while True:
                        snap = fetch(client, args.url, args.api_key)
                        live.update(render_rich(snap, prev, args.interval), refresh=True)
                        prev = snap if snap.metrics else prev
                        time.sleep(args.interval)
            else:
                while True:
                    snap = fetch(client, args.url, args.api_key)
                    print(render_plain(snap, prev, args.interval), flush=True)
                    print(flush=True)
                    prev = snap if snap.metrics else prev
                    time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
