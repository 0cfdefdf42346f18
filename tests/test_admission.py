"""Admission and observability on a second app with 2 ingress replicas: cluster-wide rate
limits (429 + Retry-After), API-key auth (401), /stats and /metrics totals, Prometheus
scraping the app for real."""

from __future__ import annotations

import collections
import json
import time

import httpx
import pytest
from conftest import app_args, wait_healthy
from prometheus_client.parser import text_string_to_metric_families
from reliability import wait_until

MODEL = "tiny-qwen3"
KEYS = ["key-auth-test", "key-client-a", "key-client-b", "key-metrics"]
PREFIX = "/guarded"


@pytest.fixture(scope="module")
def guarded(http_port):
    from ray import serve

    from serve_app import build_app

    env = {"LLM_SERVE_API_KEYS": ",".join(KEYS)}
    args = app_args(
        rate_limit={"enabled": True, "per_minute": 10, "per_hour": 100},
        auth={"enabled": True},
        deployments={"ingress": {"num_replicas": 2, "ray_actor_options": {"runtime_env": {"env_vars": env}}}},
    )
    serve.run(build_app(args), name="guarded", route_prefix=PREFIX, blocking=False)
    url = f"http://127.0.0.1:{http_port}{PREFIX}"
    wait_healthy(url)
    yield url
    serve.delete("guarded")


def chat(url: str, key: str | None, **extra) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "体育新闻"}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def completion_tokens(r: httpx.Response) -> int:
    """The usage of a chat answer, streamed (the usage chunk) or not."""
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        return [e["usage"] for e in events if e.get("usage")][-1]["completion_tokens"]
    return r.json()["usage"]["completion_tokens"]


def test_two_ingress_replicas_running(guarded):
    from ray import serve

    ingress = serve.status().applications["guarded"].deployments["IngressRouter"]
    assert ingress.replica_states.get("RUNNING") == 2
    # auth on, plain key list: /health is public with the status only (keys are clients, not admins)
    health = httpx.get(f"{guarded}/health", headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30).json()
    assert set(health) == {"status", "gpu", "limits"}
    assert health["limits"]["rate_limit"] == "10 requests/minute, 100 requests/hour per API key, else IP"


def test_auth(guarded):
    r = chat(guarded, None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = chat(guarded, "wrong-key")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(f"{guarded}/v1/chat/completions", json={}, headers={"Authorization": "Basic abc"}, timeout=30)
    assert r.status_code == 401
    assert chat(guarded, KEYS[0]).status_code == 200
    # /health stays open for probes
    assert httpx.get(f"{guarded}/health", timeout=30).status_code == 200


def test_rate_limit_is_cluster_wide(guarded):
    statuses = []
    for _ in range(12):
        r = chat(guarded, KEYS[1])
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["x-ratelimit-limit"] == "10"
            assert r.headers["x-ratelimit-remaining"] == "0"
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        else:
            assert r.headers["x-ratelimit-limit"] == "10"
    print(f"\nclient A statuses: {collections.Counter(statuses)}")
    assert statuses.count(200) == 10 and statuses.count(429) == 2
    assert statuses[:10] == [200] * 10
    # another client is unaffected
    r = chat(guarded, KEYS[2])
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining"] == "9"


def wait_pushed(app: str, timeout_s: float = 30) -> None:
    """Wait until every live replica of `app` has pushed its figures to the app's stats actor
    after this call began (each pushes every `observability.flush_interval_s`): the totals then
    count every request answered before the call."""
    import ray

    from deployments.actors import DEFAULT_NAMESPACE

    actor = ray.get_actor(f"service_stats.{app}", namespace=DEFAULT_NAMESPACE)
    # a request is recorded as its response ends (a stream: just after its last event): margin
    since = time.time() + 0.2

    seen: dict = {}

    def pushed() -> bool:
        snap = ray.get(actor.snapshot.remote(), timeout=30)
        seen["live"] = [sid for sid, src in snap["sources"].items() if src["live"]]
        seen["not pushed since (age s)"] = {
            sid: snap["age_s"][sid] for sid in seen["live"] if snap["ts"] - snap["age_s"][sid] <= since
        }
        return bool(seen["live"]) and not seen["not pushed since (age s)"]

    try:
        wait_until(pushed, timeout_s, 0.25, f"every live replica of {app} pushed its figures")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen}") from None


