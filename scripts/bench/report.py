"""The report: text tables on stdout, report.json, and report.html rendered from
templates/report.html.j2 with the plots (matplotlib, inline SVG)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from scripts.bench.common import fmt
from scripts.bench.machine import machine_load
from scripts.bench.stats import SLO, aggregate, check_targets, compare_rows

if TYPE_CHECKING:
    from scripts.bench.runner import Point

TEMPLATES = Path(__file__).resolve().parent / "templates"


# ---------------------------------------------------------------------------- text


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def compare_text(rows: list[dict[str, Any]]) -> str:
    headers = [
        "point",
        "mo",
        "req/s vLLM",
        "ours",
        "ratio",
        "tok/s vLLM",
        "ours",
        "ratio",
        "TTFT p50 vLLM",
        "ours",
        "delta ms",
        "TPOT p50 vLLM",
        "ours",
        "E2E p50 vLLM",
        "ours",
        "errors v/o",
    ]
    body = []
    for r in rows:
        rq, tk, tt, tp, e2 = (
            r["request_throughput"],
            r["output_throughput"],
            r["ttft_ms.p50"],
            r["tpot_ms.p50"],
            r["e2e_ms.p50"],
        )
        body.append(
            [
                r["point"],
                str(r["max_ongoing"]),
                fmt(rq["vllm"], 2),
                fmt(rq["ours"], 2),
                fmt(rq["ratio"], 3),
                fmt(tk["vllm"], 0),
                fmt(tk["ours"], 0),
                fmt(tk["ratio"], 3),
                fmt(tt["vllm"], 1),
                fmt(tt["ours"], 1),
                fmt(tt["delta"], 1),
                fmt(tp["vllm"], 2),
                fmt(tp["ours"], 2),
                fmt(e2["vllm"], 1),
                fmt(e2["ours"], 1),
                f"{r['errors']['vllm']}/{r['errors']['ours']}",
            ]
        )
    return table(headers, body)


def cpu_rows(agg: dict[tuple[str, str], dict[str, Any]]) -> list[list[str]]:
    """Per (target, point): server CPU ms per request: front end, engine, background, by role."""
    rows = []
    for (target, point), s in agg.items():
        c = s.get("server_cpu")
        if not c:
            continue
        roles = ", ".join(f"{role} {fmt(ms, 2)}" for role, ms in c["ms_per_request"].items() if ms >= 0.005)
        rows.append([target, point, fmt(c["front_end_ms"], 2), fmt(c["engine_ms"], 2), fmt(c["system_ms"], 2), roles])
    return rows


CPU_HEADERS = ["target", "point", "front end ms/req", "engine", "background", "by process role (ms/req)"]


def points_text(agg: dict[tuple[str, str], dict[str, Any]]) -> str:
    headers = [
        "target",
        "point",
        "ok/sent",
        "req/s",
        "tok/s",
        "goodput/s",
        "TTFT p50",
        "p90",
        "p99",
        "TPOT p50",
        "ITL p50",
        "p99",
        "E2E p50",
        "p99",
        "tok/event",
        "non-200",
    ]
    body = []
    for (target, key), s in agg.items():
        bad = {k: v for k, v in s["status_counts"].items() if v and k != "200"}
        body.append(
            [
                target,
                key,
                f"{s['num_ok']}/{s['num_requests']}",
                fmt(s["request_throughput"], 2),
                fmt(s["output_throughput"], 0),
                fmt(s["goodput_rps"], 2),
                fmt(s["ttft_ms"]["p50"]),
                fmt(s["ttft_ms"]["p90"]),
                fmt(s["ttft_ms"]["p99"]),
                fmt(s["tpot_ms"]["p50"], 2),
                fmt(s["itl_ms"]["p50"], 2),
                fmt(s["itl_ms"]["p99"], 2),
                fmt(s["e2e_ms"]["p50"]),
                fmt(s["e2e_ms"]["p99"]),
                fmt(s.get("tokens_per_event"), 2),
                json.dumps(bad) if bad else "",
            ]
        )
    return table(headers, body)


# ---------------------------------------------------------------------------- plots


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg") :]


def make_plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, inline SVG) pairs: throughput, TTFT and latency against concurrency (and rate)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plots = []
    pts = report.get("points", [])
    targets = sorted({p["target"] for p in pts})
    style = {
        "vllm": dict(color="#d62728", marker="o"),
        "ours": dict(color="#1f77b4", marker="s"),
        "url": dict(color="#2ca02c", marker="^"),
    }
    label = {"vllm": "vLLM's server", "ours": "ours (Ray Serve)", "url": "target"}
    for mode, xlabel in (("closed", "concurrency (closed loop)"), ("open", "offered rate, req/s (open loop)")):
        for stream in (True, False):
            sel = [p for p in pts if p["mode"] == mode and p["stream"] == stream]
            if not sel:
                continue
            xkey = "concurrency" if mode == "closed" else "rate"
            # (metric, axis label, the dashed second statistic or None)
            panels: list[tuple[str, str, str | None]] = [
                ("output_throughput", "output tokens/s", None),
                ("request_throughput", "requests/s", None),
            ]
            if stream:
                panels.append(("ttft_ms", "TTFT ms (p50, dashed p99)", "p99"))
                panels.append(("tpot_ms", "TPOT ms (p50, dashed p99)", "p99"))
            else:
                panels.append(("e2e_ms", "E2E latency ms (p50, dashed p99)", "p99"))
            fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
            for ax, (metric, ylabel, extra) in zip(axes, panels):
                for t in targets:
                    tp = sorted((p for p in sel if p["target"] == t), key=lambda p: p[xkey])
                    if not tp:
                        continue
                    xs = [p[xkey] for p in tp]
                    st = style.get(t, {})
                    if extra:
                        ax.plot(xs, [p["stats"][metric]["p50"] for p in tp], label=label.get(t, t), **st)
                        ax.plot(
                            xs,
                            [p["stats"][metric][extra] for p in tp],
                            linestyle="--",
                            alpha=0.6,
                            color=st.get("color"),
                        )
                    else:
                        ax.plot(xs, [p["stats"][metric] for p in tp], label=label.get(t, t), **st)
                if mode == "closed":
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(sorted({p[xkey] for p in sel}))
                    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                ax.set_ylim(bottom=0)
            axes[0].legend(fontsize=8)
            fig.suptitle(f"{'streaming' if stream else 'non-streaming'}, {mode} loop", fontsize=10)
            fig.tight_layout()
            plots.append((f"{'Streaming' if stream else 'Non-streaming'}, {mode} loop", _svg(fig)))
    rows = report.get("compare") or []
    if rows:
        sel = [r for r in rows if r["mode"] == "closed"]
        if sel:
            fig, ax = plt.subplots(figsize=(6, 3.4))
            for stream, st in ((True, dict(marker="o")), (False, dict(marker="s"))):
                rr = sorted((r for r in sel if r["stream"] == stream), key=lambda r: r["concurrency"])
                if rr:
                    metric = "output_throughput" if stream else "request_throughput"
                    ax.plot(
                        [r["concurrency"] for r in rr],
                        [r[metric]["ratio"] for r in rr],
                        label=f"{'streaming tok/s' if stream else 'non-streaming req/s'}",
                        **st,
                    )
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_ylim(0, max(1.15, ax.get_ylim()[1]))
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["concurrency"] for r in sel}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("concurrency")
            ax.set_ylabel("ours / vLLM")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            plots.append(("Ratio ours / vLLM", _svg(fig)))
    return plots


# ---------------------------------------------------------------------------- HTML


def _escape(value: Any) -> Markup:
    """Jinja `finalize`: every value printed escaped as html.escape does (markup passes)."""
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value)))


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        finalize=_escape,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["fmt"] = fmt
    return env


def _compare_rows(rows_c: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in rows_c:
        rq, tk, tt, tp, e2 = (
            r["request_throughput"],
            r["output_throughput"],
            r["ttft_ms.p50"],
            r["tpot_ms.p50"],
            r["e2e_ms.p50"],
        )
        rows.append(
            [
                r["point"],
                r["max_ongoing"],
                fmt(rq["vllm"], 2),
                fmt(rq["ours"], 2),
                fmt(rq["ratio"], 3),
                fmt(tk["vllm"], 0),
                fmt(tk["ours"], 0),
                fmt(tk["ratio"], 3),
                fmt(tt["vllm"]),
                fmt(tt["ours"]),
                fmt(tt["delta"]),
                fmt(r["ttft_ms.p99"]["vllm"]),
                fmt(r["ttft_ms.p99"]["ours"]),
                fmt(tp["vllm"], 2),
                fmt(tp["ours"], 2),
                fmt(e2["vllm"]),
                fmt(e2["ours"]),
                f"{fmt(r['tokens_per_event']['vllm'], 2)} / {fmt(r['tokens_per_event']['ours'], 2)}",
                f"{r['errors']['vllm']} / {r['errors']['ours']}",
            ]
        )
    return rows


def _point_rows(pts: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for p in pts:
        s = p["stats"]
        bad = {k: v for k, v in s["status_counts"].items() if v and k != "200"}
        rows.append(
            [
                p["target"],
                p["point"],
                p.get("max_ongoing", ""),
                s.get("repeats", 1),
                f"{s['num_ok']}/{s['num_requests']}",
                fmt(s["duration_s"], 1),
                fmt(s["request_throughput"], 2),
                fmt(s["output_throughput"], 0),
                fmt(s["goodput_rps"], 2),
                *(fmt(s["ttft_ms"][q]) for q in ("mean", "p50", "p90", "p99")),
                *(fmt(s["tpot_ms"][q], 2) for q in ("mean", "p50", "p90", "p99")),
                *(fmt(s["itl_ms"][q], 2) for q in ("mean", "p50", "p90", "p99")),
                *(fmt(s["e2e_ms"][q]) for q in ("mean", "p50", "p90", "p99")),
                fmt(s.get("mean_prompt_tokens")),
                fmt(s.get("mean_output_tokens")),
                json.dumps(bad) if bad else "",
                fmt((s.get("machine") or {}).get("cpu_busy_pct"), 0),
            ]
        )
    return rows


def _overload_rows(ov: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name in ("overload", "burst"):
        s = ov.get(name)
        if not s:
            continue
        rows.append(
            [
                name,
                s["num_requests"],
                json.dumps({k: v for k, v in s["status_counts"].items() if v}),
                fmt(s["request_throughput"], 2),
                fmt(s["goodput_rps"], 2),
                fmt(s["latency_503_ms"]["p50"]),
                fmt(s["latency_503_ms"]["p99"]),
                fmt(s["ttft_ms"]["p50"]),
                fmt(s["ttft_ms"]["p99"]),
                fmt(s["e2e_ms"]["p99"]),
            ]
        )
    return rows


def render_html(report: dict[str, Any]) -> str:
    pts = report.get("points") or []
    ov = report.get("overload")
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            meta=report.get("meta", {}),
            checks=report.get("targets_check") or [],
            compare_rows=_compare_rows(report.get("compare") or []),
            cpu_headers=CPU_HEADERS,
            cpu_rows=report.get("cpu") or [],
            plots=make_plots(report),
            point_rows=_point_rows(pts),
            slo=pts[0]["stats"].get("slo", {}) if pts else {},
            ov=ov,
            overload_rows=_overload_rows(ov) if ov else [],
            run_json=json.dumps(
                {k: v for k, v in report.items() if k in ("meta", "options", "servers")}, indent=2, default=str
            ),
        )
    )


# ---------------------------------------------------------------------------- files


def finish_report(report: dict[str, Any], points: list[Point], slo: SLO, opts, interrupted: bool) -> None:
    """Pool the repeats, compare, check; write report.json and report.html; print the tables."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["runs"]:
        grouped.setdefault((r["target"], r["point"]), []).append(r)
    agg = {k: aggregate(v, slo) for k, v in grouped.items()}
    by_key = {p.key: p for p in points}
    report["points"] = [
        {
            "target": t,
            "point": k,
            "mode": by_key[k].mode,
            "stream": by_key[k].stream,
            "concurrency": by_key[k].concurrency,
            "rate": by_key[k].rate,
            "max_ongoing": by_key[k].max_ongoing,
            "stats": s,
        }
        for (t, k), s in agg.items()
        if k in by_key
    ]
    report["compare"] = compare_rows(points, agg)
    report["cpu"] = cpu_rows(agg)
    report["targets_check"] = check_targets(report["compare"])
    report["meta"]["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    report["meta"]["interrupted"] = interrupted
    report["meta"]["machine_end"] = machine_load()
    for r in report["runs"]:
        results = r.pop("_results", None)
        if opts.save_requests and results is not None:
            r["requests"] = [dataclasses.asdict(q) for q in results]
    json_path = opts.out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    html_path = opts.out_dir / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    if agg:
        print("\n" + points_text(agg))
    if report["compare"]:
        print("\nSide by side (ratio = ours / vLLM; delta = ours - vLLM):\n" + compare_text(report["compare"]))
    if report["cpu"]:
        print("\nServer CPU per request (every process of each server, by role):\n" + table(CPU_HEADERS, report["cpu"]))
    for c in report["targets_check"]:
        print(f"  [{'pass' if c['pass'] else 'FAIL'}] {c['target']} @ {c['point']}: {fmt(c['value'], 3)}")
    ov = report.get("overload")
    if ov:
        print(
            f"\nOverload at {ov['offered_rps']:.2f} req/s ({ov['factor']:g} x capacity "
            f"{ov['capacity']['request_throughput']:.2f} req/s): {ov['overload']['status_counts']}"
        )
        for c in ov["checks"]:
            print(f"  [{'pass' if c['pass'] else 'FAIL'}] {c['check']}: {fmt(c['value'], 3)}")
    print(f"\nreport: {html_path}\n        {json_path}")
