"""Chaos: the service as `make run` starts it, under a steady mixed load (streaming and not, chat,
completions, classify, the configured adapter, a runtime-loaded adapter, model-less requests),
loses one part at a time — an ingress replica, a tokenizer replica, the adapter registry, the
limiter, the stats aggregator; in the long run also HAProxy, a model replica and the engine
process. For each fault: the answers in flight meanwhile (no 5xx but 503/504, none hung), the
time until every kind of request answers again, and the state afterwards (the adapters and
their weights, the rate-limit windows, the /stats counters).

Opt-in (`scripts/test.sh -m soak -k chaos`): `test_chaos_short` runs the five fast faults once,
`test_chaos_long` adds HAProxy, the model replica and the engine process and repeats the round
(`LLM_SERVE_CHAOS_ROUNDS`, default 2). CI kills each part on its own: the ingress replica of
`make run` under load (`test_fast_path.py`), the tokenizer replica, the limiter and the stats
aggregator (`test_control_plane_state.py`), the adapter registry (`test_adapter_state.py`),
HAProxy's answers meanwhile (`test_haproxy_errors.py`), the model replica and the engine
(`test_faults.py`). The table it prints is the one in
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from chaos import (
    ADAPTER,
    TABLE_HEADER,
    Fault,
    FaultResult,
    Load,
    Service,
    actor_pids,
    engine_pids,
    haproxy_pids,
    judge,
    make_run,
    mixed_kinds,
    replica_pids,
    wait_full_service,
)
from reliability import kill_pid, wait_gone

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "sk-chaos-admin-0123456789abcdef"
RUNTIME_ADAPTER = "half-lora"
REQUEST_TIMEOUT_S = 30
DEADLINE_S = REQUEST_TIMEOUT_S + 20  # a request longer than this hung
RECOVERY_TIMEOUT_S = 120
PROBE_TEXTS = ["央行宣布降息25个基点", "詹姆斯带领湖人队赢得总冠军", "新款手机发布"]

FAULTS = [
    Fault("ingress replica", lambda s: replica_pids(s, "IngressRouter"), frozenset({"conn_closed"})),
    Fault("tokenizer replica", lambda s: replica_pids(s, "PromptTokenizer")),
    Fault("adapter registry", lambda s: actor_pids(s, "AdapterRegistryActor")),
    Fault("limiter", lambda s: actor_pids(s, "RateLimiterActor")),
    Fault("stats aggregator", lambda s: actor_pids(s, "ServiceStatsActor")),
    # ~30 s of refused connections until Serve restarts it; its error answers: test_haproxy_errors.py
    Fault("HAProxy", haproxy_pids, frozenset({"conn_closed", "refused"}), long=True),
    Fault("model replica", lambda s: replica_pids(s, "ModelReplica"), long=True),
    Fault("engine process", engine_pids, long=True),
]


def half_adapter(root: Path) -> Path:
    """news-lora with its lora_B halved: other weights, the same shape."""
    from safetensors.torch import load_file, save_file

    out = root / RUNTIME_ADAPTER
    shutil.copytree(REPO / "models" / "tiny-qwen3-lora", out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    save_file(
        {k: (v * 0.5 if "lora_B" in k else v) for k, v in tensors.items()}, str(out / "adapter_model.safetensors")
    )
    return out


def scores(url: str, model: str) -> list[dict[str, float]]:
    r = httpx.post(f"{url}/v1/classify", json={"model": model, "input": PROBE_TEXTS}, timeout=60)
    assert r.status_code == 200, r.text
    return [row["scores"] for row in r.json()["data"]]


def max_diff(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)


def state(url: str) -> dict:
    models = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
    stats = httpx.get(f"{url}/stats", timeout=30).json()
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-qwen3", "prompt": "x", "max_tokens": 1}, timeout=60)
    return {
        "models": models,
        "total_requests": stats.get("total_requests"),
        "remaining": int(r.headers.get("x-ratelimit-remaining-requests", "-1")),
        "limit": int(r.headers.get("x-ratelimit-limit-requests", "-1")),
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chaos")
    roots = tmp / "adapters"
    roots.mkdir()
    half_adapter(roots)
    keys = tmp / "keys.yaml"
    keys.write_text(json.dumps({"keys": [{"key": ADMIN_KEY, "tenant": "ops", "role": "admin"}]}))
    overrides = {
        "limits": {"request_timeout_s": REQUEST_TIMEOUT_S},
        "lora": {"adapter_roots": ["models", str(roots)]},
        # every client is one address here: one large window, so the load is not refused, and an
        # hour long, so nothing leaves it during the run (what it holds only grows)
        "rate_limit": {"per_minute": 0, "per_hour": 100_000},
        "auth": {"file": str(keys)},  # an admin key for the runtime load; client routes stay open
        "deployments": {
            "model": {"health_check_period_s": 2, "health_check_timeout_s": 10, "autoscaling_config": None},
            "tokenizer": {"autoscaling_config": None},
            "ingress": {"autoscaling_config": None},
        },
    }
    with make_run(tmp, overrides, {}) as svc:
        r = httpx.post(
            f"{svc.url}/v1/load_lora_adapter",
            json={"lora_name": RUNTIME_ADAPTER, "lora_path": str(roots / RUNTIME_ADAPTER)},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        yield svc


def run_fault(service: Service, fault: Fault, kinds, before_scores) -> FaultResult:
    url = service.url
    before = state(url)
    with Load(url, kinds, workers=3, deadline_s=DEADLINE_S) as load:
        time.sleep(2)  # the load is running: requests in flight when the part dies
        pids = fault.find(service)
        assert pids, f"{fault.name}: no process found"
        t_kill = time.monotonic()
        for pid in pids:
            kill_pid(pid)
        assert not wait_gone(pids, 30), f"{fault.name}: still alive after SIGKILL"
        recovery = wait_full_service(url, kinds, RECOVERY_TIMEOUT_S)
        t_back = time.monotonic()
        time.sleep(1)
    res = judge(fault, load.between(t_kill - 1.0, t_back))
    res.killed, res.recovery_s = pids, recovery
    after = state(url)
    now = {name: scores(url, name) for name in before_scores}
    res.state = {
        "adapters": "kept"
        if {ADAPTER, RUNTIME_ADAPTER} <= after["models"]
        else f"LOST {before['models'] - after['models']}",
        "weights": "same"
        if all(max_diff(now[m], before_scores[m]) < 1e-3 for m in now)
        else {m: round(max_diff(now[m], before_scores[m]), 4) for m in now},
        "/stats total": f"{before['total_requests']} → {after['total_requests']}",
        "rate-limit remaining": f"{before['remaining']} → {after['remaining']} (limit {after['limit']})",
    }
    res.state["_after"] = after
    res.state["_before"] = before
    return res


def chaos_round(service: Service, faults: list[Fault]) -> list[FaultResult]:
    kinds = mixed_kinds(RUNTIME_ADAPTER)
    assert wait_full_service(service.url, kinds, RECOVERY_TIMEOUT_S) is not None, "not serving before the faults"
    before_scores = {m: scores(service.url, m) for m in (ADAPTER, RUNTIME_ADAPTER, "tiny-qwen3")}
    assert max_diff(before_scores[ADAPTER], before_scores[RUNTIME_ADAPTER]) > 1e-3  # the two adapters differ
    results = []
    for fault in faults:
        res = run_fault(service, fault, kinds, before_scores)
        after, before = res.state.pop("_after"), res.state.pop("_before")
        print(f"\n[chaos] {fault.name}: killed {res.killed}; {res.row()}")
        for line in res.bad[:10]:
            print(f"    PROBLEM {line}")
        results.append(res)
        # the state afterwards, for every fault
        assert {ADAPTER, RUNTIME_ADAPTER} <= after["models"], (fault.name, after["models"])
        assert res.state["weights"] == "same", (fault.name, res.state["weights"])
        assert after["total_requests"] >= before["total_requests"], (fault.name, before, after)
        assert after["limit"] == before["limit"] == 100_000, (fault.name, before, after)
        assert after["remaining"] < before["remaining"], (fault.name, "the limiter's window was lost", before, after)
    print("\n" + TABLE_HEADER)
    for res in results:
        print(res.row())
    for res in results:
        assert res.recovery_s is not None, f"{res.fault}: not back within {RECOVERY_TIMEOUT_S} s"
        assert res.hung == 0 and res.server_errors == 0 and not res.bad, (res.fault, res.bad[:10])
    return results


@pytest.mark.soak
def test_chaos_short(service):
    chaos_round(service, [f for f in FAULTS if not f.long])


@pytest.mark.soak
def test_chaos_long(service):
    rounds = int(os.environ.get("LLM_SERVE_CHAOS_ROUNDS", "2"))
    for _ in range(rounds):
        chaos_round(service, FAULTS)