def test_stats_and_metrics_count_what_was_sent(guarded):
    """Totals across both ingress replicas equal the requests this module sent."""
    h = {"Authorization": f"Bearer {KEYS[3]}"}
    wait_pushed("guarded")  # every request of the earlier tests is counted
    before = httpx.get(f"{guarded}/stats", headers=h, timeout=30).json()
    tokens_before = httpx.get(f"{guarded}/metrics", headers=h, timeout=30).json()["total_tokens_generated"]
    answers = [
        chat(guarded, KEYS[3], stream=bool(i % 2), **({"stream_options": {"include_usage": True}} if i % 2 else {}))
        for i in range(4)
    ]
    answers.append(chat(guarded, KEYS[3], max_tokens=10**6))  # 400
    assert collections.Counter(r.status_code for r in answers) == {200: 4, 400: 1}
    generated = sum(completion_tokens(r) for r in answers if r.status_code == 200)  # EOS may come early

    def counted():
        after = httpx.get(f"{guarded}/stats", headers=h, timeout=30).json()
        m = httpx.get(f"{guarded}/metrics", headers=h, timeout=30).json()
        grew = [after[k] - before[k] for k in ("total_requests", "successful_requests", "failed_requests")]
        return (after, m) if grew == [5, 4, 1] and m["total_tokens_generated"] - tokens_before == generated else None

    try:
        after, m = wait_until(counted, 30, 0.5, "/stats and /metrics counting the 5 requests")
    except AssertionError:  # the assertions below say what is counted
        after = httpx.get(f"{guarded}/stats", headers=h, timeout=30).json()
        m = httpx.get(f"{guarded}/metrics", headers=h, timeout=30).json()
    print(f"\n/stats before={before}\n/stats after={after}")
    assert after["total_requests"] - before["total_requests"] == 5
    assert after["successful_requests"] - before["successful_requests"] == 4
    assert after["failed_requests"] - before["failed_requests"] == 1
    assert after["ingress_replicas"] == 2
    assert after["available_slots"] == 3 and after["current_queue_size"] == 0

    assert m["total_requests"] == after["total_requests"]
    assert m["slo"]["sample_size"] >= 4 and m["slo"]["ttft_p50"] > 0
    assert m["total_tokens_generated"] - tokens_before == generated >= 4

    text = httpx.get(f"{guarded}/metrics/prometheus", headers=h, timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    ttft = fams["llm_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    assert any(s.name.endswith("_bucket") for s in ttft.samples)
    total = sum(s.value for s in fams["llm_requests"].samples if s.name == "llm_requests_total")
    assert total == after["total_requests"]


def test_real_prometheus_scrapes_the_app(guarded):
    from prom_server import PromServer, ensure_prometheus_tools

    if ensure_prometheus_tools() is None:
        pytest.skip("Debian's prometheus package could not be installed (not root, or no apt)")
    h = {"Authorization": f"Bearer {KEYS[3]}"}
    expected = httpx.get(f"{guarded}/stats", headers=h, timeout=30).json()["total_requests"]
    target = guarded.split("//", 1)[1].split("/", 1)[0]
    with PromServer(
        [target],
        metrics_path=f"{PREFIX}/metrics/prometheus",
        bearer_token=KEYS[3],
        rule_files=["monitoring/alerts.yaml"],
    ) as prom:
        prom.wait_for_scrape()
        value = prom.wait_for_value("sum(llm_requests_total)", lambda v: v == expected, timeout_s=30)
    print(f"\nPromQL sum(llm_requests_total) = {value}, /stats total_requests = {expected}")
    assert value == expected
