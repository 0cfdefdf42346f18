"""vLLM's own engine metrics, per model replica (issue 16, item 1), on the real app (session
app: real vLLM CPU engine, tiny model): /metrics/prometheus and the /metrics `engine` section
after a burst of requests, checked against what vLLM reports inside the replica and against
the responses' own usage figures."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from itertools import islice
from pathlib import Path

import httpx
import pytest
import yaml
from prom_server import PromServer, ensure_prometheus_tools
from prometheus_client.parser import text_string_to_metric_families
from reliability import wait_until

from deployments.observability import ServiceStatsActor, StatsRecorder
from deployments.observability.families import ENGINE_FAMILIES, REPLICA_GAUGES

REPO = Path(__file__).resolve().parents[1]
MON = REPO / "monitoring"
ENGINE_RULES = {"KVCacheNearlyFull", "EnginePreemptions", "GPUMemoryHigh", "ModelReplicaRestarts", "HighE2ELatency"}
# Longer than one KV-cache block (128 tokens on the CPU platform): only whole blocks are cached.
with open(REPO.parent / "shared" / "data" / "tnews" / "test.json", encoding="utf-8") as _f:
    PROMPT = "Classify each news title. " + " ".join(json.loads(line)["sentence"] for line in islice(_f, 12))


def _scrape(base_url: str) -> dict[str, list]:
    r = httpx.get(f"{base_url}/metrics/prometheus", timeout=30)
    r.raise_for_status()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _by_replica(samples: dict[str, list], name: str) -> dict[str, float]:
    acc: dict[str, float] = {}
    for s in samples.get(name, ()):
        acc[s.labels["replica"]] = acc.get(s.labels["replica"], 0.0) + s.value
    return acc


def _inside(snapshot: dict, name: str) -> float:
    """What vLLM's reader returned inside the replica: a family summed over its label sets."""
    return sum(v if not isinstance(v, (list, tuple)) else v[0] for n, _l, v in snapshot["metrics"] if n == name)


def _model_handle():
    from ray import serve

    return serve.get_deployment_handle("ModelReplica", app_name="llm")


