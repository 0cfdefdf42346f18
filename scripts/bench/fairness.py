"""Fairness under overload, measured (issue 18): two tenants of a running service, a *light*
one and a *heavy* one offering `heavy_factor` times the light one's load, together `overload`
times what the service completes.

1. **capacity**: the heavy tenant's key, a closed loop at `concurrency` (the model's slots) for
   `capacity_s`: completed requests per second;
2. **alone**: the light tenant by itself, Poisson arrivals at overload × capacity /
   (1 + heavy_factor) req/s for `duration_s`;
3. **together**: the same light load plus the heavy tenant at heavy_factor times it.

Reported per phase and tenant: requests sent, answered 200, refused (503/429), success rate,
TTFT p50/p95 (streaming); and the two ratios the issue sets targets for: the light tenant's
success rate and TTFT p95 together over alone (target: within 20 %), and the share of the 503s
the heavy tenant takes.

    python -m scripts.bench.fairness --url http://127.0.0.1:8000 \\
        --light-key sk-light --heavy-key sk-heavy --json reports/fairness.json

(the service with a keys file naming the two tenants, without request budgets for them;
`tests/test_fairness.py` runs it on a test app, `-m soak` for the long version).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scripts.bench.client import LoadSpec, closed_loop, open_loop, run_async
from scripts.bench.machine import cpu_busy, cpu_times, machine_load
from scripts.bench.prompts import load_tnews
from scripts.bench.stats import RequestResult, percentile

TNEWS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tnews" / "test.json"


@dataclasses.dataclass
class FairnessSpec:
    light_key: str
    heavy_key: str
    model: str = "tiny-qwen3"
    output_len: int = 16
    concurrency: int = 3  # the model's slots (max_ongoing_requests × replicas)
    capacity_s: float = 10.0
    duration_s: float = 30.0
    overload: float = 3.0
    heavy_factor: float = 10.0
    seed: int = 0


def tenant_summary(results: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    """Sent, answered, refused, success rate and TTFT percentiles (ms) of one tenant's requests."""
    statuses: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.status is not None else r.outcome
        statuses[key] = statuses.get(key, 0) + 1
    ok = [r for r in results if r.outcome == "ok"]
    ttft = [1000 * r.ttft for r in ok if r.ttft is not None]
    return {
        "sent": len(results),
        "ok": len(ok),
        "statuses": statuses,
        "success_rate": len(ok) / len(results) if results else None,
        "offered_rps": len(results) / duration_s if duration_s else None,
        "ttft_p50_ms": percentile(ttft, 50) if ttft else None,
        "ttft_p95_ms": percentile(ttft, 95) if ttft else None,
    }


def ratios(alone: dict[str, Any], together: dict[str, Any], heavy: dict[str, Any]) -> dict[str, Any]:
    """The issue's figures: the light tenant together over alone; who took the refusals."""

    def div(a, b):
        return a / b if a is not None and b else None

    light_refused = together["sent"] - together["ok"]
    heavy_refused = heavy["sent"] - heavy["ok"]
    refused = light_refused + heavy_refused
    return {
        "light_success_ratio": div(together["success_rate"], alone["success_rate"]),
        "light_ttft_p95_ratio": div(together["ttft_p95_ms"], alone["ttft_p95_ms"]),
        "light_ttft_p50_ratio": div(together["ttft_p50_ms"], alone["ttft_p50_ms"]),
        "heavy_share_of_refusals": div(heavy_refused, refused) if refused else None,
        "heavy_success_rate": heavy["success_rate"],
    }


