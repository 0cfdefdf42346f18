"""The replaced Flask service's clients, health checks, dashboards and alert rules, replayed
against this service (../shared/LEGACY_API.md; docs/migration.md): its documented requests
(no `model` field, 3 worker threads, timeout=30) and the fields it read from /health, /stats,
/metrics, /metrics/prometheus and the 503 body. Our own fields stay beside them."""

from __future__ import annotations

import asyncio
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import ADMIN, app_args
from prometheus_client.parser import text_string_to_metric_families
from reliability import wait_until

REPO = Path(__file__).resolve().parents[1]
TITLES = [
    "央行宣布下调存款准备金率",
    "国足客场战平对手",
    "新款手机发布会定于下月举行",
    "高考报名人数创新高",
    "油价迎来年内第三次上涨",
    "电影票房突破十亿",
]
LEGACY_GAUGES = (
    "vllm_num_waiting_requests",
    "vllm_num_running_requests",
    "vllm_ttft_p95",
    "vllm_decoding_throughput_mean",
)


def _session_default_model() -> str:
    """The model a model-less request gets in the session app (tests/conftest.py app_args)."""
    m = app_args()["model"]
    name = m.get("default_model") or m["model_id"]
    return m.get("aliases", {}).get(name, name)


def _classify(base_url: str, title: str) -> tuple[str, str]:
    """The replaced service's documented client call, verbatim in its shape."""
    response = requests.post(
        f"{base_url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": f"分类：{title}"}],
            "max_tokens": 50,
            "temperature": 0.3,
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"], response.json()["model"]


def test_legacy_chat_client_three_workers(base_url):
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda t: _classify(base_url, t), TITLES))
    assert len(results) == len(TITLES)
    for content, model in results:
        assert isinstance(content, str)
        assert model == _session_default_model()  # the session config's default (the base model)