async def _burst(base_url: str, n: int, max_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as c:

        async def one(i: int) -> dict:
            r = await c.post(
                "/v1/completions",
                json={"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
            )
            assert r.status_code == 200, r.text
            return r.json()

        return await asyncio.gather(*[one(i) for i in range(n)])


def test_engine_metrics_after_a_burst(base_url):
    handle = _model_handle()
    before = handle.engine_metrics.remote().result(timeout_s=60)
    assert before is not None, "observability.engine_metrics is on by default"
    replica = before["replica"]

    # A burst of identical prompts (the prefix cache hits from the second on), polling the
    # exposition while it runs to see the engine busy.
    seen_running = 0.0
    seen_kv = []

    async def run():
        nonlocal seen_running
        task = asyncio.create_task(_burst(base_url, 8, 384))
        while not task.done():
            s = await asyncio.to_thread(_scrape, base_url)
            seen_running = max(seen_running, _by_replica(s, "vllm:num_requests_running").get(replica, 0.0))
            seen_kv.extend(_by_replica(s, "vllm:kv_cache_usage_perc").values())
            await asyncio.sleep(0.2)
        return await task

    t0 = time.monotonic()
    responses = asyncio.run(run())
    print(f"burst: {time.monotonic() - t0:.2f} s, engine running seen: {seen_running}")
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in responses)
    completion_tokens = sum(r["usage"]["completion_tokens"] for r in responses)
    assert prompt_tokens > 8 * 128
    assert completion_tokens == 8 * 384

    # Quiet engine: wait until vLLM inside the replica has counted the whole burst and the
    # replica's pushes have brought those final figures to the exposition.
    def settled():
        inside = handle.engine_metrics.remote().result(timeout_s=60)
        samples = _scrape(base_url)
        metrics = httpx.get(f"{base_url}/metrics", timeout=30).json()
        done = _inside(inside, "vllm:request_success") - _inside(before, "vllm:request_success") == 8
        pushed = all(
            _by_replica(samples, n + "_total").get(replica) == _inside(inside, n)
            for n in (
                "vllm:request_success",
                "vllm:generation_tokens",
                "vllm:prompt_tokens",
                "vllm:prefix_cache_hits",
                "vllm:prefix_cache_queries",
            )
        )
        gauges = _by_replica(samples, "vllm:kv_cache_usage_perc").get(replica) == _inside(
            inside, "vllm:kv_cache_usage_perc"
        ) and metrics["engine"]["replicas"].get(replica, {}).get("generation_tokens") == _inside(
            inside, "vllm:generation_tokens"
        )
        return (inside, samples, metrics) if done and pushed and gauges else None

    try:
        inside, samples, metrics = wait_until(settled, 30, 0.5, "the burst's final engine figures exposed")
    except AssertionError:  # the assertions below say which figure differs
        inside = handle.engine_metrics.remote().result(timeout_s=60)
        samples = _scrape(base_url)
        metrics = httpx.get(f"{base_url}/metrics", timeout=30).json()

    # Each replica (one here) labelled with its Serve replica id, every family present.
    for name, (kind, _doc, _key) in ENGINE_FAMILIES.items():
        series = name + ("_total" if kind == "counter" else "_count" if kind == "histogram" else "")
        assert replica in _by_replica(samples, series), f"{series} has no sample for replica {replica}"
    assert set(_by_replica(samples, "vllm:kv_cache_usage_perc")) == set(metrics["engine"]["replicas"])

    kv = _by_replica(samples, "vllm:kv_cache_usage_perc")[replica]
    assert 0.0 <= kv <= 1.0 and all(0.0 <= v <= 1.0 for v in seen_kv)
    assert seen_running >= 1, "the engine's running count never showed the burst"
    assert _by_replica(samples, "vllm:num_requests_running")[replica] == 0  # all finished
    assert _by_replica(samples, "vllm:num_requests_waiting")[replica] == 0

    # Agreement with vLLM inside the replica (read after the burst, both quiet) ...
    for name in (
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
        "vllm:num_preemptions",
    ):
        assert _by_replica(samples, name + "_total")[replica] == _inside(inside, name), name
    for name in ("vllm:request_queue_time_seconds", "vllm:iteration_tokens_total"):
        assert _by_replica(samples, name + "_count")[replica] == _inside(inside, name), name
    assert _by_replica(samples, "vllm:kv_cache_usage_perc")[replica] == _inside(inside, "vllm:kv_cache_usage_perc")

    # ... and with the responses: the burst's growth of vLLM's counters is its usage.
    def grew(name: str) -> float:
        return _inside(inside, name) - _inside(before, name)

    assert grew("vllm:request_success") == 8
    assert grew("vllm:generation_tokens") == completion_tokens
    assert grew("vllm:prompt_tokens") == prompt_tokens
    assert grew("vllm:request_queue_time_seconds") == 8
    hits = grew("vllm:prefix_cache_hits")
    assert hits > 0, "repeated prompts must hit the prefix cache"
    assert grew("vllm:prefix_cache_queries") >= hits

    # The /metrics JSON engine section says the same.
    eng = metrics["engine"]["replicas"][replica]
    assert eng["prefix_cache_hits"] == _inside(inside, "vllm:prefix_cache_hits")
    assert eng["generation_tokens"] == _inside(inside, "vllm:generation_tokens")
    assert eng["kv_cache_usage"] == kv
    assert eng["num_requests_running"] == 0 and eng["num_requests_waiting"] == 0
    assert 0 < eng["prefix_cache_hit_rate"] <= 1
    assert eng["queue_time_seconds"]["count"] == _inside(inside, "vllm:request_queue_time_seconds")
    assert eng["started"] == inside["started"] and eng["started"] <= time.time()
    assert eng["gpu_memory_used_bytes"] is None  # CPU platform: no NVML figures
    assert _by_replica(samples, "llm_model_replica_start_time_seconds")[replica] == inside["started"]
    assert "llm_gpu_memory_used_bytes" not in samples

    # The replica's routing stats (Serve's hook, which cache_affinity's routers read): its
    # prefill speed from the same counters, once vLLM has counted enough prefill to measure it.
    from deployments.routing.prefill import STAT, PrefillSpeed

    prefill_count, prefill_s = (
        sum(v[i] for n, _l, v in inside["metrics"] if n == "vllm:request_prefill_time_seconds") for i in (0, 1)
    )
    routing_stats = handle.record_routing_stats.remote().result(timeout_s=60)
    if prefill_s >= PrefillSpeed.MIN_PREFILL_S and prefill_count >= PrefillSpeed.MIN_REQUESTS:
        assert 0 < routing_stats[STAT] < 1e8, routing_stats
    else:  # too little prefill since the engine started (a fast machine): no figure yet
        assert routing_stats == {}, (prefill_count, prefill_s, routing_stats)
    print(f"prefill since start: {prefill_count} requests, {prefill_s:.3f} s; routing stats {routing_stats}")


def test_engine_families_always_present_and_expire_with_the_replica():
    """Without model replicas every engine family is still exposed (no samples), so dashboards
    and rules always resolve; a replica that stops pushing drops out after `gauge_ttl_s`."""
    clock = [0.0]
    actor = ServiceStatsActor(ray_metrics=False, gauge_ttl_s=10, clock=lambda: clock[0])
    text = actor.prometheus_text()
    for name, (kind, _d, _k) in ENGINE_FAMILIES.items():
        assert f"# TYPE {name}{'_total' if kind == 'counter' else ''} {kind}" in text
    for name, _doc in REPLICA_GAUGES.values():
        assert f"# TYPE {name} gauge" in text
    rec = StatsRecorder("model", sink=actor, source_id="m", capacity=3)
    rec.engine_source = lambda: {
        "replica": "r1",
        "started": 1.0,
        "gpu_memory_used_bytes": 9e9,
        "gpu_memory_total_bytes": 1e10,
        "gpu_utilization": 0.5,
        "metrics": [
            ("vllm:kv_cache_usage_perc", (("engine", "0"), ("model_name", "m")), 0.5),
            (
                "vllm:iteration_tokens_total",
                (("engine", "0"), ("model_name", "m")),
                (3, 12.0, [("1.0", 1), ("8.0", 2), ("+Inf", 3)]),
            ),
        ],
    }
    asyncio.run(rec.flush())
    fams = {f.name: f for f in text_string_to_metric_families(actor.prometheus_text())}
    assert [s.value for s in fams["vllm:kv_cache_usage_perc"].samples] == [0.5]
    assert fams["vllm:kv_cache_usage_perc"].samples[0].labels == {"replica": "r1", "engine": "0", "model_name": "m"}
    buckets = {
        s.labels["le"]: s.value for s in fams["vllm:iteration_tokens_total"].samples if s.name.endswith("_bucket")
    }
    assert buckets == {"1.0": 1, "8.0": 2, "+Inf": 3}
    assert [s.value for s in fams["llm_gpu_memory_used_bytes"].samples] == [9e9]
    eng = actor.metrics_json()["engine"]["replicas"]["r1"]
    assert eng["iteration_tokens"] == {"count": 3, "sum": 12.0, "mean": 4.0}
    assert eng["gpu_utilization"] == 0.5
    clock[0] += 11  # silent past gauge_ttl_s
    fams = {f.name: f for f in text_string_to_metric_families(actor.prometheus_text())}
    assert fams["vllm:kv_cache_usage_perc"].samples == []
    assert actor.metrics_json()["engine"]["replicas"] == {}


def test_a_failing_engine_source_never_loses_a_push():
    actor = ServiceStatsActor(ray_metrics=False)
    rec = StatsRecorder("model", sink=actor, source_id="m", capacity=3)

    def broken():
        raise RuntimeError("reader failed")

    rec.engine_source = broken
    assert asyncio.run(rec.flush())
    assert actor.stats()["model_replicas"] == 1 and actor.metrics_json()["engine"]["replicas"] == {}


@pytest.mark.parametrize("ray_metrics", [True, False])
def test_stat_loggers_order(ray_metrics):
    """vLLM's Prometheus logger comes last: each PrometheusStatLogger's constructor clears the
    process registry's `vllm:` collectors (the Ray logger's included)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from deployments.observability.engine_metrics import engine_stat_loggers

    loggers = engine_stat_loggers(ray_metrics)
    assert loggers[-1] is PrometheusStatLogger


def test_ray_metrics_port_has_vllm_families_per_replica(base_url):
    """vLLM's Ray logger in the replica: Ray's metrics export shows the same families as
    `ray_vllm_*`, tagged with the replica's id (what monitoring/prometheus.yml relabels)."""
    import ray

    replica = _model_handle().engine_metrics.remote().result(timeout_s=60)["replica"]
    ports = {n["MetricsExportPort"] for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")}
    assert ports
    asyncio.run(_burst(base_url, 2, 8))
    deadline, seen = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        for port in ports:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            except httpx.HTTPError:
                continue
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name.startswith("ray_vllm_") and s.labels.get("ReplicaId") == replica:
                        seen[s.name] = s.value
        if {"ray_vllm_kv_cache_usage_perc", "ray_vllm_num_requests_running"} <= set(seen) and all(
            any(n.startswith(f) for n in seen) for f in ("ray_vllm_generation_tokens", "ray_vllm_prefix_cache_hits")
        ):
            break  # Ray exports each family on its own schedule: wait for all of them
        time.sleep(2)
    assert "ray_vllm_kv_cache_usage_perc" in seen and 0 <= seen["ray_vllm_kv_cache_usage_perc"] <= 1, sorted(seen)
    assert "ray_vllm_num_requests_running" in seen and "ray_vllm_num_requests_waiting" in seen
    assert any(n.startswith("ray_vllm_prefix_cache_hits") for n in seen), sorted(seen)
    gen = [v for n, v in seen.items() if n.startswith("ray_vllm_generation_tokens")]
    assert gen and gen[0] > 0


# --------------------------------------------------------------------------- alerts and dashboard


@pytest.fixture(scope="module")
def promtool() -> str:
    path = ensure_prometheus_tools()
    if not path:
        pytest.skip("promtool/prometheus not installed (scripts/install_test_deps.sh)")
    return path


def test_engine_alert_rules_check_and_unit_tests(promtool):
    """monitoring/engine_alerts.yaml: promtool checks it, and its unit tests
    (engine_alerts_test.yaml) see every rule fire above its threshold and stay quiet below."""
    r = subprocess.run([promtool, "check", "rules", "engine_alerts.yaml"], cwd=MON, capture_output=True, text=True)
    assert r.returncode == 0 and "5 rules found" in r.stdout + r.stderr, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", "engine_alerts_test.yaml"], cwd=MON, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    tests = yaml.safe_load((MON / "engine_alerts_test.yaml").read_text())["tests"]
    firing = {a["alertname"] for t in tests for a in t["alert_rule_test"] if a["exp_alerts"]}
    quiet = {a["alertname"] for t in tests for a in t["alert_rule_test"] if not a["exp_alerts"]}
    assert firing == quiet == ENGINE_RULES
    rules = {
        r["alert"]: r for g in yaml.safe_load((MON / "engine_alerts.yaml").read_text())["groups"] for r in g["rules"]
    }
    assert rules["KVCacheNearlyFull"]["for"] == "5m" and "> 0.9" in rules["KVCacheNearlyFull"]["expr"]
    assert "> 0.9" in rules["GPUMemoryHigh"]["expr"] and "> 3" in rules["ModelReplicaRestarts"]["expr"]
    assert "[1h]" in rules["ModelReplicaRestarts"]["expr"]
    assert "histogram_quantile(0.95" in rules["HighE2ELatency"]["expr"] and "> 1" in rules["HighE2ELatency"]["expr"]
    prom_cfg = yaml.safe_load((MON / "prometheus.yml").read_text())
    assert "engine_alerts.yaml" in prom_cfg["rule_files"]


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    return [
        (p["title"], t["expr"].replace("$__rate_interval", "30s").replace("$job", ".*"))
        for p in dash["panels"]
        for t in p.get("targets", [])
    ]


def test_real_prometheus_on_the_real_app_engine_panels_and_rules(base_url, promtool):
    """A real Prometheus scrapes the real app's /metrics/prometheus and Ray's metrics port
    (relabelled as monitoring/prometheus.yml says) during a burst: every dashboard query
    evaluates, the engine panels have data per replica from both sources, and the rule files
    load without errors."""
    import ray

    replica = _model_handle().engine_metrics.remote().result(timeout_s=60)["replica"]
    target = base_url.removeprefix("http://")
    ports = sorted({n["MetricsExportPort"] for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")})
    ray_job = next(
        j for j in yaml.safe_load((MON / "prometheus.yml").read_text())["scrape_configs"] if j["job_name"] == "ray"
    )
    ray_job = {
        **ray_job,
        "scrape_interval": "2s",
        "scrape_timeout": "2s",
        "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
    }
    with PromServer(
        [target], rule_files=[MON / "alerts.yaml", MON / "engine_alerts.yaml"], extra_scrape_configs=[ray_job]
    ) as prom:
        prom.wait_for_scrape(timeout_s=60)
        sel = f'{{job="llm-serve",replica="{replica}"}}'
        generated = _inside(_model_handle().engine_metrics.remote().result(timeout_s=60), "vllm:generation_tokens")
        asyncio.run(_burst(base_url, 6, 64))
        # Prometheus has scraped the first burst's figures before the second burst runs, so the
        # rates over 30 s see the second one's increase
        prom.wait_for_value(f"vllm:generation_tokens_total{sel}", lambda v: v >= generated + 6 * 64, timeout_s=60)
        asyncio.run(_burst(base_url, 6, 64))
        kv = prom.wait_for_value(f"vllm:kv_cache_usage_perc{sel}")
        assert 0 <= kv <= 1
        assert prom.wait_for_value(f"rate(vllm:prefix_cache_hits_total{sel}[30s])", lambda v: v > 0) > 0
        assert prom.wait_for_value(f"vllm:generation_tokens_total{sel}", lambda v: v > 0) > 0
        # Ray's port, relabelled: vLLM's families under their own names, label `replica`
        ray_sel = f'{{job="ray",replica="{replica}"}}'
        assert 0 <= prom.wait_for_value(f"vllm:kv_cache_usage_perc{ray_sel}", timeout_s=60) <= 1
        assert prom.wait_for_value(f"max(vllm:generation_tokens_total{ray_sel})", lambda v: v > 0, timeout_s=60)
        assert prom.query_value("count(ray_vllm_kv_cache_usage_perc)") is None
        results = {}
        for title, expr in _dashboard_exprs():
            results[(title, expr)] = prom.query(expr)  # raises on a PromQL error
        engine = {k: v for k, v in results.items() if "vllm:" in k[1] and "GPU" not in k[0]}
        assert len(engine) >= 10
        empty = [k for k, v in engine.items() if not v]
        assert not empty, empty
        # a replica without queries in the window has no rate (0/0: NaN); the active one has one
        hit_rate = [float(r["value"][1]) for (t, _e), v in results.items() if t == "Prefix-cache hit rate" for r in v]
        hit_rate = [h for h in hit_rate if h == h]
        assert hit_rate and all(0 < h <= 1 for h in hit_rate)
        restarts = next(e for (t, e) in results if t.startswith("Model replicas replaced") and "count_over_time" in e)
        assert prom.wait_for_value(restarts) == 0  # one replica, never replaced
        rules = prom.rules()
        assert {r["name"] for r in rules} >= ENGINE_RULES
        assert all(r["health"] != "err" for r in rules), [r for r in rules if r["health"] == "err"]
