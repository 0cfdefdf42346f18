"""Admission on one app with 2 ingress replicas and auth on (its own model replica): API keys
from the environment (each its own client) and from a structured keys file (issue 18: tenants
with roles and budgets), admin routes (403 for a client key, 401 without one), public vs admin
/health, cluster-wide rate limits (429 + Retry-After + OpenAI's rate-limit headers), per-tenant
budgets in requests, tokens and concurrency, /stats and /metrics totals, Prometheus scraping the
app for real. The official `openai` SDK is the client where it fits. Tests that spend a budget
use a key of their own, so they do not depend on each other's order."""

from __future__ import annotations

import collections
import json
import threading
import time

import httpx
import openai
import pytest
from conftest import app_args, delete_app, wait_healthy
from prometheus_client.parser import text_string_to_metric_families
from reliability import wait_until

MODEL = "tiny-qwen3"
KEYS = ["key-auth-test", "key-client-a", "key-client-b", "key-metrics"]
APP = "guarded"
PREFIX = "/guarded"
TENANT_KEYS = {
    "acme": "sk-acme-client-1",
    "light": "sk-light-client",
    "tok": "sk-token-tenant",
    "conc": "sk-conc-tenant",
    "admin": "sk-ops-admin",
}
KEYS_FILE = f"""
tenants:
  acme:  {{priority: 1}}
  light: {{requests_per_minute: 3}}
  tok:   {{requests_per_minute: 100, tokens_per_minute: 200}}
  conc:  {{requests_per_minute: 100, max_concurrent: 1}}
  ops:   {{priority: 10}}
keys:
  - {{key: {TENANT_KEYS["acme"]}, tenant: acme}}
  - {{key: {TENANT_KEYS["light"]}, tenant: light}}
  - {{key: {TENANT_KEYS["tok"]}, tenant: tok}}
  - {{key: {TENANT_KEYS["conc"]}, tenant: conc}}
  - {{key: {TENANT_KEYS["admin"]}, tenant: ops, role: admin}}
"""


@pytest.fixture(scope="module")
def guarded(http_port, tmp_path_factory):
    from ray import serve

    from serve_app import build_app

    keys = tmp_path_factory.mktemp("tenants") / "keys.yaml"
    keys.write_text(KEYS_FILE)
    env = {"LLM_SERVE_API_KEYS": ",".join(KEYS)}  # plain keys, besides the file's tenants
    args = app_args(
        rate_limit={"enabled": True, "per_minute": 10, "per_hour": 100},
        auth={"enabled": True, "file": str(keys)},
        # two ingress replicas: limits, budgets and their headers are cluster-wide (one limiter actor)
        deployments={"ingress": {"num_replicas": 2, "ray_actor_options": {"runtime_env": {"env_vars": env}}}},
    )
    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
    url = f"http://127.0.0.1:{http_port}{PREFIX}"
    wait_healthy(url)
    yield url
    delete_app(APP)


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

    ingress = serve.status().applications[APP].deployments["IngressRouter"]
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
    wait_pushed(APP)  # every request of the earlier tests is counted
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


# ----------------------------------------------------------------------------- tenants (issue 18)


def sdk(guarded: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{guarded}/v1", api_key=TENANT_KEYS[tenant], max_retries=0, timeout=60)


def sdk_chat(client: openai.OpenAI, **extra):
    return client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "体育新闻"}], **{"max_tokens": 4, **extra}
    )


