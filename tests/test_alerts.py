"""Alert rules, Prometheus config and Grafana dashboard: promtool checks and unit tests, and a
real Prometheus server scraping the service's exposition format (and Ray's, relabelled)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prom_server import PromServer, ensure_prometheus_tools, find_prometheus

from deployments.observability import PROMETHEUS_CONTENT_TYPE, ServiceStatsActor, StatsRecorder

REPO = Path(__file__).resolve().parents[1]
MON = REPO / "monitoring"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = ensure_prometheus_tools()
    if not path:
        pytest.skip(
            "promtool/prometheus not installed and scripts/install_test_deps.sh could not install "
            "Debian's `prometheus` package (needs root or passwordless sudo and apt)"
        )
    return path


def _run(*cmd: str, cwd: Path = MON) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules(promtool):
    r = _run(promtool, "check", "rules", "alerts.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 rules found" in r.stdout + r.stderr


def test_promtool_rule_unit_tests(promtool):
    """HighQueueLength and HighTTFT fire (and stay quiet below threshold); error rate and
    no-replica alerts too: monitoring/alerts_test.yaml."""
    r = _run(promtool, "test", "rules", "alerts_test.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    tests = yaml.safe_load((MON / "alerts_test.yaml").read_text())["tests"]
    firing = {a["alertname"] for t in tests for a in t["alert_rule_test"] if a["exp_alerts"]}
    quiet = {a["alertname"] for t in tests for a in t["alert_rule_test"] if not a["exp_alerts"]}
    assert {"HighQueueLength", "HighTTFT", "HighErrorRate", "NoHealthyModelReplica"} <= firing
    assert {"HighQueueLength", "HighTTFT"} <= quiet


def test_alert_definitions_match_the_users_rules():
    rules = {r["alert"]: r for g in yaml.safe_load((MON / "alerts.yaml").read_text())["groups"] for r in g["rules"]}
    assert set(rules) == {"HighQueueLength", "HighTTFT", "HighErrorRate", "NoHealthyModelReplica"}
    assert rules["HighQueueLength"]["for"] == "1m" and "> 5" in rules["HighQueueLength"]["expr"]
    assert "llm_requests_waiting" in rules["HighQueueLength"]["expr"]
    assert rules["HighTTFT"]["for"] == "5m" and "histogram_quantile(0.95" in rules["HighTTFT"]["expr"]
    assert "llm_time_to_first_token_seconds_bucket" in rules["HighTTFT"]["expr"] and "> 2" in rules["HighTTFT"]["expr"]
    assert rules["HighQueueLength"]["labels"]["severity"] == rules["HighTTFT"]["labels"]["severity"] == "warning"


def test_example_prometheus_config(promtool):
    r = _run(promtool, "check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def _exposed_names() -> set[str]:
    """Every series name the exposition can hold (from its TYPE lines)."""
    names = set()
    for line in ServiceStatsActor(ray_metrics=False).prometheus_text().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def test_dashboard_queries_are_valid_promql_over_exposed_families(promtool, tmp_path):
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    names = _exposed_names()
    for e in exprs:
        for metric in re.findall(r"\bllm_[a-z0-9_]+", e):
            assert metric in names, f"dashboard uses {metric}, which the service does not expose"
    # promtool parses PromQL in rule files: the queries become recording rules.
    concrete = [e.replace("$__rate_interval", "1m").replace("$job", ".*") for e in exprs]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(concrete)]}
        ]
    }
    (tmp_path / "dash.yaml").write_text(yaml.safe_dump(rules))
    r = _run(promtool, "check", "rules", str(tmp_path / "dash.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # every alert expression reads exposed families too
    for g in yaml.safe_load((MON / "alerts.yaml").read_text())["groups"]:
        for rule in g["rules"]:
            for metric in re.findall(r"\bllm_[a-z0-9_]+", rule["expr"]):
                assert metric in names, metric


class _Exposition(BaseHTTPRequestHandler):
    text = ""

    def do_GET(self):
        body = self.text
        if self.path == "/ray-metrics":  # what Ray's port shows: the same families, ray_-prefixed
            body = re.sub(r"^(# (?:HELP|TYPE) )?llm_", lambda m: (m.group(1) or "") + "ray_llm_", body, flags=re.M)
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", PROMETHEUS_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_real_prometheus_scrapes_exposition_and_loads_rules(promtool):
    """A real Prometheus (tests/prom_server.py) scrapes the service's text format; PromQL sees
    the request count produced, the TTFT histogram, and the relabelled Ray mirror."""
    assert find_prometheus()
    actor = ServiceStatsActor(ray_metrics=False)
    ing = StatsRecorder("ingress", sink=actor, source_id="i")
    mod = StatsRecorder("model", sink=actor, source_id="m", capacity=3)

    async def traffic():
        for i in range(3):
            t = ing.request_started("/v1/completions", request_id=f"p{i}", stream=True)
            t.dispatched()
            with mod.engine_request(f"p{i}", 4) as e:
                e.output(1)
                t.chunk(1)
            t.finished(200)
        ing.record_rejection("/v1/completions", 429)
        await mod.flush()
        await ing.flush()

    asyncio.run(traffic())
    _Exposition.text = actor.prometheus_text()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Exposition)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = f"127.0.0.1:{server.server_address[1]}"
    ray_job = next(
        j for j in yaml.safe_load((MON / "prometheus.yml").read_text())["scrape_configs"] if j["job_name"] == "ray"
    )
    ray_job = {
        **ray_job,
        "metrics_path": "/ray-metrics",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{"targets": [target]}],
    }
    try:
        with PromServer([target], rule_files=[MON / "alerts.yaml"], extra_scrape_configs=[ray_job]) as prom:
            prom.wait_for_scrape()
            assert prom.wait_for_value('sum(llm_requests_total{job="llm-serve"})', lambda v: v == 4) == 4
            assert prom.query_value('sum(llm_requests_total{job="llm-serve",status="200"})') == 3
            assert prom.query_value('llm_rejections_total{job="llm-serve",reason="rate_limited"}') == 1
            assert prom.query_value('llm_time_to_first_token_seconds_count{job="llm-serve"}') == 3
            assert prom.query_value('count(llm_time_to_first_token_seconds_bucket{job="llm-serve"})') == 20
            # Ray's port, relabelled by the example config: the same families under llm_*
            assert prom.wait_for_value('sum(llm_requests_total{job="ray"})', lambda v: v == 4) == 4
            assert prom.query_value("count(ray_llm_requests_total)") is None
            rules = prom.rules()
            assert {r["name"] for r in rules} == {
                "HighQueueLength",
                "HighTTFT",
                "HighErrorRate",
                "NoHealthyModelReplica",
            }
            assert all(r["health"] != "err" for r in rules)
            pid = prom.proc.pid
        import os

        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stopped by pid
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the replaced service's rules

LEGACY_RULES = {  # ../shared/LEGACY_API.md, as deployed by the replaced service
    "HighQueueLength": {"expr": "vllm_num_waiting_requests > 5", "for": "1m", "labels": {"severity": "warning"}},
    "HighTTFT": {"expr": "vllm_ttft_p95 > 2", "for": "5m", "labels": {"severity": "warning"}},
}


def test_legacy_rules_are_verbatim():
    groups = yaml.safe_load((MON / "legacy_alerts.yaml").read_text())["groups"]
    assert [g["name"] for g in groups] == ["vllm"]
    assert {r["alert"]: {k: v for k, v in r.items() if k != "alert"} for r in groups[0]["rules"]} == LEGACY_RULES


def test_promtool_legacy_rules(promtool):
    """promtool checks monitoring/legacy_alerts.yaml and runs its unit tests
    (monitoring/legacy_alerts_test.yaml): both fire above threshold, neither at it."""
    r = _run(promtool, "check", "rules", "legacy_alerts.yaml")
    assert r.returncode == 0 and "2 rules found" in r.stdout + r.stderr, r.stdout + r.stderr
    r = _run(promtool, "test", "rules", "legacy_alerts_test.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    tests = yaml.safe_load((MON / "legacy_alerts_test.yaml").read_text())["tests"]
    firing = {a["alertname"] for t in tests for a in t["alert_rule_test"] if a["exp_alerts"]}
    quiet = {a["alertname"] for t in tests for a in t["alert_rule_test"] if not a["exp_alerts"]}
    assert firing == quiet == set(LEGACY_RULES)


def test_real_prometheus_evaluates_legacy_rules_on_our_exposition(promtool, monkeypatch):
    """The replaced service's rules, loaded by a real Prometheus scraping our exposition (job
    `vllm`, path /metrics/prometheus, as they deployed it): both expressions select our
    `vllm_*` gauges, which carry the /metrics JSON's figures. Traffic puts both above their
    thresholds: 6 requests waiting (9 dispatched, 3 slots running) and TTFT p95 2.5 s."""
    from deployments.observability import aggregator, recorder, traces

    class Clock:  # the observability modules' `time`, moved by hand
        t = 1000.0

        def time(self):
            return 1_700_000_000.0 + self.t

        def perf_counter(self):
            return self.t

        monotonic = perf_counter

    clock = Clock()
    for module in (traces, recorder, aggregator):
        monkeypatch.setattr(module, "time", clock)
    actor = ServiceStatsActor(ray_metrics=False, clock=clock.monotonic)
    ing = StatsRecorder("ingress", sink=actor, source_id="i")
    mod = StatsRecorder("model", sink=actor, source_id="m", capacity=3)

    async def traffic():
        for i in range(3):  # finished: first token after 2.5 s, then 3 tokens 100 ms apart
            t = ing.request_started("/v1/chat/completions", request_id=f"done{i}")
            t.dispatched()
            e = mod.engine_started(f"done{i}", 4)
            clock.t += 2.5
            for _ in range(4):
                e.output(1)
                clock.t += 0.1
            e.finished()
            t.finished(200, completion_tokens=4)
        open_traces = []
        for i in range(9):  # in flight: 3 running, 6 waiting
            t = ing.request_started("/v1/chat/completions", request_id=f"open{i}")
            t.dispatched()
            open_traces.append(t)
            if i < 3:
                open_traces.append(mod.engine_started(f"open{i}", 4))
        await mod.flush()
        await ing.flush()
        return open_traces

    held = asyncio.run(traffic())  # noqa: F841  (kept open: they are the in-flight requests)
    metrics = actor.metrics_json()
    assert metrics["num_waiting_requests"] == 6 and metrics["num_running_requests"] == 3
    assert metrics["slo"]["ttft_p95"] == pytest.approx(2.5)
    _Exposition.text = actor.prometheus_text()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Exposition)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = f"127.0.0.1:{server.server_address[1]}"
    try:
        with PromServer([target], job="vllm", rule_files=[MON / "legacy_alerts.yaml"]) as prom:
            prom.wait_for_scrape()
            # each rule's expression, exactly as deployed, selects our series
            assert prom.wait_for_value(LEGACY_RULES["HighQueueLength"]["expr"]) == 6
            assert prom.query_value(LEGACY_RULES["HighTTFT"]["expr"]) == pytest.approx(2.5)
            assert prom.query_value('vllm_num_running_requests{job="vllm"}') == 3
            assert prom.query_value("vllm_decoding_throughput_mean") == pytest.approx(10.0)  # 3 gaps in 0.3 s
            deadline = time.monotonic() + 30
            while True:  # evaluated: both pending (their `for` has not elapsed), none in error
                rules = {r["name"]: r for r in prom.rules()}
                if all(r.get("state") == "pending" for r in rules.values()) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert set(rules) == set(LEGACY_RULES)
            assert all(r["health"] != "err" for r in rules.values()), rules
            assert {n: r["state"] for n, r in rules.items()} == {n: "pending" for n in LEGACY_RULES}
    finally:
        server.shutdown()
        server.server_close()
