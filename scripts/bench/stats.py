"""What a run measured: per-request results, per-run summaries (throughput, latency
distributions, goodput, status counts), pooled repeats, the side-by-side comparison and the
pass/fail checks (issue 6 targets, overload)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from deployments.observability.stats import percentile as _percentile
from scripts.bench.common import TARGETS, fmt


def percentile(values: Iterable[float], q: float) -> float:
    """The code base's percentile (deployments.observability.stats: linear interpolation,
    numpy's default), NaN for no values."""
    p = _percentile(values, q)
    return math.nan if p is None else p


def summarize(values: Iterable[float | None], scale: float = 1.0) -> dict[str, Any]:
    """mean/p50/p90/p99/min/max/n of `values` × `scale` (e.g. 1000 for seconds → ms)."""
    vals = sorted(v * scale for v in values if v is not None and not math.isnan(v))
    if not vals:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}
    return {
        "n": len(vals),
        "mean": sum(vals) / len(vals),
        "p50": _percentile(vals, 50),
        "p90": _percentile(vals, 90),
        "p99": _percentile(vals, 99),
        "min": vals[0],
        "max": vals[-1],
    }


@dataclasses.dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds (perf_counter based)."""

    start: float = 0.0  # send time, relative to the run's start
    status: int | None = None  # HTTP status; None when no response came
    outcome: str = "pending"  # ok | http_error | timeout | conn_error | stream_error
    ttft: float | None = None  # first non-empty content (streaming only)
    e2e: float | None = None  # send → last byte
    itl: list[float] = dataclasses.field(default_factory=list)  # gaps between content events
    output_tokens: int | None = None  # usage.completion_tokens
    prompt_tokens: int | None = None  # usage.prompt_tokens
    n_events: int = 0  # content-bearing SSE events
    usage_missing: bool = False
    retry_after: str | None = None
    error: str | None = None

    @property
    def category(self) -> str:
        return categorize(self)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.ttft is None or self.e2e is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


STATUS_CATEGORIES = ("200", "429", "503", "5xx", "4xx", "timeout", "conn_error", "stream_error")


def categorize(r: RequestResult) -> str:
    if r.outcome == "timeout":
        return "timeout"
    if r.outcome == "conn_error" or r.status is None:
        return "conn_error"
    if r.status == 200:
        return "200" if r.outcome == "ok" else "stream_error"
    if r.status in (429, 503):
        return str(r.status)
    return "5xx" if r.status >= 500 else "4xx"


@dataclasses.dataclass
class SLO:
    ttft_ms: float | None = 500.0
    tpot_ms: float | None = 20.0
    e2e_ms: float | None = None

    def met(self, r: RequestResult) -> bool:
        if r.outcome != "ok":
            return False
        if self.ttft_ms is not None and r.ttft is not None and r.ttft * 1000 > self.ttft_ms:
            return False
        tpot = r.tpot
        if self.tpot_ms is not None and tpot is not None and tpot * 1000 > self.tpot_ms:
            return False
        if self.e2e_ms is not None and r.e2e is not None and r.e2e * 1000 > self.e2e_ms:
            return False
        return True


def compute_stats(results: Sequence[RequestResult], duration_s: float, slo: SLO | None = None) -> dict[str, Any]:
    """Per-run figures: throughput, latency distributions, goodput, status counts."""
    slo = slo or SLO()
    ok = [r for r in results if r.outcome == "ok"]
    counts = {c: 0 for c in STATUS_CATEGORIES}
    codes: dict[str, int] = {}
    for r in results:
        counts[categorize(r)] += 1
        key = str(r.status) if r.status is not None else r.outcome
        codes[key] = codes.get(key, 0) + 1
    duration = max(duration_s, 1e-9)
    out_tokens = sum((r.output_tokens or 0) for r in ok)
    in_tokens = sum((r.prompt_tokens or 0) for r in ok)
    events = sum(r.n_events for r in ok)
    good = [r for r in ok if slo.met(r)]
    itl = [g for r in ok for g in r.itl]
    lat503 = [r.e2e for r in results if r.status == 503 and r.e2e is not None]
    n = len(results)
    return {
        "num_requests": n,
        "num_ok": len(ok),
        "duration_s": duration_s,
        "status_counts": counts,
        "status_codes": dict(sorted(codes.items())),
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + in_tokens) / duration,
        "total_output_tokens": out_tokens,
        "mean_prompt_tokens": (in_tokens / len(ok)) if ok else None,
        "mean_output_tokens": (out_tokens / len(ok)) if ok else None,
        "tokens_per_event": (out_tokens / events) if events else None,
        "usage_missing": sum(1 for r in ok if r.usage_missing),
        "ttft_ms": summarize((r.ttft for r in ok), 1000),
        "tpot_ms": summarize((r.tpot for r in ok), 1000),
        "itl_ms": summarize(itl, 1000),
        "e2e_ms": summarize((r.e2e for r in ok), 1000),
        "latency_503_ms": summarize(lat503, 1000),
        "goodput_rps": len(good) / duration,
        "goodput_fraction": (len(good) / n) if n else None,
        "slo": dataclasses.asdict(slo),
        "errors_sample": sorted({(r.error or "")[:200] for r in results if r.error})[:5],
    }


def get_metric(stats: dict[str, Any] | None, path: str) -> float | None:
    """'ttft_ms.p50' -> stats['ttft_ms']['p50']."""
    cur: Any = stats
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur if isinstance(cur, (int, float)) else None


def one_line(s: dict[str, Any]) -> str:
    bad = {k: v for k, v in s["status_counts"].items() if v and k != "200"}
    return (
        f"{s['num_ok']}/{s['num_requests']} ok, {s['request_throughput']:.2f} req/s, "
        f"{s['output_throughput']:.0f} tok/s, TTFT p50 {fmt(s['ttft_ms']['p50'])} ms, "
        f"TPOT p50 {fmt(s['tpot_ms']['p50'], 2)} ms, E2E p50 {fmt(s['e2e_ms']['p50'])} ms"
        + (f", other: {bad}" if bad else "")
    )


# ---------------------------------------------------------------------------- repeats, comparison


def aggregate(runs: Sequence[dict[str, Any]], slo: SLO) -> dict[str, Any]:
    """Pool the repeats of one (target, point): request-level stats recomputed over all of them;
    throughput = total over total duration; spread of per-repeat throughput kept."""
    stats_list = [r["stats"] for r in runs]
    if len(runs) == 1:
        agg = copy.deepcopy(stats_list[0])
    else:
        agg = _pool(stats_list, slo, runs)
    agg["repeats"] = len(runs)
    agg["output_throughput_runs"] = [s["output_throughput"] for s in stats_list]
    agg["request_throughput_runs"] = [s["request_throughput"] for s in stats_list]
    agg["ttft_p50_runs"] = [s["ttft_ms"]["p50"] for s in stats_list]
    cpu = [s["server_cpu"] for s in stats_list if s.get("server_cpu")]
    if cpu:
        agg["server_cpu"] = pool_cpu(cpu)
    return agg


def pool_cpu(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Server CPU per request over repeats, weighted by each run's requests."""
    n = sum(r["requests"] for r in runs) or 1
    roles = sorted({role for r in runs for role in r["ms_per_request"]})
    out: dict[str, Any] = {
        "ms_per_request": {
            role: sum(r["ms_per_request"].get(role, 0.0) * r["requests"] for r in runs) / n for role in roles
        },
        "requests": n,
    }
    for k in ("front_end_ms", "engine_ms", "system_ms"):
        out[k] = sum(r[k] * r["requests"] for r in runs) / n
    return out