def h(tenant: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"} if tenant else {}


def usage(tenant: str) -> dict[str, int]:
    """The app's limiter actor's account of `tenant`: requests in flight, tokens reserved and
    tokens charged in the last minute."""
    import ray

    from deployments.actors import DEFAULT_NAMESPACE

    limiter = ray.get_actor(f"rate_limiter.{APP}", namespace=DEFAULT_NAMESPACE)
    return ray.get(limiter.usage.remote(f"tenant:{tenant}"), timeout=30)


def wait_released(tenant: str, charged: int | None = None) -> dict[str, int]:
    """Wait until the tenant's requests have ended in the limiter (the ingress releases each
    one as its response ends, fire and forget): nothing in flight or reserved, and `charged`
    tokens counted in the last minute when given."""
    return wait_until(
        lambda: (
            (u := usage(tenant))["in_flight"] == 0
            and u["reserved_tokens"] == 0
            and (charged is None or u["tokens_last_minute"] == charged)
            and u
        ),
        30,
        0.1,
        f"tenant {tenant}'s requests released (charged {charged})",
    )


def test_client_key_works_and_every_answer_has_openai_rate_headers(guarded):
    raw = sdk_chat(sdk(guarded, "acme"))
    completion = raw.parse()
    assert completion.choices[0].message.content is not None
    headers = raw.headers
    # acme has no budgets of its own: the service defaults (10/min, 100/h) per tenant
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_admin_routes_need_an_admin_key(guarded):
    body = {"lora_name": "x-adapter", "lora_path": "/nonexistent/adapter"}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        r = httpx.post(f"{guarded}{path}", json=body, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = httpx.post(f"{guarded}{path}", json=body, headers=h("acme"), timeout=30)
        err = r.json()["error"]
        assert r.status_code == 403, r.text
        assert (err["type"], err["code"]) == ("permission_error", "admin_key_required")
        assert "admin" in err["message"] and TENANT_KEYS["acme"] not in r.text
    # the admin key passes the guard: the route itself answers (bad path 400, unknown 404)
    r = httpx.post(f"{guarded}/v1/load_lora_adapter", json=body, headers=h("admin"), timeout=60)
    assert r.status_code == 400, r.text
    r = httpx.post(f"{guarded}/v1/unload_lora_adapter", json={"lora_name": "x-adapter"}, headers=h("admin"), timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


def test_sdk_raises_permission_denied_for_a_client_key(guarded):
    client = sdk(guarded, "acme")
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.post("/unload_lora_adapter", body={"lora_name": "news-lora"}, cast_to=httpx.Response)
    assert ei.value.status_code == 403 and ei.value.code == "admin_key_required"
    # and the served adapter is still there
    assert "news-lora" in {m.id for m in client.models.list()}


def test_public_health_is_status_only_details_for_admins(guarded):
    for who in (None, "acme", "nonsense"):
        headers = {"Authorization": "Bearer wrong"} if who == "nonsense" else h(who)
        r = httpx.get(f"{guarded}/health", headers=headers, timeout=30)
        assert r.status_code == 200
        body = r.json()
        # the replaced service's fields, which its health checks read — nothing else
        assert set(body) == {"status", "gpu", "limits"}, body
        assert body["status"] == "healthy"
        assert set(body["limits"]) == {"max_concurrent_requests", "max_queue_size", "rate_limit"}
        assert body["limits"]["max_concurrent_requests"] == 3 and body["limits"]["max_queue_size"] == 10
        assert "pid" not in r.text and "node_id" not in r.text
    full = httpx.get(f"{guarded}/health", headers=h("admin"), timeout=30).json()
    assert {"replica", "deployments", "model", "accelerator_memory_gb"} <= set(full)
    assert full["limits"]["max_tokens_cap"] == 512


def test_tenant_request_budget_429_with_retry_after(guarded):
    client = sdk(guarded, "light")
    statuses = [sdk_chat(client).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    with pytest.raises(openai.RateLimitError) as ei:
        sdk_chat(client)
    exc = ei.value
    assert exc.code == "rate_limit_exceeded" and exc.body["type"] == "rate_limit_error"
    r = exc.response
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-limit-requests"] == "3" and r.headers["x-ratelimit-remaining-requests"] == "0"
    # another tenant is unaffected
    assert sdk_chat(sdk(guarded, "acme")).status_code == 200


def test_token_budget_charges_usage_and_refuses_up_front(guarded):
    """tok: 200 tokens/min. Each answer's usage is charged; a request whose max_tokens does not
    fit the rest is refused before any engine work. Two ingress replicas serve the app (Serve's
    router spreads the requests over them): the headers count down across both."""
    from ray import serve

    assert serve.status().applications[APP].deployments["IngressRouter"].replica_states.get("RUNNING") == 2
    client = sdk(guarded, "tok")
    with pytest.raises(openai.RateLimitError) as ei:
        sdk_chat(client, max_tokens=201)
    assert ei.value.code == "tokens_budget_exceeded" and ei.value.body["param"] == "max_tokens"

    first = sdk_chat(client, max_tokens=8)
    u1 = first.parse().usage.total_tokens
    assert first.headers["x-ratelimit-limit-tokens"] == "200"
    assert first.headers["x-ratelimit-remaining-tokens"] == str(200 - 8)  # its reservation
    wait_released("tok", u1)  # the usage is charged as the response ends (fire and forget)
    second = sdk_chat(client, max_tokens=8)
    u2 = second.parse().usage.total_tokens
    assert second.headers["x-ratelimit-remaining-tokens"] == str(200 - u1 - 8)
    wait_released("tok", u1 + u2)
    left = 200 - u1 - u2
    print(f"\nusage charged: {u1} + {u2} tokens; {left} left of 200")
    with pytest.raises(openai.RateLimitError) as ei:
        sdk_chat(client, max_tokens=left + 1)
    r = ei.value.response
    assert ei.value.code == "tokens_rate_limit_exceeded"
    assert r.headers["x-ratelimit-remaining-tokens"] == str(left)
    assert 1 <= int(r.headers["retry-after"]) <= 60
    # streams are charged by their usage chunk too
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "财经"}],
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    u3 = [c.usage.total_tokens for c in stream if c.usage][-1]
    wait_released("tok", u1 + u2 + u3)
    with pytest.raises(openai.RateLimitError) as ei:
        sdk_chat(client, max_tokens=left - u3 + 1)
    assert ei.value.response.headers["x-ratelimit-remaining-tokens"] == str(left - u3)


def test_concurrency_budget(guarded):
    """conc: one request at a time. A stream holds the slot (a second request is refused) until
    it ends; read to its end here, so the slot's return does not depend on how soon a closed
    connection is noticed (seen: more than 30 s on a loaded machine)."""
    client = sdk(guarded, "conc")
    started = threading.Event()

    def long_stream():
        with httpx.stream(
            "POST",
            f"{guarded}/v1/completions",
            headers=h("conc"),
            timeout=120,
            json={"model": MODEL, "prompt": "新闻", "max_tokens": 150, "ignore_eos": True, "stream": True},
        ) as r:
            for _ in r.iter_lines():
                started.set()
        started.set()

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        assert started.wait(60)
        with pytest.raises(openai.RateLimitError) as ei:
            sdk_chat(client)
        assert ei.value.code == "concurrency_limit_exceeded"
    finally:
        t.join(120)
    wait_released("conc")  # the stream's slot comes back as the ingress sees it end
    assert sdk_chat(client).status_code == 200
