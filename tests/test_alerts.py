"""Alert rules, Prometheus config and Grafana dashboard: promtool checks and unit tests, and a
real Prometheus server scraping the service's exposition format (and Ray's, relabelled)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from deployments.observability import PROMETHEUS_CONTENT_TYPE, ServiceStatsActor, StatsRecorder
from prom_server import PromServer, ensure_prometheus_tools, find_prometheus

REPO = Path(__file__).resolve().parents[1]
MON = REPO / "monitoring"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = ensure_prometheus_tools()
    if not path:
        pytest.skip("promtool/prometheus not installed and scripts/install_test_deps.sh could not install "
                    "Debian's `prometheus` package (needs root or passwordless sudo and apt)")
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
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(concrete)]}]}
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

    def do_GET(self):  # noqa: N802
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
    ray_job = next(j for j in yaml.safe_load((MON / "prometheus.yml").read_text())["scrape_configs"]
                   if j["job_name"] == "ray")
    ray_job = {**ray_job, "metrics_path": "/ray-metrics", "scrape_interval": "1s", "scrape_timeout": "1s",
               "static_configs": [{"targets": [target]}]}
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
            assert prom.query_value('count(ray_llm_requests_total)') is None
            rules = prom.rules()
            assert {r["name"] for r in rules} == {"HighQueueLength", "HighTTFT", "HighErrorRate",
                                                  "NoHealthyModelReplica"}
            assert all(r["health"] != "err" for r in rules)
            pid = prom.proc.pid
        import os

        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stopped by pid
    finally:
        server.shutdown()
        server.server_close()