def _pool(stats_list, slo, runs) -> dict[str, Any]:
    if all("_results" in r for r in runs):
        results = [q for r in runs for q in r["_results"]]
        return compute_stats(results, sum(s["duration_s"] for s in stats_list), slo)
    # Without raw requests: sums are exact, percentiles are the median over repeats.
    dur = sum(s["duration_s"] for s in stats_list)
    out = copy.deepcopy(stats_list[0])
    for k in ("num_requests", "num_ok", "total_output_tokens"):
        out[k] = sum(s[k] for s in stats_list)
    out["duration_s"] = dur
    out["status_counts"] = {c: sum(s["status_counts"][c] for s in stats_list) for c in STATUS_CATEGORIES}
    out["request_throughput"] = out["num_ok"] / dur
    out["output_throughput"] = out["total_output_tokens"] / dur
    out["goodput_rps"] = sum(s["goodput_rps"] * s["duration_s"] for s in stats_list) / dur
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "latency_503_ms"):
        for q in ("mean", "p50", "p90", "p99"):
            out[key][q] = _percentile((s[key][q] for s in stats_list if s[key][q] is not None), 50)
    return out


def compare_rows(points: list, agg: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Per point: vLLM's and our figures and ours/vLLM ratios (TTFT as a difference in ms)."""
    rows = []
    for p in points:
        v, o = agg.get(("vllm", p.key)), agg.get(("ours", p.key))
        if v is None or o is None:
            continue
        row: dict[str, Any] = {
            "point": p.key,
            "mode": p.mode,
            "stream": p.stream,
            "concurrency": p.concurrency,
            "rate": p.rate,
            "max_ongoing": p.max_ongoing,
        }
        for metric in ("request_throughput", "output_throughput", "goodput_rps"):
            a, b = get_metric(v, metric), get_metric(o, metric)
            row[metric] = {"vllm": a, "ours": b, "ratio": (b / a) if a and b is not None else None}
        for metric in ("ttft_ms.p50", "ttft_ms.p99", "tpot_ms.p50", "itl_ms.p50", "e2e_ms.p50", "e2e_ms.p99"):
            a, b = get_metric(v, metric), get_metric(o, metric)
            row[metric] = {
                "vllm": a,
                "ours": b,
                "ratio": (b / a) if a and b is not None else None,
                "delta": (b - a) if a is not None and b is not None else None,
            }
        row["errors"] = {"vllm": v["num_requests"] - v["num_ok"], "ours": o["num_requests"] - o["num_ok"]}
        a, b = get_metric(v, "server_cpu.front_end_ms"), get_metric(o, "server_cpu.front_end_ms")
        row["front_end_cpu_ms"] = {"vllm": a, "ours": b, "ratio": (b / a) if a and b is not None else None}
        row["tokens_per_event"] = {"vllm": v.get("tokens_per_event"), "ours": o.get("tokens_per_event")}
        rows.append(row)
    return rows


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for t in TARGETS:
        sel = [
            r
            for r in rows
            if r["mode"] == "closed"
            and t["stream"] in (None, r["stream"])
            and (t["concurrency"] is None or r["concurrency"] == t["concurrency"])
        ]
        if not sel:
            continue
        for r in sel:
            m = r[t["metric"]]
            if t["kind"] == "ratio_min":
                value, ok = m["ratio"], (m["ratio"] is not None and m["ratio"] >= t["threshold"])
            elif t["kind"] == "ratio_max":
                if m["ratio"] is None:
                    continue  # not measured at this point
                value, ok = m["ratio"], m["ratio"] <= t["threshold"]
            else:
                value, ok = m["delta"], (m["delta"] is not None and m["delta"] <= t["threshold"])
            checks.append(
                {
                    "target": t["name"],
                    "point": r["point"],
                    "max_ongoing": r["max_ongoing"],
                    "value": value,
                    "threshold": t["threshold"],
                    "kind": t["kind"],
                    "pass": ok,
                }
            )
    return checks


# ---------------------------------------------------------------------------- overload


def window_stats(results: Sequence[RequestResult], window_s: float, slo: SLO) -> dict[str, Any]:
    """Steady-state rates of an open-loop run: completions that *finished* within the arrival
    window [0, window_s] per second (the drain after the last arrival is left out)."""
    done = [r for r in results if r.e2e is not None and r.start + r.e2e <= window_s]
    ok = [r for r in done if r.outcome == "ok"]
    return {
        "window_s": window_s,
        "ok_rps": len(ok) / window_s,
        "goodput_rps": sum(1 for r in ok if slo.met(r)) / window_s,
        "output_throughput": sum(r.output_tokens or 0 for r in ok) / window_s,
    }


def overload_checks(
    cap_rps: float, over: dict[str, Any], burst_stats: dict[str, Any] | None, expected_admitted: int | None
) -> list[dict[str, Any]]:
    sc = over["status_counts"]
    win = over.get("window") or {"ok_rps": over["request_throughput"], "goodput_rps": over["goodput_rps"]}
    other = sum(v for k, v in sc.items() if k not in ("200", "503"))
    checks = [
        {"check": "only 200 and 503 (no 429/5xx/stream errors)", "value": other, "pass": other == 0},
        {"check": "no client timeouts", "value": sc["timeout"], "pass": sc["timeout"] == 0},
        {
            "check": "503 latency p99 <= 20 ms",
            "value": over["latency_503_ms"]["p99"],
            "pass": over["latency_503_ms"]["p99"] is None or over["latency_503_ms"]["p99"] <= 20.0,
        },
        {
            "check": "200s/s during the arrival window >= 95% of capacity (ratio)",
            "value": win["ok_rps"] / cap_rps if cap_rps else None,
            "pass": bool(cap_rps) and win["ok_rps"] / cap_rps >= 0.95,
        },
        {
            "check": "goodput (200s within the TTFT/TPOT SLO)/s during the window >= 95% of capacity (ratio)",
            "value": win["goodput_rps"] / cap_rps if cap_rps else None,
            "pass": bool(cap_rps) and win["goodput_rps"] / cap_rps >= 0.95,
        },
    ]
    if burst_stats is not None and expected_admitted is not None:
        admitted = burst_stats["status_counts"]["200"]
        checks.append(
            {
                "check": f"burst: admitted == max_ongoing + max_queued ({expected_admitted})",
                "value": admitted,
                "pass": admitted == expected_admitted,
            }
        )
    return checks