async def experiment(url: str, spec: FairnessSpec, prompts: Sequence[str], progress: bool = False) -> dict[str, Any]:
    light = LoadSpec(model=spec.model, output_len=spec.output_len, api_key=spec.light_key)
    heavy = LoadSpec(model=spec.model, output_len=spec.output_len, api_key=spec.heavy_key)
    n = max(1, int(spec.capacity_s * 200))
    done, cap_s = await closed_loop(
        url,
        heavy,
        [prompts[i % len(prompts)] for i in range(n)],
        spec.concurrency,
        spec.capacity_s,
        warmup=spec.concurrency,
        progress=progress,
    )
    capacity_rps = sum(r.outcome == "ok" for r in done) / cap_s
    light_rps = spec.overload * capacity_rps / (1 + spec.heavy_factor)
    heavy_rps = spec.heavy_factor * light_rps
    await asyncio.sleep(2)  # the capacity run's requests are over

    def budget(rate: float) -> list[str]:
        k = int(rate * spec.duration_s * 2) + 10
        return [prompts[i % len(prompts)] for i in range(k)]

    before = cpu_times()
    alone, alone_s = await open_loop(
        url, light, budget(light_rps), light_rps, spec.duration_s, seed=spec.seed, progress=progress
    )
    busy_alone = cpu_busy(before)
    await asyncio.sleep(2)
    before = cpu_times()
    (light_t, light_s), (heavy_t, heavy_s) = await asyncio.gather(
        open_loop(url, light, budget(light_rps), light_rps, spec.duration_s, seed=spec.seed, progress=progress),
        open_loop(url, heavy, budget(heavy_rps), heavy_rps, spec.duration_s, seed=spec.seed + 1, progress=progress),
    )
    busy_together = cpu_busy(before)
    report = {
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if not k.endswith("_key")},
        "capacity_rps": capacity_rps,
        "light_rps": light_rps,
        "heavy_rps": heavy_rps,
        # the whole machine's CPU busy % in each phase (the client shares it): on a small
        # machine the heavy tenant's refused requests cost CPU the light one's wait for
        "machine_cpu_busy_pct": {"alone": busy_alone, "together": busy_together},
        "loadavg_1m": machine_load()["loadavg_1m"],
        "alone": {"light": tenant_summary(alone, alone_s)},
        "together": {"light": tenant_summary(light_t, light_s), "heavy": tenant_summary(heavy_t, heavy_s)},
    }
    report["ratios"] = ratios(report["alone"]["light"], report["together"]["light"], report["together"]["heavy"])
    return report


def one_line(report: dict[str, Any]) -> str:
    a, t, h, r = (report["alone"]["light"], report["together"]["light"], report["together"]["heavy"], report["ratios"])

    def f(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    return (
        f"capacity {report['capacity_rps']:.2f} req/s; light alone: {a['ok']}/{a['sent']} ok, "
        f"TTFT p95 {f(a['ttft_p95_ms'], '.0f')} ms; together: light {t['ok']}/{t['sent']} ok "
        f"({t['statuses']}), TTFT p95 {f(t['ttft_p95_ms'], '.0f')} ms; heavy {h['ok']}/{h['sent']} ok "
        f"({h['statuses']}); light success x{f(r['light_success_ratio'])}, TTFT p95 "
        f"x{f(r['light_ttft_p95_ratio'])}, heavy's share of refusals {f(r['heavy_share_of_refusals'])}; "
        f"machine CPU busy {f(report['machine_cpu_busy_pct']['alone'], '.0f')} % alone, "
        f"{f(report['machine_cpu_busy_pct']['together'], '.0f')} % together"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", required=True, help="the service's base URL")
    p.add_argument("--light-key", required=True)
    p.add_argument("--heavy-key", required=True)
    p.add_argument("--model", default="tiny-qwen3")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=3, help="the model's slots (for the capacity run)")
    p.add_argument("--capacity-s", type=float, default=10.0)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--overload", type=float, default=3.0)
    p.add_argument("--heavy-factor", type=float, default=10.0)
    p.add_argument("--prompts", type=Path, default=TNEWS, help="TNEWS json lines (titles as prompts)")
    p.add_argument("--json", type=Path, help="write the report here")
    a = p.parse_args(argv)
    spec = FairnessSpec(
        a.light_key,
        a.heavy_key,
        a.model,
        a.output_len,
        a.concurrency,
        a.capacity_s,
        a.duration_s,
        a.overload,
        a.heavy_factor,
    )
    report = run_async(experiment(a.url.rstrip("/"), spec, load_tnews(a.prompts, 500, 0), progress=True))
    print(one_line(report))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
