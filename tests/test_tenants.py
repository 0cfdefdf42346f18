"""Issue 18 end to end: keys with a tenant and a role (a structured keys file), admin routes
(403 for a client key, 401 without one), public vs admin /health, and per-tenant budgets in
requests, tokens and concurrency with OpenAI's rate-limit headers — on one real app with auth
on (its own model replica), the official `openai` SDK as the client where it fits."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from conftest import app_args, wait_healthy
from reliability import wait_until

PREFIX = "/tenants"
MODEL = "tiny-qwen3"
KEYS = {
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
  - {{key: {KEYS["acme"]}, tenant: acme}}
  - {{key: {KEYS["light"]}, tenant: light}}
  - {{key: {KEYS["tok"]}, tenant: tok}}
  - {{key: {KEYS["conc"]}, tenant: conc}}
  - {{key: {KEYS["admin"]}, tenant: ops, role: admin}}
"""


@pytest.fixture(scope="module")
def url(http_port, tmp_path_factory):
    from ray import serve

    from serve_app import build_app

    keys = tmp_path_factory.mktemp("tenants") / "keys.yaml"
    keys.write_text(KEYS_FILE)
    args = app_args(
        rate_limit={"enabled": True, "per_minute": 10, "per_hour": 100},
        auth={"enabled": True, "file": str(keys), "env_var": None},
        # two ingress replicas: budgets and their headers are cluster-wide (one limiter actor)
        deployments={"ingress": {"num_replicas": 2}},
    )
    serve.run(build_app(args), name="tenants", route_prefix=PREFIX, blocking=False)
    base = f"http://127.0.0.1:{http_port}{PREFIX}"
    wait_healthy(base)
    yield base
    serve.delete("tenants")


def sdk(url: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def chat(client: openai.OpenAI, **extra):
    return client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "体育新闻"}], **{"max_tokens": 4, **extra}
    )


def h(tenant: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}


def usage(tenant: str) -> dict[str, int]:
    """The app's limiter actor's account of `tenant`: requests in flight, tokens reserved and
    tokens charged in the last minute."""
    import ray

    from deployments.actors import DEFAULT_NAMESPACE

    limiter = ray.get_actor("rate_limiter.tenants", namespace=DEFAULT_NAMESPACE)
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


def test_client_key_works_and_every_answer_has_openai_rate_headers(url):
    raw = chat(sdk(url, "acme"))
    completion = raw.parse()
    assert completion.choices[0].message.content is not None
    headers = raw.headers
    # acme has no budgets of its own: the service defaults (10/min, 100/h) per tenant
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_admin_routes_need_an_admin_key(url):
    body = {"lora_name": "x-adapter", "lora_path": "/nonexistent/adapter"}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        r = httpx.post(f"{url}{path}", json=body, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = httpx.post(f"{url}{path}", json=body, headers=h("acme"), timeout=30)
        err = r.json()["error"]
        assert r.status_code == 403, r.text
        assert (err["type"], err["code"]) == ("permission_error", "admin_key_required")
        assert "admin" in err["message"] and KEYS["acme"] not in r.text
    # the admin key passes the guard: the route itself answers (bad path 400, unknown 404)
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=h("admin"), timeout=60)
    assert r.status_code == 400, r.text
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "x-adapter"}, headers=h("admin"), timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


def test_sdk_raises_permission_denied_for_a_client_key(url):
    client = sdk(url, "acme")
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.post("/unload_lora_adapter", body={"lora_name": "news-lora"}, cast_to=httpx.Response)
    assert ei.value.status_code == 403 and ei.value.code == "admin_key_required"
    # and the served adapter is still there
    assert "news-lora" in {m.id for m in client.models.list()}


def test_public_health_is_status_only_details_for_admins(url):
    for who in (None, "acme", "nonsense"):
        headers = {"Authorization": "Bearer wrong"} if who == "nonsense" else h(who)
        r = httpx.get(f"{url}/health", headers=headers, timeout=30)
        assert r.status_code == 200
        body = r.json()
        # the replaced service's fields, which its health checks read — nothing else
        assert set(body) == {"status", "gpu", "limits"}, body
        assert body["status"] == "healthy"
        assert set(body["limits"]) == {"max_concurrent_requests", "max_queue_size", "rate_limit"}
        assert body["limits"]["max_concurrent_requests"] == 3 and body["limits"]["max_queue_size"] == 10
        assert "pid" not in r.text and "node_id" not in r.text
    full = httpx.get(f"{url}/health", headers=h("admin"), timeout=30).json()
    assert {"replica", "deployments", "model", "accelerator_memory_gb"} <= set(full)
    assert full["limits"]["max_tokens_cap"] == 512


def test_tenant_request_budget_429_with_retry_after(url):
    client = sdk(url, "light")
    statuses = [chat(client).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    with pytest.raises(openai.RateLimitError) as ei:
        chat(client)
    exc = ei.value
    assert exc.code == "rate_limit_exceeded" and exc.body["type"] == "rate_limit_error"
    r = exc.response
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-limit-requests"] == "3" and r.headers["x-ratelimit-remaining-requests"] == "0"
    # another tenant is unaffected
    assert chat(sdk(url, "acme")).status_code == 200


def test_token_budget_charges_usage_and_refuses_up_front(url):
    """tok: 200 tokens/min. Each answer's usage is charged; a request whose max_tokens does not
    fit the rest is refused before any engine work. Two ingress replicas serve the app (Serve's
    router spreads the requests over them): the headers count down across both."""
    from ray import serve

    assert serve.status().applications["tenants"].deployments["IngressRouter"].replica_states.get("RUNNING") == 2
    client = sdk(url, "tok")
    with pytest.raises(openai.RateLimitError) as ei:
        chat(client, max_tokens=201)
    assert ei.value.code == "tokens_budget_exceeded" and ei.value.body["param"] == "max_tokens"

    first = chat(client, max_tokens=8)
    u1 = first.parse().usage.total_tokens
    assert first.headers["x-ratelimit-limit-tokens"] == "200"
    assert first.headers["x-ratelimit-remaining-tokens"] == str(200 - 8)  # its reservation
    wait_released("tok", u1)  # the usage is charged as the response ends (fire and forget)
    second = chat(client, max_tokens=8)
    u2 = second.parse().usage.total_tokens
    assert second.headers["x-ratelimit-remaining-tokens"] == str(200 - u1 - 8)
    wait_released("tok", u1 + u2)
    left = 200 - u1 - u2
    print(f"\nusage charged: {u1} + {u2} tokens; {left} left of 200")
    with pytest.raises(openai.RateLimitError) as ei:
        chat(client, max_tokens=left + 1)
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
        chat(client, max_tokens=left - u3 + 1)
    assert ei.value.response.headers["x-ratelimit-remaining-tokens"] == str(left - u3)


def test_concurrency_budget(url):
    client = sdk(url, "conc")
    started, done = threading.Event(), threading.Event()

    def long_stream():
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            headers=h("conc"),
            timeout=120,
            json={"model": MODEL, "prompt": "新闻", "max_tokens": 400, "ignore_eos": True, "stream": True},
        ) as r:
            for _ in r.iter_lines():
                started.set()
                if done.is_set():
                    break
        started.set()

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        assert started.wait(60)
        with pytest.raises(openai.RateLimitError) as ei:
            chat(client)
        assert ei.value.code == "concurrency_limit_exceeded"
    finally:
        done.set()
        t.join(120)
    wait_released("conc")  # the stream's slot comes back as the ingress sees it end
    assert chat(client).status_code == 200