def test_legacy_completion_without_model(base_url):
    r = requests.post(
        f"{base_url}/v1/completions",
        json={"prompt": "请分类以下新闻：央行宣布下调存款准备金率\n类别：", "max_tokens": 8, "temperature": 0.3},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert body["model"] == _session_default_model()


def test_legacy_model_id_is_listed_and_served(base_url):
    r = requests.get(f"{base_url}/v1/models", timeout=30)
    assert r.status_code == 200
    cards = {c["id"]: c for c in r.json()["data"]}
    assert "qwen-news-classifier" in cards
    assert set(cards["qwen-news-classifier"]) >= {"id", "object", "created", "owned_by"}
    r = requests.post(
        f"{base_url}/v1/chat/completions",
        json={
            "model": "qwen-news-classifier",
            "messages": [{"role": "user", "content": f"分类：{TITLES[0]}"}],
            "max_tokens": 5,
            "temperature": 0.3,
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_legacy_health_fields(base_url):
    r = requests.get(f"{base_url}/health", headers=ADMIN, timeout=30)  # our fields too: the admin view
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy"  # ours by default; compat.legacy_health_status: "ok"
    gpu = body["gpu"]
    if body["replica"].get("platform") == "cpu":
        assert gpu is None
    elif gpu is not None:
        assert {"allocated_gb", "reserved_gb", "free_gb"} <= set(gpu)
    limits = body["limits"]
    model = app_args()["deployments"]["model"]
    assert limits["max_concurrent_requests"] == model["max_ongoing_requests"] == limits["max_ongoing_requests"]
    assert limits["max_queue_size"] == model["max_queued_requests"] == limits["max_queued_requests"]
    assert limits["rate_limit"] == "disabled"  # the session app turns the limiter off
    for ours in ("model", "replica", "deployments", "accelerator_memory_gb"):
        assert ours in body


def test_legacy_stats_fields(base_url):
    body = requests.get(f"{base_url}/stats", timeout=30).json()
    stats = body["statistics"]
    for key in (
        "total_requests",
        "successful_requests",
        "failed_requests",
        "queue_full_count",
        "current_queue_size",
        "peak_queue_size",
    ):
        assert isinstance(stats[key], int) and stats[key] == body[key]
    assert isinstance(body["current_queue_size"], int) and isinstance(body["available_slots"], int)
    for ours in ("running_requests", "in_flight_requests", "model_replicas", "capacity", "rejections"):
        assert ours in body


def test_legacy_metrics_json_fields(base_url):
    body = requests.get(f"{base_url}/metrics", timeout=30).json()
    for key in ("num_waiting_requests", "num_running_requests", "total_requests", "total_tokens_generated"):
        assert isinstance(body[key], int)
    assert set(body["slo"]) >= {
        "ttft_mean",
        "ttft_p50",
        "ttft_p95",
        "ttft_p99",
        "decoding_throughput_mean",
        "decoding_throughput_p50",
        "decoding_throughput_p95",
        "total_throughput",
        "sample_size",
    }


def test_legacy_prometheus_gauges(base_url):
    _classify(base_url, TITLES[0])  # a request in the SLO window: the TTFT/throughput gauges have a value

    def exposed():
        text = requests.get(f"{base_url}/metrics/prometheus", timeout=30).text
        return text if re.search(r"^vllm_ttft_p95 ", text, re.M) else None

    text = wait_until(exposed, 15, 0.5, "vllm_ttft_p95 in /metrics/prometheus")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in LEGACY_GAUGES:
        assert fams[name].type == "gauge", name
        assert len(fams[name].samples) == 1, name
    assert fams["vllm_ttft_p95"].samples[0].value > 0
    assert "llm_requests_waiting" in fams  # ours stay


def test_legacy_rules_on_the_live_exposition(base_url):
    """The replaced service's alert rules, loaded by a real Prometheus scraping the session
    app as they deployed it (job `vllm`, /metrics/prometheus): both expressions read series
    that exist, and neither rule errors."""
    from prom_server import PromServer, find_prometheus

    if not find_prometheus():
        pytest.skip("prometheus not installed (scripts/install_test_deps.sh)")
    target = base_url.removeprefix("http://")
    with PromServer([target], job="vllm", rule_files=[REPO / "monitoring" / "legacy_alerts.yaml"]) as prom:
        prom.wait_for_scrape()
        assert prom.wait_for_value('vllm_num_waiting_requests{job="vllm"}') >= 0
        assert prom.wait_for_value('vllm_ttft_p95{job="vllm"}') > 0
        assert prom.query_value('vllm_ttft_p95{job="vllm"} > 1e9') is None  # the rule's shape evaluates

        def evaluated():
            rules = prom.rules()
            done = rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules)
            return rules if done else None

        rules = wait_until(evaluated, 20, 0.5, "both legacy rules evaluated")
        assert {r["name"] for r in rules} == {"HighQueueLength", "HighTTFT"}
        assert all(r["health"] == "ok" for r in rules), rules


# --------------------------------------------------------------------------- units (no Ray)


def test_queue_full_body_has_the_legacy_fields():
    """The 503 keeps the OpenAI error object and adds the replaced service's `queue_size` and
    `max_queue_size`, from the ingress's gate and from Serve's own refusal alike."""
    from ray.serve.exceptions import BackPressureError

    from deployments.admission.capacity import ModelCalls, ModelCapacity
    from deployments.api.errors import APIError
    from deployments.config import ServiceConfig
    from serve_app import app_options

    cfg = ServiceConfig.model_validate(
        {"deployments": {"model": {"max_ongoing_requests": 3, "max_queued_requests": 10, "num_replicas": 1}}}
    )
    gate = ModelCapacity.from_options(app_options(cfg)["model"])
    for _ in range(13):
        gate.acquire(1)
    with pytest.raises(APIError) as exc:
        gate.acquire(1)
    body = exc.value.body()
    assert body["error"]["code"] == "queue_full" and isinstance(body["error"]["message"], str)
    assert body["queue_size"] == 10 and body["max_queue_size"] == 10
    assert exc.value.response().status_code == 503 and exc.value.headers["Retry-After"] == "1"
    # the error crosses Ray (pickled) with its fields
    assert pickle.loads(pickle.dumps(exc.value)).body() == body

    async def refused():
        raise BackPressureError(num_queued_requests=7, max_queued_requests=10)

    with pytest.raises(APIError) as exc:
        asyncio.run(ModelCalls(gate, 1.0).call(refused()))
    assert exc.value.status == 503
    assert exc.value.body()["queue_size"] == 7 and exc.value.body()["max_queue_size"] == 10


def test_other_errors_have_no_legacy_fields():
    from deployments.admission.limit_responses import rate_limited_error
    from deployments.admission.limits import RateDecision
    from deployments.api import errors

    assert set(errors.bad_request("x").body()) == {"error"}
    assert set(errors.engine_unavailable().body()) == {"error"}
    body = rate_limited_error(
        RateDecision(allowed=False, limit=10, retry_after_s=5, window="minute", period_s=60)
    ).body()
    assert set(body) == {"error"} and isinstance(body["error"], dict)  # the 429: OpenAI's shape only


def test_rate_limit_summary_wording():
    from deployments.admission.limits import make_windows
    from deployments.admission.rate_limit import RateLimiter

    assert RateLimiter(make_windows(10, 100)).summary() == "10 requests/minute, 100 requests/hour per IP"
    assert RateLimiter(make_windows(10, 0)).summary() == "10 requests/minute per IP"
    assert RateLimiter([]).summary() == "disabled"


class _Model:
    """A model handle whose deep health call answers `engine`."""

    def __init__(self, engine: str):
        self.engine = engine
        self.health = self

    def remote(self):
        async def answer():
            return {"engine": self.engine, "platform": "cpu", "accelerator_memory_gb": None, "gpu": None}

        return answer()


@pytest.mark.parametrize(
    "legacy, engine, status, code",
    [
        (False, "ok", "healthy", 200),
        (True, "ok", "ok", 200),
        (False, "dead: EngineDeadError", "unhealthy", 503),
        (True, "dead: EngineDeadError", "unhealthy", 503),
    ],
)
def test_health_status_switch(legacy, engine, status, code):
    """`compat.legacy_health_status` changes only the healthy word; the rest stays."""
    import json

    from deployments.admission.capacity import ModelCalls, ModelCapacity
    from deployments.admission.limits import make_windows
    from deployments.admission.rate_limit import RateLimiter
    from deployments.api.health import ServingHealth
    from deployments.config import ServiceConfig
    from serve_app import app_options

    cfg = ServiceConfig.model_validate({"compat": {"legacy_health_status": legacy}})
    opts = app_options(cfg)["model"]
    health = ServingHealth(
        _Model(engine),
        cfg,
        opts,
        ModelCalls(ModelCapacity.from_options(opts), 1),
        RateLimiter(make_windows(10, 100)),
        auth_enabled=False,
    )
    response = asyncio.run(health.health())
    body = json.loads(response.body)
    assert response.status_code == code and body["status"] == status
    assert body["gpu"] is None
    assert body["limits"]["max_concurrent_requests"] == 3 and body["limits"]["max_queue_size"] == 10
    assert body["limits"]["rate_limit"] == "10 requests/minute, 100 requests/hour per IP"


def test_max_tokens_over_the_cap_is_refused_naming_it(base_url):
    """The default (`limits.max_tokens_over_cap: refuse`): a gateway's fixed max_tokens above the
    cap is a 400 naming the field; `clamp` serves it at the cap (tests/test_fast_path.py)."""
    r = requests.post(
        f"{base_url}/v1/chat/completions",
        timeout=30,
        json={"messages": [{"role": "user", "content": TITLES[0]}], "max_tokens": 1024},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("max_tokens", "max_tokens_too_large") and "512" in err["message"]
